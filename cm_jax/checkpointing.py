"""Orbax checkpoints of a run: save periodically (async), keep N, resume from the newest good step.

A checkpoint is a set of named items (params, opt_state, ema_params, extra, meta), so a teacher can be
read back without its optimizer state. Arrays restore onto whatever shardings the caller asks for, so a
checkpoint written on 8 devices restores on 1 and the reverse.

Crash safety: Orbax writes a step into `<step>.orbax-checkpoint-tmp-*` and renames it when complete, so
a process killed mid-save leaves only a temporary directory (removed on the next start) and the
previous step stays the newest. A finalized step that still cannot be read (a truncated or deleted
file) is skipped with a warning and moved aside to `<directory>.unreadable/`, so the run resumes
from the step before it and can save that step number again.

Preemption: in a `jax.distributed` run, Orbax's preemption sync point (SIGTERM on any host, agreed
on by all of them) triggers a save; in a single process, `watch_sigterm` turns SIGTERM into the same
notice.
"""

import contextlib
import logging
import os
import signal
import threading
import time
from typing import Any, Mapping

import jax
import orbax.checkpoint as ocp

from cm_jax import sharding
from cm_jax.errors import WorkdirError

ARRAY_ITEMS = ('params', 'opt_state', 'ema_params', 'extra')


def with_shardings(abstract_tree, shardings):
  """ShapeDtypeStructs that carry the target sharding, as StandardRestore wants them."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract_tree, shardings)


class Checkpointer:
  """A thin layer over `ocp.CheckpointManager` with resume fallback and partial restores."""

  def __init__(self, directory: str, save_every: int = 1, keep: int | None = 3,
               async_save: bool = True, read_only: bool = False):
    self.directory = os.path.abspath(directory)
    self.read_only = read_only
    self._sigterm = threading.Event()
    policies = ocp.checkpoint_managers
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=async_save, create=not read_only,
        read_only=read_only,
        # Every `save_every` steps and at a preemption notice; not Orbax's default extra save of the
        # first step a manager sees (a checkpoint at step 1 with checkpoint_every=5).
        save_decision_policy=policies.AnySavePolicy([
            policies.FixedIntervalPolicy(max(int(save_every), 1)),
            policies.PreemptionCheckpointingPolicy()]),
        # Step directories are created inside save(): a folder that cannot be written then fails
        # there, at once, instead of in a background thread that other threads wait 5 minutes for.
        async_options=ocp.AsyncOptions(create_directories_asynchronously=False),
        # Temporary directories of saves that a killed process never finished.
        cleanup_tmp_directories=not read_only)
    # Naming every item's handler lets a fresh manager read metadata and restore single items.
    handlers = {name: ocp.StandardCheckpointHandler() for name in ARRAY_ITEMS}
    handlers['meta'] = ocp.JsonCheckpointHandler()
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def should_save(self, step: int) -> bool:
    return self.manager.should_save(step)

  def reached_preemption(self, step: int) -> bool:
    """True at the step where every process should save and exit because of a preemption notice."""
    if jax.distributed.is_initialized():
      # All processes must agree on the step: jax's preemption service syncs them.
      return self.manager.reached_preemption(step)
    return self._sigterm.is_set()

  @contextlib.contextmanager
  def watch_sigterm(self):
    """In a single process, record SIGTERM as a preemption notice instead of dying at once.

    With `jax.distributed` initialised, jax's preemption service already owns SIGTERM. Outside the
    main thread a handler cannot be installed; the default behaviour stays.
    """
    if jax.distributed.is_initialized() or threading.current_thread() is not threading.main_thread():
      yield
      return

    def on_sigterm(signum, frame):
      del signum, frame
      logging.warning('SIGTERM received: saving a checkpoint after the current step, then exiting.')
      self._sigterm.set()

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
      yield
    finally:
      signal.signal(signal.SIGTERM, previous)

  def save(self, step: int, state: Mapping[str, Any], meta: Mapping[str, Any],
           force: bool = False) -> bool:
    items = {name: ocp.args.StandardSave(tree) for name, tree in state.items() if tree is not None
             and jax.tree.leaves(tree)}
    items['meta'] = ocp.args.JsonSave(dict(meta))
    try:
      return self.manager.save(step, args=ocp.args.Composite(**items), force=force)
    except Exception as error:  # pylint: disable=broad-except
      raise self._write_error(error, step) from error

  def restore_items(self, step: int, abstract_items: Mapping[str, Any]) -> dict:
    """Restore only the named array items (abstract trees carry their target shardings).

    Raises:
      ValueError: the saved params are of another network (checked on the metadata first).
    """
    self._check_shapes(step, abstract_items)
    args = {name: ocp.args.StandardRestore(tree) for name, tree in abstract_items.items()
            if jax.tree.leaves(tree)}
    restored = self.manager.restore(step, args=ocp.args.Composite(**args))
    return {name: restored[name] if name in args else tree for name, tree in abstract_items.items()}

  def _check_shapes(self, step: int, abstract_items: Mapping[str, Any]) -> None:
    """Refuse another network's params before reading any array: a read that fails half-way leaves
    TensorStore callbacks that find Orbax's event loop closed, one traceback each (thousands)."""
    for name in ('params', 'ema_params'):
      tree = abstract_items.get(name)
      if tree is None or not jax.tree.leaves(tree):
        continue
      saved = self.item_shapes(step, name)
      ours = {jax.tree_util.keystr(path): tuple(leaf.shape)
              for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
      if saved != ours:
        paths = sorted(p for p in set(saved) | set(ours) if saved.get(p) != ours.get(p))
        listed = ', '.join(f'{p}: saved {saved.get(p)}, this run {ours.get(p)}' for p in paths[:2])
        raise ValueError(f'the saved {name} are of another network ({len(paths)} differences, '
                         f'e.g. {listed})')

  def restore_meta(self, step: int) -> dict:
    return dict(self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta'])

  def item_shapes(self, step: int, name: str):
    """{path: shape} of a saved array item, read from metadata only (no arrays are loaded)."""
    metadata = self.manager.item_metadata(step)[name]
    tree = getattr(metadata, 'tree', metadata)
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path): tuple(leaf.shape) for path, leaf in flat}

  def restore_latest(self, abstract_items: Mapping[str, Any]) -> tuple[int, dict, dict] | None:
    """Newest step that restores cleanly, falling back past unreadable ones with a warning.

    Returns None when the directory holds no checkpoint.

    Raises:
      WorkdirError: there are checkpoints but none restores (e.g. a run of another model).
    """
    failures = []
    for step in reversed(self.all_steps()):
      try:
        items = self.restore_items(step, abstract_items)
        meta = self.restore_meta(step)
      except Exception as error:  # pylint: disable=broad-except
        # A corrupt or partial newest checkpoint must not cost the run: try the one before.
        logging.warning('Checkpoint at step %d in %s cannot be restored (%s: %s); trying the one '
                        'before.', step, self.directory, type(error).__name__, _short(error))
        failures.append((step, error))
        continue
      if failures and not self.read_only:
        self._move_aside([s for s, _ in failures])
      return step, items, meta
    if failures:
      listed = '; '.join(f'step {s}: {type(e).__name__}: {_short(e)}' for s, e in failures)
      raise WorkdirError(f'No checkpoint in {self.directory} can be restored into this run ({listed}).'
                         ' If the model config changed, use a new --workdir; if the files are '
                         'damaged, move the bad step directories away to start from scratch.')
    return None

  def _move_aside(self, steps: list[int]) -> None:
    """Rename unreadable steps out of the way, so that the resumed run can save those steps again."""
    aside = self.directory + '.unreadable'
    if jax.process_index() == 0:
      os.makedirs(aside, exist_ok=True)
      for step in steps:
        target = os.path.join(aside, f'{step}-{time.strftime("%Y%m%d-%H%M%S")}')
        os.replace(os.path.join(self.directory, str(step)), target)
        logging.warning('Moved the unreadable checkpoint of step %d to %s.', step, target)
    sharding.barrier('checkpoint_moved_aside')  # No process lists the steps before the move.
    self.manager.reload()

  def wait(self) -> None:
    try:
      self.manager.wait_until_finished()
    except Exception as error:  # pylint: disable=broad-except
      raise self._write_error(error) from error

  def close(self) -> None:
    try:
      self.wait()
    finally:
      self.manager.close()

  def _write_error(self, error: Exception, step: int | None = None) -> Exception:
    """A save that failed on the filesystem, as one line naming the folder; other errors as they are.

    An OSError anywhere in the chain is the filesystem's (Orbax and TensorStore wrap them).
    """
    cause = error
    while cause is not None and not isinstance(cause, OSError):
      cause = cause.__cause__ or cause.__context__
    if cause is None:
      return error
    what = f'the checkpoint of step {step}' if step is not None else 'a checkpoint'
    kept = self.latest_step()
    return WorkdirError(f'Cannot write {what} into {self.directory} ({type(cause).__name__}: '
                        f'{_short(cause)}). Make the folder writable (or free space), then relaunch '
                        f'the same command: it resumes from '
                        f'{"the start" if kept is None else f"step {kept}"}.')


def _short(error: Exception, limit: int = 300) -> str:
  text = str(error).replace('\n', ' ')
  return text if len(text) <= limit else text[:limit] + '...'

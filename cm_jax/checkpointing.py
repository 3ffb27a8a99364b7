"""Orbax checkpoints of a run: save periodically (async), keep N, resume from the newest good step.

A checkpoint is a set of named items (params, opt_state, ema_params, extra, meta), so a teacher can be
read back without its optimizer state. Arrays restore onto whatever shardings the caller asks for, so a
checkpoint written on 8 devices restores on 1 and the reverse.
"""

import logging
import os
from typing import Any, Mapping

import jax
import orbax.checkpoint as ocp

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
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=max(int(save_every), 1), max_to_keep=keep,
        enable_async_checkpointing=async_save, create=not read_only, read_only=read_only)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def should_save(self, step: int) -> bool:
    return self.manager.should_save(step)

  def reached_preemption(self, step: int) -> bool:
    return self.manager.reached_preemption(step)

  def save(self, step: int, state: Mapping[str, Any], meta: Mapping[str, Any],
           force: bool = False) -> bool:
    items = {name: ocp.args.StandardSave(tree) for name, tree in state.items() if tree is not None
             and jax.tree.leaves(tree)}
    items['meta'] = ocp.args.JsonSave(dict(meta))
    return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

  def restore_items(self, step: int, abstract_items: Mapping[str, Any]) -> dict:
    """Restore only the named array items (abstract trees carry their target shardings)."""
    args = {name: ocp.args.StandardRestore(tree) for name, tree in abstract_items.items()
            if jax.tree.leaves(tree)}
    restored = self.manager.restore(step, args=ocp.args.Composite(**args))
    return {name: restored[name] if name in args else tree for name, tree in abstract_items.items()}

  def restore_meta(self, step: int) -> dict:
    return dict(self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta'])

  def item_shapes(self, step: int, name: str):
    """{path: shape} of a saved array item, read from metadata only (no arrays are loaded)."""
    metadata = self.manager.item_metadata(step)[name]
    tree = getattr(metadata, 'tree', metadata)
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path): tuple(leaf.shape) for path, leaf in flat}

  def restore_latest(self, abstract_items: Mapping[str, Any]) -> tuple[int, dict, dict] | None:
    """Newest step that restores cleanly, falling back past unreadable ones with a warning."""
    for step in reversed(self.all_steps()):
      try:
        items = self.restore_items(step, abstract_items)
        meta = self.restore_meta(step)
        return step, items, meta
      except Exception as error:  # pylint: disable=broad-except
        # A corrupt or partial newest checkpoint must not cost the run: try the one before.
        logging.warning('Checkpoint at step %d in %s cannot be restored (%s: %s); trying the one '
                        'before.', step, self.directory, type(error).__name__, error)
    return None

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()

"""The frozen EDM teacher of a distillation run: found, checked and restored (never trained here).

The teacher is another run's Orbax checkpoint. Only its EMA params are read (never its optimizer
state); a teacher whose network or noise settings differ from the student's is refused before
anything compiles. Training a missing teacher is the train mode's job (cm_jax.modes.train).
"""

import dataclasses
import logging
import os
import shlex

import jax

from cm_jax import checkpointing, config_utils, networks, sharding
from cm_jax.errors import TeacherError

# What a teacher must share with its student: the network (up to how it is trained and computed)
# and the noise levels and preconditioning around it, on images of the same shape.
MATCHING_FIELDS = ('model', 'noise', 'data.image_size', 'data.num_channels')
IGNORED_FIELDS = tuple(f'model.{name}' for name in networks.RUNTIME_FIELDS)


@dataclasses.dataclass(frozen=True)
class TeacherRun:
  workdir: str
  latest_step: int | None  # None: no checkpoint.
  saved_config: dict | None

  @property
  def finished(self) -> bool:
    return (self.latest_step is not None and self.saved_config is not None
            and self.latest_step >= self.saved_config['training']['num_steps'])


def teacher_workdir(config, workdir: str) -> str:
  return os.path.abspath(config.teacher.workdir or os.path.join(workdir, 'teacher'))


def find(config, workdir: str) -> TeacherRun:
  """The teacher run of `config` (its workdir, newest checkpoint step and saved config)."""
  tdir = teacher_workdir(config, workdir)
  ckpt_dir = os.path.join(tdir, 'checkpoints')
  latest = None
  if os.path.isdir(ckpt_dir):
    ckpt = checkpointing.Checkpointer(ckpt_dir, read_only=True)
    try:
      latest = ckpt.latest_step()
    finally:
      ckpt.close()
  return TeacherRun(tdir, latest, config_utils.read_saved_config(tdir))


def train_command(config, tdir: str, overrides: str = '') -> str:
  cfg = config.teacher.config or '<the EDM config file>'
  return f'python launch.py --config={cfg} --workdir={tdir}{overrides}'


def check_finished(config, run: TeacherRun) -> None:
  """A teacher that stopped before its training.num_steps (preempted, killed) is refused unless
  teacher.allow_unfinished says to distil it as it is: a half-trained teacher gives a worse student
  without an error anywhere else."""
  if run.latest_step is None or run.saved_config is None or run.finished:
    return  # A teacher without its config.json (e.g. converted weights) cannot be checked.
  total = run.saved_config['training']['num_steps']
  if config.teacher.get('allow_unfinished', False):
    logging.warning('The teacher run in %s stopped at step %d of its %d; distilling it as it is '
                    '(teacher.allow_unfinished).', run.workdir, run.latest_step, total)
    return
  raise TeacherError(f'The teacher run in {run.workdir} stopped at step {run.latest_step} of its '
                     f'{total}: finish it with `{train_command(config, run.workdir)}` (or relaunch '
                     'this command with --config.teacher.train_if_missing=True), or pass '
                     '--config.teacher.allow_unfinished=True to distil it as it is.')


def _override(field: str, value) -> str:
  """A command-line override that sets `field` to `value` (lists are the config's tuples)."""
  text = repr(tuple(value)) if isinstance(value, list) else str(value)
  return f' --config.{field}={shlex.quote(text)}'


def check_fits(config, teacher_config: dict, tdir: str, what: str = '') -> None:
  """The teacher's config (saved in `tdir`, or `what` is about to be trained there) describes the
  student's network.

  The suggested command trains a teacher of the student's network into a new directory (`tdir`
  holds, or would hold, the other teacher and would refuse it).
  """
  diffs = config_utils.config_differences(teacher_config, config, ignore=IGNORED_FIELDS,
                                          only=MATCHING_FIELDS)
  if not diffs:
    return
  listed = '; '.join(f'{k}: teacher {a!r}, student {b!r}' for k, (a, b) in diffs.items())
  new_dir = _unused(tdir)
  # The command trains teacher.config: it must override where that file differs from the student
  # (which may be more than where the saved teacher does).
  trains = config_utils.load_config_file(config.teacher.config).to_dict() if (
      config.teacher.config) else teacher_config
  overrides = ''.join(_override(k, b) for k, (_, b) in config_utils.config_differences(
      trains, config, ignore=IGNORED_FIELDS, only=MATCHING_FIELDS).items())
  raise TeacherError(f'{what or f"The teacher in {tdir}"} has another architecture than this run '
                     f'({listed}). '
                     "Distil with the teacher's model config, or train a teacher of this model: "
                     f'`{train_command(config, new_dir, overrides)}`, then add '
                     f'--config.teacher.workdir={new_dir} to this command.')


def _unused(path: str) -> str:
  """`path`_2 (or _3, ...): a directory that does not exist yet."""
  n = 2
  while os.path.exists(f'{path}_{n}'):
    n += 1
  return f'{path}_{n}'


def check_usable(config, run: TeacherRun) -> None:
  """A teacher checkpoint exists and its config describes the student's network."""
  if run.latest_step is None:
    raise TeacherError(f'No EDM teacher checkpoint in {run.workdir}. Train the teacher first: '
                       f'`{train_command(config, run.workdir)}`, or point --config.teacher.workdir at '
                       'a finished EDM run (or set --config.teacher.train_if_missing=True).')
  saved = run.saved_config
  if saved is None:
    return
  if saved.get('method') != 'edm':
    raise TeacherError(f'{run.workdir} holds a {saved.get("method")!r} run, not an EDM teacher. Point '
                       'teacher.workdir at an EDM run.')
  check_fits(config, saved, run.workdir)


def load_params(config, workdir: str, abstract_params, mesh: jax.sharding.Mesh,
                online: bool = False):
  """The teacher's EMA params (teacher.ema_index) or, `online`, its online params, sharded like
  `abstract_params` on `mesh`."""
  run = find(config, workdir)
  check_usable(config, run)
  ckpt = checkpointing.Checkpointer(os.path.join(run.workdir, 'checkpoints'), read_only=True)
  try:
    step = run.latest_step
    index = config.teacher.ema_index
    saved_shapes = ckpt.item_shapes(step, 'ema_params')
    num_ema = len({k.split(']')[0] for k in saved_shapes})
    if not 0 <= index < num_ema:
      raise TeacherError(f'teacher.ema_index={index} but the teacher in {run.workdir} keeps '
                         f'{num_ema} EMA copies.')
    ours = {jax.tree_util.keystr(path): tuple(leaf.shape)
            for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_params)[0]}
    theirs = {k[len(f'[{index}]'):]: v for k, v in saved_shapes.items()
              if k.startswith(f'[{index}]')}
    if ours != theirs:
      mismatched = sorted(set(ours.items()) ^ set(theirs.items()))[:6]
      raise TeacherError(f'The teacher checkpoint in {run.workdir} does not fit this run\'s network '
                         f'(first differences: {mismatched}). Use the teacher\'s model config.')
    abstract = checkpointing.with_shardings(abstract_params,
                                            sharding.tree_shardings(abstract_params, mesh))
    if online:
      params = ckpt.restore_items(step, {'params': abstract})['params']
      logging.info('Teacher: online params of %s at step %d.', run.workdir, step)
    else:
      params = ckpt.restore_items(step, {'ema_params': tuple(abstract for _ in range(num_ema))}
                                  )['ema_params'][index]
      logging.info('Teacher: EMA copy %d of %s at step %d.', index, run.workdir, step)
  finally:
    ckpt.close()  # Also on the errors above: an open manager's threads outlive their event loop.
  return params

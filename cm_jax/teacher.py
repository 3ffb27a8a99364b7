"""The frozen EDM teacher of a consistency-distillation run: found, checked, trained if asked, restored.

The teacher is another run's Orbax checkpoint. Only its EMA params are read (never its optimizer
state); a teacher whose architecture differs from the student's is refused before anything compiles.
"""

import logging
import os

import jax

from cm_jax import checkpointing, config_utils, sharding
from cm_jax.errors import TeacherError

# Model fields that change the network's parameters or its function.
ARCHITECTURE_FIELDS = ('name', 'nf', 'ch_mult', 'num_res_blocks', 'attn_resolutions',
                       'resamp_with_conv', 'fir', 'fir_kernel', 'skip_rescale', 'resblock_type',
                       'progressive', 'progressive_input', 'progressive_combine', 'embedding_type',
                       'fourier_scale', 'conv_size', 'num_classes', 'noise_cond_scale')
ADM_FIELDS = ('num_heads', 'num_head_channels', 'num_heads_upsample', 'use_scale_shift_norm',
              'resblock_updown', 'use_new_attention_order')


def teacher_workdir(config, workdir: str) -> str:
  return os.path.abspath(config.teacher.workdir or os.path.join(workdir, 'teacher'))


def _train_command(config, tdir: str) -> str:
  cfg = config.teacher.config or '<the EDM config file>'
  return f'python launch.py --config={cfg} --workdir={tdir}'


def ensure_trained(config, workdir: str) -> str:
  """The teacher's workdir, training the teacher first when asked and it is missing or unfinished."""
  tdir = teacher_workdir(config, workdir)
  ckpt_dir = os.path.join(tdir, 'checkpoints')
  latest = None
  if os.path.isdir(ckpt_dir):
    latest = checkpointing.Checkpointer(ckpt_dir, read_only=True).latest_step()
  saved = config_utils.read_saved_config(tdir)
  finished = latest is not None and saved is not None and latest >= saved['training']['num_steps']
  if finished:
    return tdir
  if config.teacher.train_if_missing:
    if not config.teacher.config:
      raise TeacherError('teacher.train_if_missing=True needs teacher.config (the EDM config file).')
    teacher_config = config_utils.load_config_file(config.teacher.config)
    teacher_config.mesh = config.mesh  # The teacher trains on the same devices.
    if saved is not None:
      teacher_config.allow_other_config = False
    logging.info('Training the EDM teacher into %s (config %s) first.', tdir, config.teacher.config)
    from cm_jax import run  # Imported here: run imports this module.
    run.train_and_finish(teacher_config, tdir)
    return tdir
  if latest is None:
    raise TeacherError(f'No EDM teacher checkpoint in {tdir}. Train the teacher first: '
                       f'`{_train_command(config, tdir)}`, or point --config.teacher.workdir at a '
                       'finished EDM run (or set --config.teacher.train_if_missing=True).')
  logging.warning('The teacher run in %s is unfinished (step %d); distilling it anyway.', tdir, latest)
  return tdir


def check_architecture(config, tdir: str) -> None:
  saved = config_utils.read_saved_config(tdir)
  if saved is None:
    return
  if saved.get('method') != 'edm':
    raise TeacherError(f'{tdir} holds a {saved.get("method")!r} run, not an EDM teacher. Point '
                       'teacher.workdir at an EDM run.')
  diffs = []
  fields = ARCHITECTURE_FIELDS + (ADM_FIELDS if config.model.name == 'adm' else ())
  for field in fields:
    theirs = saved['model'].get(field)
    ours = config.model.get(field)
    ours = list(ours) if isinstance(ours, tuple) else ours
    if theirs != ours:
      diffs.append(f'model.{field}: teacher {theirs!r}, student {ours!r}')
  for field in ('image_size', 'num_channels'):
    if saved['data'].get(field) != config.data[field]:
      diffs.append(f'data.{field}: teacher {saved["data"].get(field)!r}, student {config.data[field]!r}')
  if diffs:
    raise TeacherError(f'The teacher in {tdir} has another architecture than this run ('
                       + '; '.join(diffs) + '). Distil with the teacher\'s model config, or train a '
                       f'teacher for this one: `{_train_command(config, tdir)}`.')


def load_teacher(config, workdir: str, exp):
  """Teacher EMA params, sharded like the student's params; trained first if configured."""
  tdir = ensure_trained(config, workdir)
  check_architecture(config, tdir)
  ckpt = checkpointing.Checkpointer(os.path.join(tdir, 'checkpoints'), read_only=True)
  step = ckpt.latest_step()
  index = config.teacher.ema_index
  saved_shapes = ckpt.item_shapes(step, 'ema_params')
  num_ema = len({k.split(']')[0] for k in saved_shapes})
  if not 0 <= index < num_ema:
    raise TeacherError(f'teacher.ema_index={index} but the teacher in {tdir} keeps {num_ema} EMA '
                       'copies.')
  params_abstract = exp.abstract_state.params
  ours = {k: tuple(v.shape) for k, v in
          ((jax.tree_util.keystr(p), leaf) for p, leaf in
           jax.tree_util.tree_flatten_with_path(params_abstract)[0])}
  theirs = {k[len(f'[{index}]'):]: v for k, v in saved_shapes.items() if k.startswith(f'[{index}]')}
  if ours != theirs:
    mismatched = sorted(set(ours.items()) ^ set(theirs.items()))[:6]
    raise TeacherError(f'The teacher checkpoint in {tdir} does not fit this run\'s network '
                       f'(first differences: {mismatched}). Use the teacher\'s model config.')
  shardings = sharding.tree_shardings(params_abstract, exp.mesh)
  abstract = checkpointing.with_shardings(params_abstract, shardings)
  items = ckpt.restore_items(step, {'ema_params': tuple(abstract for _ in range(num_ema))})
  ckpt.close()
  logging.info('Teacher: EMA copy %d of %s at step %d.', index, tdir, step)
  return items['ema_params'][index]

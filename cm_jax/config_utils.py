"""Config loading, validation and the workdir's record of the config that created it.

Everything here runs before anything is compiled, so a bad value costs seconds, not a compile.
"""

import importlib.util
import json
import math
import os
import re

import ml_collections

from cm_jax.errors import ConfigError, WorkdirError

CHOICES = {
    'method': ('edm', 'cd', 'ct'),
    'model.name': ('ncsnpp', 'adm'),
    'model.dtype': ('float32', 'bfloat16'),
    'consistency.scale_schedule': ('fixed', 'ct', 'ict'),
    'consistency.target_ema_schedule': ('fixed', 'ct'),
    'consistency.distance': ('l2', 'l1', 'pseudo_huber', 'lpips'),
    'consistency.weighting': ('uniform', 'ict'),
    'consistency.noise_sampling': ('uniform', 'lognormal'),
    'consistency.teacher_solver': ('heun', 'euler'),
    'training.optimizer': ('adam', 'radam'),
    'training.lr_decay': ('constant', 'cosine'),
}

# Fields that may change between launches of the same run without making it another run.
RESUMABLE_CHANGES = ('training.num_steps', 'training.log_every', 'training.checkpoint_every',
                     'training.keep_checkpoints', 'training.sample_every',
                     'training.num_grid_samples', 'training.final_samplers', 'sampling', 'eval',
                     'edit',
                     'mesh', 'data.data_dir', 'teacher.train_if_missing', 'teacher.workdir',
                     'teacher.config', 'allow_other_config')


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """Load `path.py` or `path.py:arg` the way --config does (get_config() or get_config(arg))."""
  path, _, arg = spec.partition(':')
  if not os.path.exists(path):
    raise ConfigError(f'Config file {path!r} does not exist (paths are relative to the current '
                      f'directory {os.getcwd()}).')
  module_spec = importlib.util.spec_from_file_location('_cm_jax_config', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def check_override_keys(config: ml_collections.ConfigDict, dotted_keys) -> None:
  """Raise ConfigError naming the valid keys for the first override path the config lacks."""
  for dotted in dotted_keys:
    node, walked = config, []
    for part in dotted.split('.'):
      if not isinstance(node, (dict, ml_collections.ConfigDict)) or part not in node:
        where = '.'.join(walked) or 'the config'
        valid = sorted(node.keys()) if isinstance(node, (dict, ml_collections.ConfigDict)) else []
        hint = f'valid keys of {where}: {", ".join(valid)}' if valid else f'{where} is not a section'
        raise ConfigError(f'--config.{dotted}: there is no {part!r} in {where} ({hint}).')
      node = node[part]
      walked.append(part)


def _get(config, dotted: str):
  value = config
  for part in dotted.split('.'):
    value = value[part]
  return value


def check_local_dir(path: str, what: str = '--workdir') -> None:
  """Refuse URL paths (gs://, s3://, ...): run directories are written with local file operations."""
  if re.match(r'^[A-Za-z][A-Za-z0-9+.-]*://', path or ''):
    raise WorkdirError(f'{what}={path}: URL paths are not supported for run directories yet (they '
                       'would be written to a local folder named after the scheme). Use a path on a '
                       'filesystem that every host mounts (NFS, Filestore, or the bucket through '
                       'gcsfuse, e.g. /gcs/<bucket>/runs/...).')


def validate(config: ml_collections.ConfigDict) -> None:
  """Raise ConfigError, naming the field and the valid values, for anything the run cannot use."""
  for key, choices in CHOICES.items():
    value = _get(config, key)
    if value not in choices:
      raise ConfigError(f'{key}={value!r} is not one of {", ".join(map(repr, choices))}.')
  t, m, c = config.training, config.model, config.consistency
  if t.batch_size < 1 or t.num_steps < 0:
    raise ConfigError('training.batch_size must be >= 1 and training.num_steps >= 0.')
  for decay in t.ema_decays:
    if not 0.0 <= decay < 1.0:
      raise ConfigError(f'training.ema_decays={tuple(t.ema_decays)}: each decay must be in [0, 1).')
  if not 0 < m.sigma_min < m.sigma_max:
    raise ConfigError(f'model.sigma_min={m.sigma_min} and sigma_max={m.sigma_max} must satisfy '
                      '0 < sigma_min < sigma_max.')
  if config.method in ('cd', 'ct'):
    if c.scale_schedule == 'fixed' and c.num_scales < 2:
      raise ConfigError(f'consistency.num_scales={c.num_scales} must be >= 2.')
    if c.scale_schedule != 'fixed' and not 1 <= c.start_scales <= c.end_scales:
      raise ConfigError(f'consistency.start_scales={c.start_scales} and end_scales={c.end_scales} '
                        'must satisfy 1 <= start_scales <= end_scales.')
    if c.target_ema_schedule == 'ct' and not 0.0 < c.target_ema < 1.0:
      raise ConfigError(f'consistency.target_ema={c.target_ema} must be in (0, 1) with the CT '
                        'schedule (mu0).')
    if not 0.0 <= c.target_ema < 1.0:
      raise ConfigError(f'consistency.target_ema={c.target_ema} must be in [0, 1).')
  if config.method == 'cd' and not config.teacher.config and not config.teacher.workdir:
    raise ConfigError('A cd run needs its teacher: set teacher.config (the EDM config file) and/or '
                      'teacher.workdir (a finished EDM run).')
  if config.data.image_size < 1 or config.data.num_channels not in (1, 3):
    raise ConfigError(f'data.image_size={config.data.image_size} and data.num_channels='
                      f'{config.data.num_channels}: need a positive size and 1 or 3 channels.')
  if not math.isfinite(t.lr) or t.lr <= 0:
    raise ConfigError(f'training.lr={t.lr} must be a positive number.')
  if not 0.0 <= t.lr_end_factor <= 1.0:
    raise ConfigError(f'training.lr_end_factor={t.lr_end_factor} must be in [0, 1] (a fraction of '
                      'training.lr).')
  check_local_dir(config.teacher.workdir, '--config.teacher.workdir')


def _flatten(config, prefix: str = '') -> dict:
  flat = {}
  for key, value in config.items():
    name = f'{prefix}{key}'
    if isinstance(value, (dict, ml_collections.ConfigDict)):
      flat.update(_flatten(value, name + '.'))
    else:
      flat[name] = list(value) if isinstance(value, tuple) else value
  return flat


def config_differences(saved: dict, config: ml_collections.ConfigDict, ignore=RESUMABLE_CHANGES):
  """{field: (saved, now)} for the fields that make a different run."""
  now = _flatten(config)
  saved = _flatten(saved)
  ignored = lambda k: any(k == p or k.startswith(p + '.') for p in ignore)
  # A field the saved run does not have was added to cm_jax later: its default keeps the old
  # behaviour, so only fields both configs have are compared.
  return {k: (saved[k], now.get(k)) for k in sorted(saved)
          if not ignored(k) and saved[k] != now.get(k)}


def config_path(workdir: str) -> str:
  return os.path.join(workdir, 'config.json')


def read_saved_config(workdir: str) -> dict | None:
  path = config_path(workdir)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def check_workdir(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Refuse to resume a workdir that holds a run of another config, unless told to."""
  saved = read_saved_config(workdir)
  if saved is None or config.get('allow_other_config', False):
    return
  ignore = RESUMABLE_CHANGES
  curriculum = config.method in ('cd', 'ct') and config.consistency.scale_schedule != 'fixed'
  if curriculum or config.training.lr_decay == 'cosine':
    # N(k) of the CT and iCT curricula and the cosine learning rate depend on the total step count
    # K: changing it mid-run would change the schedule of the steps still to come.
    ignore = tuple(k for k in ignore if k != 'training.num_steps')
  diffs = config_differences(saved, config, ignore)
  if diffs:
    listed = '; '.join(f'{k}: {a!r} in the workdir, {b!r} now' for k, (a, b) in diffs.items())
    raise WorkdirError(f'{workdir} holds a run of another config ({listed}). Use a new --workdir, or '
                       'pass --config.allow_other_config=True to continue this run with the new '
                       'values.')


def save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  os.makedirs(workdir, exist_ok=True)
  tmp = config_path(workdir) + '.tmp'
  with open(tmp, 'w') as f:
    f.write(config.to_json_best_effort(indent=2, sort_keys=True))
  os.replace(tmp, config_path(workdir))

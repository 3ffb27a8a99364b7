"""Config loading, validation and the workdir's record of the config that created it.

Everything here runs before anything is compiled, so a bad value costs seconds, not a compile.
"""

import importlib.util
import inspect
import json
import math
import os
import re

import ml_collections

from cm_jax import files, trigflow
from cm_jax.errors import ConfigError, WorkdirError, choose

# Fields that moved to another block: their old dotted name -> the new one. Saved configs of older
# runs are read with them moved (`migrate`), and an override of an old name says where it went.
MOVED_FIELDS = {f'model.{name}': f'noise.{name}'
                for name in ('sigma_min', 'sigma_max', 'sigma_data', 'rho', 'noise_cond_scale')}

# Fields that may change between launches of the same run without making it another run.
RESUMABLE_CHANGES = ('training.num_steps', 'training.log_every', 'training.checkpoint_every',
                     'training.keep_checkpoints', 'training.sample_every',
                     'training.num_grid_samples', 'training.final_samplers', 'sampling', 'eval',
                     'edit',
                     'mesh', 'data.data_dir', 'data.loader', 'teacher.train_if_missing',
                     'teacher.workdir', 'teacher.config', 'teacher.allow_unfinished',
                     'allow_other_config')


def check_config_file(spec: str) -> None:
  """Raise ConfigError when the file of `path.py[:variant]` is not there (without running it)."""
  path = spec.partition(':')[0]
  if not os.path.isfile(path):
    what = 'is a directory' if os.path.isdir(path) else 'does not exist'
    raise ConfigError(f'Config file {path!r} {what} (paths are relative to the current directory '
                      f'{os.getcwd()}): pass a .py file of configs/, e.g. '
                      '--config=configs/digits_cd.py.')


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """Load `path.py` or `path.py:arg` the way --config does (get_config() or get_config(arg))."""
  check_config_file(spec)
  path, _, arg = spec.partition(':')
  module_spec = importlib.util.spec_from_file_location('_cm_jax_config', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not arg:
    return module.get_config()
  try:
    inspect.signature(module.get_config).bind(arg)
  except TypeError:
    raise ConfigError(f'{path} has no variants (its get_config takes no argument): use '
                      f'--config={path} without ":{arg}".') from None
  return module.get_config(arg)


def check_override_keys(config: ml_collections.ConfigDict, dotted_keys) -> None:
  """Raise ConfigError naming the valid keys for the first override path the config lacks."""
  for dotted in dotted_keys:
    if dotted in MOVED_FIELDS:
      raise ConfigError(f'--config.{dotted}: this field is now --config.{MOVED_FIELDS[dotted]}.')
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
  """Raise ConfigError, naming the field, for settings no run can use.

  Named choices (method, network, distance, schedules, optimizer, ...) are checked where they are
  looked up, when the experiment is built; a method checks its own section (`Method.check_config`).
  """
  t, n = config.training, config.noise
  if t.batch_size < 1 or t.num_steps < 0:
    raise ConfigError('training.batch_size must be >= 1 and training.num_steps >= 0.')
  for decay in t.ema_decays:
    if not 0.0 <= decay < 1.0:
      raise ConfigError(f'training.ema_decays={tuple(t.ema_decays)}: each decay must be in [0, 1).')
  if not 0 < n.sigma_min < n.sigma_max < math.inf:
    raise ConfigError(f'noise.sigma_min={n.sigma_min} and sigma_max={n.sigma_max} must satisfy '
                      '0 < sigma_min < sigma_max < inf.')
  # sigma_data divides in the preconditioning and the EDM loss weight, rho in the Karras grid's
  # exponents: 0 gives NaN or inf in the first step, which would surface only as a non-finite loss
  # after compiling.
  for name in ('sigma_data', 'rho'):
    if not (isinstance(n[name], (int, float)) and math.isfinite(n[name]) and n[name] > 0):
      raise ConfigError(f'noise.{name}={n[name]} must be a positive number.')
  if not math.isfinite(n.noise_cond_scale):
    raise ConfigError(f'noise.noise_cond_scale={n.noise_cond_scale} must be a finite number.')
  choose(dict.fromkeys(trigflow.TIME_CONDITIONINGS), n.get('time_conditioning', 'log_sigma'),
         'noise.time_conditioning')
  if config.data.image_size < 1 or config.data.num_channels not in (1, 3):
    raise ConfigError(f'data.image_size={config.data.image_size} and data.num_channels='
                      f'{config.data.num_channels}: need a positive size and 1 or 3 channels.')
  if not math.isfinite(t.lr) or t.lr <= 0:
    raise ConfigError(f'training.lr={t.lr} must be a positive number.')
  if not 0.0 <= t.lr_end_factor <= 1.0:
    raise ConfigError(f'training.lr_end_factor={t.lr_end_factor} must be in [0, 1] (a fraction of '
                      'training.lr).')
  check_local_dir(config.teacher.workdir, '--config.teacher.workdir')


def eval_samplers(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The sampler names --mode=eval scores (eval.samplers, else sampling.sampler; '' is the method's
  default)."""
  if isinstance(config.eval.samplers, str):
    raise ConfigError(f'eval.samplers={config.eval.samplers!r} must be a tuple, e.g. '
                      "--config.eval.samplers=\"('onestep', 'multistep')\".")
  # 'a,b' (what --config.eval.samplers=a,b gives) is read as two names.
  names = tuple(n.strip() for name in config.eval.samplers for n in name.split(','))
  return names or (config.sampling.sampler,)


def _flatten(config, prefix: str = '') -> dict:
  flat = {}
  for key, value in config.items():
    name = f'{prefix}{key}'
    if isinstance(value, (dict, ml_collections.ConfigDict)):
      flat.update(_flatten(value, name + '.'))
    else:
      flat[name] = list(value) if isinstance(value, tuple) else value
  return flat


def config_differences(saved: dict, config: ml_collections.ConfigDict, ignore=RESUMABLE_CHANGES,
                       only: tuple[str, ...] | None = None) -> dict:
  """{field: (saved, now)} for the fields that make a different run.

  `ignore` and `only` are dotted names or prefixes (blocks such as 'model'); `only` limits the
  comparison to those fields.
  """
  now = _flatten(config)
  saved = _flatten(migrate(saved))
  under = lambda k, prefixes: any(k == p or k.startswith(p + '.') for p in prefixes)
  # A field the saved run does not have was added to cm_jax later: its default keeps the old
  # behaviour, so only fields both configs have are compared.
  return {k: (saved[k], now.get(k)) for k in sorted(saved)
          if not under(k, ignore) and (only is None or under(k, only)) and saved[k] != now.get(k)}


def migrate(saved: dict) -> dict:
  """A saved config (a dict from config.json) with MOVED_FIELDS in their current places."""
  saved = {k: dict(v) if isinstance(v, dict) else v for k, v in saved.items()}
  for old, new in MOVED_FIELDS.items():
    old_block, old_name = old.split('.')
    new_block, new_name = new.split('.')
    if old_name in saved.get(old_block, {}):
      saved.setdefault(new_block, {}).setdefault(new_name, saved[old_block].pop(old_name))
  return saved


def config_path(workdir: str) -> str:
  return os.path.join(workdir, 'config.json')


def read_saved_config(workdir: str) -> dict | None:
  path = config_path(workdir)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return migrate(json.load(f))


def check_workdir(config: ml_collections.ConfigDict, workdir: str,
                  schedule_needs_num_steps: bool = False) -> None:
  """Refuse to resume a workdir that holds a run of another config, unless told to.

  `schedule_needs_num_steps`: the method's schedule (e.g. the CT and iCT curricula N(k)) depends on
  the total step count K, so changing training.num_steps mid-run is another run.
  """
  saved = read_saved_config(workdir)
  if saved is None or config.get('allow_other_config', False):
    return
  ignore = RESUMABLE_CHANGES
  if schedule_needs_num_steps or config.training.lr_decay == 'cosine':
    # The cosine learning rate depends on K too: changing it would change the steps still to come.
    ignore = tuple(k for k in ignore if k != 'training.num_steps')
  diffs = config_differences(saved, config, ignore)
  if diffs:
    listed = '; '.join(f'{k}: {a!r} in the workdir, {b!r} now' for k, (a, b) in diffs.items())
    raise WorkdirError(f'{workdir} holds a run of another config ({listed}). Use a new --workdir, or '
                       'pass --config.allow_other_config=True to continue this run with the new '
                       'values.')


def save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  files.atomic_write(config_path(workdir), lambda f: f.write(
      config.to_json_best_effort(indent=2, sort_keys=True)))

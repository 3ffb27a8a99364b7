"""`launch.py --mode=train`: train or resume, then write final samples and metrics; shared helpers."""

import json
import logging
import os

import jax
import ml_collections

from cm_jax import checkpointing, train
from cm_jax.errors import ConfigError


def sampler_names(exp: train.Experiment, names) -> list[str]:
  return [name or exp.method.default_sampler() for name in names]


def samples_dir(workdir: str, sampler: str, nfe: int) -> str:
  return os.path.join(workdir, 'samples', f'{sampler}_nfe{nfe}')


def digits_metric_fn(config):
  """The digits metric when the run is on the embedded dataset, else None."""
  if config.data.name != 'sklearn_digits':
    return None
  from cm_jax.evaluation import digits_metric
  return digits_metric.DigitsMetric(config.data)


def write_metrics(workdir: str, name: str, metrics: dict) -> str:
  """Merge `metrics` under `name` into <workdir>/metrics.json (atomic replace)."""
  path = os.path.join(workdir, 'metrics.json')
  existing = {}
  if os.path.exists(path):
    with open(path) as f:
      existing = json.load(f)
  existing[name] = metrics
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(existing, f, indent=2, sort_keys=True)
  os.replace(tmp, path)
  return path


def generate(exp: train.Experiment, state: train.TrainState, frozen: dict, sampler: str,
             num_samples: int, writer=None, step: int = 0, metric=None) -> dict:
  """Sample, write the npz and a grid under the workdir, and score with `metric` if given."""
  s = exp.config.sampling
  params = frozen['teacher_params'] if sampler == 'teacher_heun' else train.eval_params(
      state, s.ema_index)
  batch = min(s.batch_size, num_samples)
  images, labels, nfe = train.sample_images(exp, params, sampler, num_samples, s.seed, batch)
  out_dir = samples_dir(exp.workdir, sampler, nfe)
  result = {'sampler': sampler, 'nfe': nfe, 'num_samples': int(images.shape[0])}
  if jax.process_index() == 0:
    result['npz'] = train.write_samples(out_dir, images, labels)
    grid = train.image_grid(images[:exp.config.training.num_grid_samples])
    result['grid'] = os.path.join(out_dir, 'grid.png')
    train.save_png(result['grid'], grid, train.upscale_for(exp.config.data.image_size))
    if writer is not None:
      writer.write_images(step, {f'samples/{sampler}_nfe{nfe}': grid[None]})
  if metric is not None:
    scores = metric(images)
    result.update({k: float(v) for k, v in scores.items()})
    if writer is not None:
      writer.write_scalars(step, {f'{sampler}_nfe{nfe}/{k}': float(v) for k, v in scores.items()})
  if jax.process_index() == 0:
    write_metrics(exp.workdir, f'{sampler}_nfe{nfe}', result)
  logging.info('Samples: %s', result)
  return result


def train_and_finish(config: ml_collections.ConfigDict, workdir: str, load_lpips=None) -> dict:
  """Train or resume the run, then write the final samples, grids and metrics."""
  out = train.train_and_evaluate(config, workdir, load_lpips)
  if out['preempted']:
    return out
  exp, state, frozen, writer = out['experiment'], out['state'], out['frozen'], out['writer']
  metric = digits_metric_fn(config)
  results = {}
  for sampler in sampler_names(exp, config.training.final_samplers):
    results[sampler] = generate(exp, state, frozen, sampler, config.sampling.num_samples, writer,
                                out['step'], metric)
  writer.flush()
  out['samples'] = results
  return out


def restore_for_sampling(config: ml_collections.ConfigDict, workdir: str):
  """The experiment, its newest state and frozen inputs, without training."""
  exp = train.build_experiment(config, workdir)
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(ckpt_dir):
    raise ConfigError(f'No checkpoints in {workdir}: train first with '
                      f'`python launch.py --config=<config> --workdir={workdir}`.')
  ckpt = checkpointing.Checkpointer(ckpt_dir, read_only=True)
  abstract = checkpointing.with_shardings(exp.abstract_state, exp.state_shardings)
  items = {'params': abstract.params, 'ema_params': abstract.ema_params}
  restored = ckpt.restore_latest(items)
  if restored is None:
    raise ConfigError(f'No restorable checkpoint in {ckpt_dir}.')
  step, items, _ = restored
  ckpt.close()
  state = train.TrainState(items['params'], None, items['ema_params'], {})
  frozen = {}
  if config.method == 'cd' and config.sampling.sampler == 'teacher_heun':
    from cm_jax import teacher
    frozen['teacher_params'] = teacher.load_teacher(config, workdir, exp)
  return exp, state, frozen, step

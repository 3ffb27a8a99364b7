r"""`--mode=sample`: samples of a trained run, sharded over every device and process.

  python launch.py --config=configs/digits_cd.py --workdir=runs/digits --mode=sample
  python launch.py --config=configs/digits_cd.py --workdir=runs/digits --mode=sample \
      --config.sampling.sampler=onestep
  python launch.py --config=configs/digits_cd.py --workdir=runs/digits --mode=sample \
      --config.sampling.ts="(0, 5, 17)"              # or --config.sampling.sigmas="(80.0, 0.8)"
  python launch.py --config=configs/digits_cd.py --workdir=runs/digits --mode=sample \
      --config.sampling.sampler=teacher_heun        # the CD run's EDM teacher, 35 NFE
  python launch.py --config=configs/digits_cd.py --workdir=runs/digits --mode=sample \
      --config.sampling.search_steps=2              # greedy ternary search of the time points first

Samplers: 'onestep' and 'multistep' (CM Alg. 1; consistency runs), 'heun' and 'euler' (EDM runs) and
'teacher_heun' (a CD run's teacher). N samples go to
<workdir>/samples/<sampler>_nfe<k>/samples_{N}x{H}x{W}x{C}.npz (arr_0 uint8 NHWC, arr_1 labels when
class-conditional) with a grid.png beside it, and the digits metric (on the embedded dataset) to
<workdir>/metrics.json. Batch b draws its noise from fold_in(PRNGKey(sampling.seed), b), padded to a
multiple of the devices by rows that are dropped: a seed gives the same samples on any number of
devices and processes.

The search (CM paper, Sec. 6) finds 2-step time points by ternary search of the index on the N-grid
that minimises sampling.search_metric over sampling.search_num_samples samples, then the 3rd, ... up to
sampling.search_steps steps, and samples with them as 'multistep_searched'.
"""

import copy
import json
import logging
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cm_jax import config_utils, consistency, run, sampling, train
from cm_jax.errors import ConfigError

SEARCHED = 'multistep_searched'


def check_sampling_batch(batch_size: int, num: int, what: str = 'sampling') -> None:
  if batch_size < 1 or num < 1:
    raise ConfigError(f'{what}.batch_size={batch_size} and {what}.num_samples={num} must be >= 1.')


def write_outputs(workdir: str, name: str, nfe: int, images: np.ndarray, labels, config,
                  extra: dict | None = None, metric=None) -> dict:
  """samples/<name>_nfe<k>/samples_*.npz and grid.png (process 0), metrics.json entry, scores."""
  out_dir = run.samples_dir(workdir, name, nfe)
  result = {'sampler': name, 'nfe': nfe, 'num_samples': int(images.shape[0]), **(extra or {})}
  if metric is not None:
    result.update({k: (int(v) if isinstance(v, (int, np.integer)) else float(v))
                   for k, v in metric(images).items()})
  if jax.process_index() == 0:
    result['npz'] = train.write_samples(out_dir, images, labels)
    grid = train.image_grid(images[:config.training.num_grid_samples])
    result['grid'] = os.path.join(out_dir, 'grid.png')
    train.save_png(result['grid'], grid, train.upscale_for(config.data.image_size))
    run.write_metrics(workdir, f'{name}_nfe{nfe}', result)
  logging.info('Samples: %s', result)
  return result


# --------------------------------------------------------------------------------------------------
# The metric of the time-point search.
# --------------------------------------------------------------------------------------------------
def search_metric_fn(config: ml_collections.ConfigDict, workdir: str) -> Callable[[np.ndarray], float]:
  """images (uint8 NHWC) -> sampling.search_metric (lower is better), built before anything samples."""
  name = config.sampling.search_metric
  if name.startswith('digits_'):
    metric = run.digits_metric_fn(config)
    if metric is None:
      raise ConfigError(f'sampling.search_metric={name!r} is for the embedded digits dataset; use '
                        "'fid' for other datasets.")
    keys = ('digits_fd',)
    if name not in keys:
      raise ConfigError(f'sampling.search_metric={name!r}: lower-is-better digits metrics are {keys}.')
    return lambda images: float(metric(images)[name])
  if name == 'fid':
    from cm_jax import evaluate  # pylint: disable=g-import-not-at-top
    from cm_jax.evaluation import inception as inception_lib  # pylint: disable=g-import-not-at-top
    from cm_jax.evaluation import metrics  # pylint: disable=g-import-not-at-top
    weights = evaluate.inception_path(config)
    inception = inception_lib.load_inception(weights)  # Says how to get the weights if missing.
    reference = evaluate.reference_stats(config, workdir, inception, inception_lib.sha256_of_file(weights))

    def fid(images):
      pool = evaluate.sample_features(inception, images, config.eval.inception_batch_size)['pool']
      return float(metrics.frechet_distance(*metrics.feature_stats(pool), reference['mu'],
                                            reference['sigma']))
    return fid
  raise ConfigError(f"sampling.search_metric={name!r} is unknown: use 'digits_fd' (digits) or 'fid'.")


def time_search(exp: train.Experiment, params, score_fn: Callable[[np.ndarray], float],
                num_steps: int, num_samples: int, seed: int, batch_size: int,
                ) -> tuple[tuple[int, ...], dict[tuple[int, ...], float]]:
  """Greedy ternary search of `num_steps`-step time points of a consistency run (CM paper, Sec. 6).

  Every candidate samples with the same seed (common random numbers), and all share one compiled
  sampler: the sigmas are an argument, not constants.
  """
  config = exp.config
  num_scales = consistency.max_num_scales(config.consistency, config.training.num_steps)
  m = config.model

  def sample_fn(packed, rng, labels, shape):
    model_params, sigmas = packed
    return sampling.multistep_sample(exp.model.consistency_fn(model_params, labels), rng, shape,
                                     sigmas, m.sigma_min)

  sampler = train.ShardedSampler(sample_fn, exp.mesh, exp.image_shape, batch_size, m.num_classes)
  grid = np.asarray(sampling.sigmas_from_indices(range(num_scales), num_scales, m), np.float32)

  def score(ts):
    # The trailing N-1 (eps) costs nothing (Alg. 1 skips it), so it is left out of the sigmas.
    sigmas = jnp.asarray(grid[list(ts[:-1])])
    images, _ = sampler((params, sigmas), num_samples, seed)
    return score_fn(images)
  return sampling.greedy_time_search(score, num_scales, num_steps)


# --------------------------------------------------------------------------------------------------
# The mode.
# --------------------------------------------------------------------------------------------------
def restore_config(config: ml_collections.ConfigDict, workdir: str, needs_teacher: bool
                   ) -> ml_collections.ConfigDict:
  """A copy to restore the run with: sampling never trains a teacher or loads LPIPS weights."""
  config = copy.deepcopy(config)
  with config.unlocked():
    config.teacher.train_if_missing = False
    if needs_teacher and not config.teacher.workdir:
      saved = config_utils.read_saved_config(workdir) or {}
      config.teacher.workdir = saved.get('teacher', {}).get('workdir', '')
    if config.consistency.distance == 'lpips':
      config.consistency.distance = 'l2'
  return config


def restore(config: ml_collections.ConfigDict, workdir: str, needs_teacher: bool = False):
  """(experiment, state, frozen, step) of a trained run; the teacher's params too when asked."""
  exp, state, frozen, step = run.restore_for_sampling(restore_config(config, workdir, needs_teacher),
                                                      workdir)
  if needs_teacher and 'teacher_params' not in frozen:
    from cm_jax import teacher  # pylint: disable=g-import-not-at-top
    frozen['teacher_params'] = teacher.load_teacher(exp.config, workdir, exp)
  return exp, state, frozen, step


def sample(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Sample the run in `workdir` as config.sampling says (after the time search, if asked).

  Returns:
    {'sampler', 'nfe', 'num_samples', 'npz', 'grid', metric values...} and, after a search,
    'ts', 'sigmas' and 'search_scores'.
  """
  workdir = os.path.abspath(workdir)
  s = config.sampling
  check_sampling_batch(s.batch_size, s.num_samples)
  searching = s.search_steps > 0
  if searching and config.method not in ('cd', 'ct'):
    raise ConfigError(f'sampling.search_steps={s.search_steps} searches consistency-model time points; '
                      f'this is a {config.method} run. Leave search_steps at 0.')
  sampler_name = s.sampler or ('heun' if config.method == 'edm' else 'multistep')
  if searching and sampler_name != 'multistep':
    raise ConfigError(f'sampling.search_steps={s.search_steps} searches the time points of the '
                      f"'multistep' sampler, not of sampling.sampler={s.sampler!r}.")
  if searching:
    score_fn = search_metric_fn(config, workdir)  # Fails now, not after the samples, if unusable.
  exp, state, frozen, step = restore(config, workdir, sampler_name == 'teacher_heun')
  params = (frozen['teacher_params'] if sampler_name == 'teacher_heun'
            else train.eval_params(state, s.ema_index))
  metric = run.digits_metric_fn(config)
  m = config.model
  extra = {'step': step}
  if searching:
    start = time.time()
    search_batch = min(s.batch_size, s.search_num_samples)
    ts, scores = time_search(exp, params, score_fn, s.search_steps, s.search_num_samples, s.seed,
                             search_batch)
    num_scales = consistency.max_num_scales(config.consistency, config.training.num_steps)
    sigmas = sampling.sigmas_from_indices(ts, num_scales, m)
    extra.update(ts=list(ts), sigmas=sigmas, search_metric=s.search_metric,
                 search_num_samples=s.search_num_samples,
                 search_scores={json.dumps(list(k)): v for k, v in scores.items()})
    logging.info('Time search (%.0f s, %d candidates): ts=%s (sigmas %s), %s=%.5g.', time.time() - start,
                 len(scores), ts, [round(x, 4) for x in sigmas], s.search_metric, scores[ts])
    name = SEARCHED
    fn = lambda p, rng, labels, shape: sampling.multistep_sample(
        exp.model.consistency_fn(p, labels), rng, shape, sigmas, m.sigma_min)
    nfe = len(sampling.check_time_points(sigmas, m.sigma_min))
  else:
    name = sampler_name
    fn, nfe = exp.method.sampler(name)
    if name == 'multistep':
      extra['sigmas'] = exp.method.multistep_sigmas()
  start = time.time()
  sampler = train.ShardedSampler(fn, exp.mesh, exp.image_shape, min(s.batch_size, s.num_samples),
                           m.num_classes)
  images, labels = sampler(params, s.num_samples, s.seed)
  logging.info('%d %s samples (NFE %d) in %.1f s.', images.shape[0], name, nfe, time.time() - start)
  return write_outputs(workdir, name, nfe, images, labels, config, extra, metric)

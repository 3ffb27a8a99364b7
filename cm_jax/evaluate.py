r"""`--mode=eval`: sample a trained run (or read a samples npz) and score the samples.

  python launch.py --config=configs/cifar10_cd.py --workdir=runs/cifar10_cd --mode=eval \
      --config.eval.samplers="('onestep', 'multistep')"
  python launch.py --config=configs/digits_cd.py --workdir=runs/digits --mode=eval \
      --config.eval.samplers="('onestep', 'multistep', 'teacher_heun')"
  python launch.py --config=configs/cifar10_cd.py --workdir=runs/cifar10_cd --mode=eval \
      --eval_samples=/path/to/samples_50000x32x32x3.npz

Metrics:
  * The embedded digits dataset (data.name='sklearn_digits'): the digits metric
    (cm_jax.evaluation.digits_metric).
  * Image datasets: FID of Inception pool features against the statistics of a TFDS split (eval.ref_split,
    'train' as in the paper), Inception Score of the unbiased logits (eval.is_splits splits) and improved
    precision / recall (k = eval.pr_k). The reference statistics are computed once and cached under
    eval.stats_dir, keyed by dataset, split, image shape, number of images and the Inception weights' hash.

Every sampler's result goes to <workdir>/eval/<sampler>_nfe<k>.json, into <workdir>/metrics.json as
'eval/<sampler>_nfe<k>' and to TensorBoard (<workdir>/eval) at the checkpoint's step.
"""

import copy
import json
import logging
import os
import re
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from clu import metric_writers
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from cm_jax import config_utils, data, run, sharding, train
from cm_jax.errors import ConfigError, WorkdirError

DIGITS_DATASET = 'sklearn_digits'
# Version of the reference-statistics file format; part of the cache key.
STATS_VERSION = 1
# Fixed seed of the reference subset when a split has more than eval.max_ref_images images.
_SUBSET_SEED = 0
# A samples directory written by `run.generate` or here: <sampler>_nfe<k>.
_SAMPLES_DIR_RE = re.compile(r'^(?P<sampler>[a-z_]+)_nfe(?P<nfe>\d+)$')


# --------------------------------------------------------------------------------------------------
# Checks, before anything is loaded or compiled.
# --------------------------------------------------------------------------------------------------
def uses_digits_metric(config: ml_collections.ConfigDict) -> bool:
  return config.data.name == DIGITS_DATASET


def check_eval_config(config: ml_collections.ConfigDict, num_samples: int | None = None) -> None:
  """Raises ConfigError for eval settings that cannot work with `num_samples` samples."""
  e = config.eval
  num = e.num_samples if num_samples is None else num_samples
  where = 'the samples npz has' if num_samples is not None else 'eval.num_samples is'
  if num < 2:
    raise ConfigError(f'Scoring needs at least 2 samples but {where} {num}; '
                      'set --config.eval.num_samples to 2 or more (50000 for the paper\'s FID).')
  if uses_digits_metric(config):
    return
  if e.pr_k < 1 or num <= e.pr_k:
    raise ConfigError(f'Precision/recall with eval.pr_k={e.pr_k} needs pr_k >= 1 and more than pr_k '
                      f'samples, but {where} {num}; raise the number of samples or lower eval.pr_k.')
  if e.is_splits < 1:
    raise ConfigError(f'eval.is_splits={e.is_splits} must be >= 1 (10 as in the paper).')
  if e.inception_batch_size < 1:
    raise ConfigError(f'eval.inception_batch_size={e.inception_batch_size} must be >= 1.')
  if e.max_ref_images < 0 or 0 < e.max_ref_images <= e.pr_k:
    raise ConfigError(f'eval.max_ref_images={e.max_ref_images} must be 0 (the whole split) or more '
                      f'than eval.pr_k={e.pr_k}.')


def read_samples(path: str, config: ml_collections.ConfigDict) -> np.ndarray:
  """The uint8 NHWC images (`arr_0`) of a samples npz, checked against the config's image shape."""
  if not os.path.isfile(path):
    raise ConfigError(f'--eval_samples={path} does not exist; pass a samples npz written by '
                      '--mode=sample or --mode=eval (samples_NxHxWxC.npz), or leave it empty to sample.')
  try:
    with np.load(path, allow_pickle=False) as arrays:
      if 'arr_0' not in arrays.files:
        raise ConfigError(f'{path} has no arr_0 (it has {arrays.files}); a samples npz holds the images '
                          'as arr_0 (uint8 NHWC), as the reference evaluator expects.')
      images = arrays['arr_0']
  except (ValueError, OSError) as e:
    if isinstance(e, ConfigError):
      raise
    raise ConfigError(f'{path} is not a readable npz ({e}).') from e
  expected = train.image_shape_of(config)
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != expected:
    raise ConfigError(
        f'{path} holds arr_0 of dtype {images.dtype} and shape {images.shape}; expected uint8 images '
        f'[N, {", ".join(map(str, expected))}] in [0, 255] (data.image_size={config.data.image_size}, '
        f'data.num_channels={config.data.num_channels}). Pass the config of the run that made the '
        'samples, or convert them: uint8 = round((x + 1) * 127.5) for images in [-1, 1].')
  return images


def eval_samplers(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The sampler names asked for ('' stays '': the method's default)."""
  if isinstance(config.eval.samplers, str):
    raise ConfigError(f'eval.samplers={config.eval.samplers!r} must be a tuple, e.g. '
                      "--config.eval.samplers=\"('onestep', 'multistep')\".")
  # 'a,b' (what --config.eval.samplers=a,b gives) is read as two names.
  names = tuple(n.strip() for name in config.eval.samplers for n in name.split(','))
  return names or (config.sampling.sampler,)


def name_of_npz(path: str) -> tuple[str, str | None, int | None]:
  """(result name, sampler, NFE) of a samples npz; sampler and NFE when its folder says them."""
  folder = os.path.basename(os.path.dirname(os.path.abspath(path)))
  match = _SAMPLES_DIR_RE.match(folder)
  if match:
    return folder, match['sampler'], int(match['nfe'])
  return os.path.splitext(os.path.basename(path))[0], None, None


# --------------------------------------------------------------------------------------------------
# Multi-process helpers: every process holds the same samples; features are computed on local devices
# for a contiguous share and gathered.
# --------------------------------------------------------------------------------------------------
def gather_rows(local: np.ndarray) -> np.ndarray:
  """Concatenates every process's rows in process order (rows may differ in number)."""
  if jax.process_count() == 1:
    return local
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  counts = np.asarray(multihost_utils.process_allgather(np.array([local.shape[0]]))).reshape(-1)
  # process_allgather wants equal shapes: pad to the largest share, then drop the padding.
  padded = np.zeros((int(counts.max()),) + local.shape[1:], local.dtype)
  padded[:local.shape[0]] = local
  gathered = np.asarray(multihost_utils.process_allgather(padded))
  return np.concatenate([gathered[p, :counts[p]] for p in range(len(counts))])


def _process_share(num: int) -> slice:
  per_process = -(-num // jax.process_count())
  start = jax.process_index() * per_process
  return slice(min(start, num), min(start + per_process, num))


def _local_features(inception, images: np.ndarray, batch_size: int) -> dict[str, np.ndarray]:
  """Inception features of `images` (this process's share) sharded over the local devices."""
  from cm_jax.evaluation import inception as inception_lib  # pylint: disable=g-import-not-at-top
  apply_fn, variables = inception
  devices = jax.local_devices()
  # No batch bigger than the data (padding costs a full network pass per image), and a multiple of
  # the local devices so each holds an equal slice.
  batch = min(batch_size, max(images.shape[0], 1))
  batch = -(-batch // len(devices)) * len(devices)
  sharding = NamedSharding(Mesh(np.asarray(devices), ('batch',)), P('batch'))
  return inception_lib.inception_features(apply_fn, variables, images, batch, sharding)


def sample_features(inception, images: np.ndarray, batch_size: int) -> dict[str, np.ndarray]:
  """Inception features of samples present on every process, split over all processes' devices."""
  share = _local_features(inception, images[_process_share(images.shape[0])], batch_size)
  return {k: gather_rows(v) for k, v in share.items()}


# --------------------------------------------------------------------------------------------------
# Reference statistics, cached.
# --------------------------------------------------------------------------------------------------
def inception_path(config: ml_collections.ConfigDict) -> str:
  from cm_jax.evaluation import inception as inception_lib  # pylint: disable=g-import-not-at-top
  return config.eval.inception_path or str(inception_lib.cache_dir() / inception_lib.INCEPTION_FILENAME)


def stats_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
  return config.eval.stats_dir or os.path.join(workdir, 'stats')


def reference_stats_path(config: ml_collections.ConfigDict, workdir: str, inception_sha256: str) -> str:
  """The cache file of the reference statistics: one per dataset, split, shape, cap and network."""
  d = config.data
  safe = lambda s: re.sub(r'[^A-Za-z0-9.=-]+', '_', str(s)).strip('_')
  cap = config.eval.max_ref_images or 'all'
  name = (f'fid_stats_v{STATS_VERSION}_{safe(d.name)}_{safe(config.eval.ref_split)}_'
          f'{d.image_size}x{d.image_size}x{d.num_channels}_max{cap}_inception-{inception_sha256[:12]}.npz')
  return os.path.join(stats_dir(config, workdir), name)


def _stats_identity(config: ml_collections.ConfigDict, inception_sha256: str) -> dict:
  d = config.data
  return {'version': STATS_VERSION, 'dataset': d.name, 'split': config.eval.ref_split,
          'image_shape': list(train.image_shape_of(config)), 'max_ref_images': config.eval.max_ref_images,
          'inception_sha256': inception_sha256}


def _load_stats(path: str, identity: dict) -> dict | None:
  if not os.path.exists(path):
    return None
  try:
    with np.load(path, allow_pickle=False) as arrays:
      stats = {k: arrays[k] for k in ('mu', 'sigma', 'features', 'identity', 'split_size')}
    if json.loads(str(stats['identity'])) != identity:
      raise ValueError('it was computed for other settings')
  except Exception as e:  # pylint: disable=broad-except
    # A damaged or foreign file is rebuilt rather than trusted.
    logging.warning('Ignoring the reference statistics %s (%s); recomputing them.', path, e)
    return None
  return stats


def _reference_features(config: ml_collections.ConfigDict, inception) -> tuple[np.ndarray, int]:
  """(pool features of at most eval.max_ref_images reference images, the split's size).

  Each process reads and embeds its shard of the split; the features are gathered in split order.
  """
  images, _ = data.load_split(config.data, config.eval.ref_split)
  counts = gather_rows(np.array([images.shape[0]]))
  total, offset = int(counts.sum()), int(counts[:jax.process_index()].sum())
  cap = config.eval.max_ref_images
  if cap and total > cap:
    # A seeded subset of global indices, the same whatever the number of processes.
    chosen = np.sort(np.random.default_rng(_SUBSET_SEED).choice(total, cap, replace=False))
    local = chosen[(chosen >= offset) & (chosen < offset + images.shape[0])] - offset
    images = images[local]
  if total <= config.eval.pr_k:
    raise ConfigError(f'The reference split {config.data.name}[{config.eval.ref_split}] has {total} '
                      f'images; precision/recall needs more than eval.pr_k={config.eval.pr_k}.')
  features = _local_features(inception, images, config.eval.inception_batch_size)['pool']
  return gather_rows(features), total


def reference_stats(config: ml_collections.ConfigDict, workdir: str, inception,
                    inception_sha256: str) -> dict[str, Any]:
  """FID statistics (mu, sigma) and pool features of the reference split, from the cache or computed.

  Returns:
    {'mu', 'sigma', 'features', 'split_size', 'path', 'computed'}.
  """
  path = reference_stats_path(config, workdir, inception_sha256)
  identity = _stats_identity(config, inception_sha256)
  stats = _load_stats(path, identity)
  if jax.process_count() > 1 and not gather_rows(np.array([stats is not None])).all():
    # Every process must take the same branch: computing gathers across processes. (A stats_dir
    # that is not shared is recomputed by all.)
    stats = None
  if stats is not None:
    logging.info('Reference statistics from %s.', path)
    return {**stats, 'split_size': int(stats['split_size']), 'path': path, 'computed': False}
  from cm_jax.evaluation import metrics  # pylint: disable=g-import-not-at-top
  start = time.time()
  features, total = _reference_features(config, inception)
  mu, sigma = metrics.feature_stats(features)
  stats = {'mu': mu, 'sigma': sigma, 'features': features.astype(np.float32), 'split_size': total,
           'identity': json.dumps(identity, sort_keys=True)}
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + '.tmp.npz'
    np.savez(tmp, **stats)
    os.replace(tmp, path)  # Readers never see half a file.
  sharding.barrier('reference_statistics_written')  # Process 0 may take long: not a collective.
  logging.info('Reference statistics of %d of %d %s[%s] images in %.1f s, cached in %s.',
               features.shape[0], total, config.data.name, config.eval.ref_split, time.time() - start,
               path)
  return {**stats, 'path': path, 'computed': True}


def inception_metrics(config: ml_collections.ConfigDict, features: dict[str, np.ndarray],
                      reference: dict[str, Any]) -> dict[str, float]:
  """FID, Inception Score and precision/recall of sample features against the reference."""
  from cm_jax.evaluation import metrics  # pylint: disable=g-import-not-at-top
  mu, sigma = metrics.feature_stats(features['pool'])
  # The unbiased logits (pool @ W) over all 1008 classes, as OpenAI's evaluator and torch-fidelity.
  is_mean, is_std = metrics.inception_score(features['logits_unbiased'],
                                            min(config.eval.is_splits, features['pool'].shape[0]))
  pr = metrics.precision_recall(reference['features'], features['pool'], k=config.eval.pr_k)
  return {'fid': metrics.frechet_distance(mu, sigma, reference['mu'], reference['sigma']),
          'inception_score': is_mean, 'inception_score_std': is_std,
          'precision': pr['precision'], 'recall': pr['recall']}


# --------------------------------------------------------------------------------------------------
# The run's model.
# --------------------------------------------------------------------------------------------------
def _check_run_matches(config: ml_collections.ConfigDict, workdir: str) -> None:
  """The config must describe the network the workdir holds (restoring would fail less clearly)."""
  saved = config_utils.read_saved_config(workdir)
  if saved is None:
    return
  fields = ('method', 'model', 'data.name', 'data.image_size', 'data.num_channels')
  diffs = config_utils.config_differences(saved, config, ignore=())
  # A field the saved config lacks was added to the code after the run was trained: its default
  # stands for what the run used.
  diffs = {k: (a, b) for k, (a, b) in diffs.items()
           if a is not None and any(k == f or k.startswith(f + '.') for f in fields)}
  if diffs:
    listed = '; '.join(f'{k}: {a!r} in the workdir, {b!r} now' for k, (a, b) in diffs.items())
    raise WorkdirError(f'{workdir} holds a run of another model ({listed}). Evaluate it with the '
                       'config (and overrides) it was trained with.')


def _sampling_config(config: ml_collections.ConfigDict, workdir: str,
                     samplers: tuple[str, ...]) -> ml_collections.ConfigDict:
  """A copy of the config to restore the run with, that trains or loads nothing sampling does not need."""
  config = copy.deepcopy(config)
  with config.unlocked():
    # Evaluating never trains a teacher.
    config.teacher.train_if_missing = False
    if not config.teacher.workdir and 'teacher_heun' in samplers:
      saved = config_utils.read_saved_config(workdir) or {}
      saved_teacher = saved.get('teacher', {}).get('workdir', '')
      if saved_teacher:
        logging.info('Teacher from the run\'s saved config: %s.', saved_teacher)
        config.teacher.workdir = saved_teacher
    if config.consistency.distance == 'lpips':
      # The training distance plays no part in sampling; this skips loading the LPIPS weights.
      config.consistency.distance = 'l2'
  return config


def _restore(config: ml_collections.ConfigDict, workdir: str, samplers: tuple[str, ...]):
  """(experiment, state, frozen, step, [(sampler, nfe)]), every sampler checked before sampling."""
  exp, state, frozen, step = run.restore_for_sampling(config, workdir)
  names = run.sampler_names(exp, samplers)
  nfes = []
  for name in names:
    try:
      nfes.append(exp.method.sampler(name)[1])
    except ConfigError as e:
      if not config.eval.samplers:
        raise
      raise ConfigError(f'eval.samplers has {name!r}: {e}') from e
  train.eval_params(state, config.sampling.ema_index)  # Raises ConfigError for a wrong EMA index.
  if 'teacher_heun' in names and 'teacher_params' not in frozen:
    from cm_jax import teacher  # pylint: disable=g-import-not-at-top
    frozen['teacher_params'] = teacher.load_teacher(config, workdir, exp)
  return exp, state, frozen, step, list(zip(names, nfes))


def _generate(exp: train.Experiment, state: train.TrainState, frozen: dict, sampler: str,
              num_samples: int) -> tuple[np.ndarray, str | None]:
  """Samples (on every process) and the npz they were written to (process 0)."""
  s = exp.config.sampling
  params = (frozen['teacher_params'] if sampler == 'teacher_heun'
            else train.eval_params(state, s.ema_index))
  batch = min(s.batch_size, num_samples)
  start = time.time()
  images, labels, nfe = train.sample_images(exp, params, sampler, num_samples, s.seed, batch)
  logging.info('%d %s samples (NFE %d) in %.1f s.', images.shape[0], sampler, nfe, time.time() - start)
  path = None
  if jax.process_index() == 0:
    path = train.write_samples(run.samples_dir(exp.workdir, sampler, nfe), images, labels)
  return images, path


# --------------------------------------------------------------------------------------------------
# Output.
# --------------------------------------------------------------------------------------------------
def format_table(results: dict[str, dict[str, Any]]) -> str:
  """A Markdown table: one row per sampler, one column per metric."""
  if not results:
    return ''
  first = next(iter(results.values()))
  keys = [k for k in first['metrics']]
  lines = ['| sampler | NFE | samples | ' + ' | '.join(keys) + ' |',
           '|---|---|---|' + '---|' * len(keys)]
  for name, r in results.items():
    cells = []
    for k in keys:
      v = r['metrics'].get(k)
      cells.append(str(v) if isinstance(v, int) else f'{v:.4f}')
    nfe = '-' if r['nfe'] is None else str(r['nfe'])
    lines.append(f"| {r['sampler'] or name} | {nfe} | {r['num_samples']} | " + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def _write_result(workdir: str, name: str, result: dict, writer, step: int) -> str | None:
  writer.write_scalars(step, {f'eval/{name}/{k}': v for k, v in result['metrics'].items()})
  if jax.process_index() > 0:
    return None
  path = os.path.join(workdir, 'eval', f'{name}.json')
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(result, f, indent=2, sort_keys=True)
  os.replace(tmp, path)
  run.write_metrics(workdir, f'eval/{name}', result)
  return path


# --------------------------------------------------------------------------------------------------
# The mode.
# --------------------------------------------------------------------------------------------------
def evaluate(config: ml_collections.ConfigDict, workdir: str, samples_path: str = '') -> dict:
  """Scores samples of the run in `workdir`, or those of an existing samples npz.

  Args:
    config: The run's config; `eval` and `sampling` say what to sample and how to score.
    workdir: The run (checkpoints are read from it unless `samples_path` is given); results go to
      <workdir>/eval, <workdir>/metrics.json and TensorBoard.
    samples_path: A samples npz (arr_0 uint8 NHWC) to score instead of sampling.

  Returns:
    {result name ('<sampler>_nfe<k>'): {'sampler', 'nfe', 'num_samples', 'step', 'samples_npz',
    'metrics': {...}, ...}}: the digits metric on the embedded digits dataset; fid,
    inception_score(_std), precision and recall otherwise.

  Raises:
    ConfigError, WorkdirError, TeacherError: bad settings, before anything is sampled.
    PretrainedWeightsNotFoundError: the FID Inception weights are missing (image datasets), before
      anything is sampled; the message says how to get them.
    DatasetNotFoundError: the reference split is not prepared.
  """
  workdir = os.path.abspath(workdir)
  samplers = eval_samplers(config)

  # ---- Checks and inputs, before anything is sampled or compiled. ----
  if samples_path:
    images = read_samples(samples_path, config)
    check_eval_config(config, images.shape[0])
  else:
    check_eval_config(config)
    _check_run_matches(config, workdir)
  digits = uses_digits_metric(config)
  if digits:
    metric = run.digits_metric_fn(config)
  else:
    from cm_jax.evaluation import inception as inception_lib  # pylint: disable=g-import-not-at-top
    weights = inception_path(config)
    inception = inception_lib.load_inception(weights)  # PretrainedWeightsNotFoundError, with the fix.
    inception_sha256 = inception_lib.sha256_of_file(weights)

  if samples_path:
    name, sampler, nfe = name_of_npz(samples_path)
    jobs = [(name, sampler, nfe)]
    step = None
  else:
    restore_config = _sampling_config(config, workdir, samplers)
    exp, state, frozen, step, sampler_nfes = _restore(restore_config, workdir, samplers)
    jobs = [(f'{sampler}_nfe{nfe}', sampler, nfe) for sampler, nfe in sampler_nfes]

  reference = None
  if not digits:
    reference = reference_stats(config, workdir, inception, inception_sha256)

  # ---- Sample and score. ----
  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0,
                                                collection='eval')
  results = {}
  for name, sampler, nfe in jobs:
    if samples_path:
      npz = os.path.abspath(samples_path)
    else:
      images, npz = _generate(exp, state, frozen, sampler, config.eval.num_samples)
    start = time.time()
    if digits:
      scores = {k: (int(v) if isinstance(v, (int, np.integer)) else float(v))
                for k, v in metric(images).items()}
    else:
      features = sample_features(inception, images, config.eval.inception_batch_size)
      scores = inception_metrics(config, features, reference)
    result = {'sampler': sampler, 'nfe': nfe, 'num_samples': int(images.shape[0]), 'step': step,
              'samples_npz': npz, 'metrics': scores}
    if not digits:
      result.update(reference_stats=reference['path'], num_reference=int(reference['features'].shape[0]),
                    reference_split=config.eval.ref_split, inception_sha256=inception_sha256)
    _write_result(workdir, name, result, writer, step or 0)
    logging.info('Eval %s (%.1f s): %s', name, time.time() - start, scores)
    results[name] = result
  writer.flush()
  writer.close()
  if jax.process_index() == 0:
    print(format_table(results), flush=True)
  return results

"""Scores of generated images: the digits metric on the embedded digits dataset; FID, Inception
Score and precision/recall with the FID Inception elsewhere.

  * The embedded digits dataset (data.name='sklearn_digits'): the digits metric
    (cm_jax.evaluation.digits_metric).
  * Image datasets: FID of Inception pool features against the statistics of a TFDS split (eval.ref_split,
    'train' as in the paper), Inception Score of the unbiased logits (eval.is_splits splits) and improved
    precision / recall (k = eval.pr_k). The reference statistics are computed once and cached under
    eval.stats_dir, keyed by dataset, split, image shape, number of images and the Inception weights' hash.

`scorer(config, workdir)` loads what scoring needs (failing early, with the fix, when weights are
missing); the scorer then maps uint8 NHWC images present on every process to {metric: value}.
"""

import json
import logging
import os
import re
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from cm_jax import data, experiment, files, outputs, sharding
from cm_jax.errors import ConfigError

DIGITS_DATASET = 'sklearn_digits'
# Version of the reference-statistics file format; part of the cache key.
STATS_VERSION = 1
# Fixed seed of the reference subset when a split has more than eval.max_ref_images images.
_SUBSET_SEED = 0


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
  if e.ref_batch and not os.path.isfile(e.ref_batch):
    raise ConfigError(f'eval.ref_batch={e.ref_batch} does not exist: pass the path of a reference batch '
                      'of the ADM evaluator (e.g. VIRTUAL_imagenet64_labeled.npz), or leave it empty '
                      'to use the TFDS split eval.ref_split.')
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


# --------------------------------------------------------------------------------------------------
# Inception features: every process holds the same samples; each embeds a contiguous share on its
# local devices, and the shares are gathered in process order.
# --------------------------------------------------------------------------------------------------
def _local_features(inception, images: np.ndarray, batch_size: int) -> dict[str, np.ndarray]:
  """Inception features of `images` (this process's share) sharded over the local devices."""
  from cm_jax.evaluation import inception as inception_lib  # pylint: disable=g-import-not-at-top
  apply_fn, variables = inception
  num_devices = jax.local_device_count()
  # No batch bigger than the data (padding costs a full network pass per image), and a multiple of
  # the local devices so each holds an equal slice.
  batch = min(batch_size, max(images.shape[0], 1))
  batch = -(-batch // num_devices) * num_devices
  return inception_lib.inception_features(apply_fn, variables, images, batch,
                                          sharding.local_batch_sharding())


def sample_features(inception, images: np.ndarray, batch_size: int) -> dict[str, np.ndarray]:
  """Inception features of samples present on every process, split over all processes' devices."""
  share = _local_features(inception, images[sharding.process_share(images.shape[0])], batch_size)
  return {k: sharding.gather_rows(v) for k, v in share.items()}


# --------------------------------------------------------------------------------------------------
# Reference statistics, cached.
# --------------------------------------------------------------------------------------------------
def inception_path(config: ml_collections.ConfigDict) -> str:
  from cm_jax.evaluation import inception as inception_lib  # pylint: disable=g-import-not-at-top
  return config.eval.inception_path or str(inception_lib.cache_dir() / inception_lib.INCEPTION_FILENAME)


def stats_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
  return config.eval.stats_dir or os.path.join(workdir, 'stats')


def reference_stats_path(config: ml_collections.ConfigDict, workdir: str, inception_sha256: str,
                         ref_batch_sha256: str = '') -> str:
  """The cache file of the reference statistics: one per dataset, split, shape, cap and network (or
  per reference batch file and network)."""
  d = config.data
  safe = lambda s: re.sub(r'[^A-Za-z0-9.=-]+', '_', str(s)).strip('_')
  cap = config.eval.max_ref_images or 'all'
  source = (f'refbatch-{ref_batch_sha256[:12]}' if ref_batch_sha256 else
            f'{safe(d.name)}_{safe(config.eval.ref_split)}_max{cap}')
  name = (f'fid_stats_v{STATS_VERSION}_{source}_{d.image_size}x{d.image_size}x{d.num_channels}_'
          f'inception-{inception_sha256[:12]}.npz')
  return os.path.join(stats_dir(config, workdir), name)


def _stats_identity(config: ml_collections.ConfigDict, inception_sha256: str,
                    ref_batch_sha256: str = '') -> dict:
  d = config.data
  identity = {'version': STATS_VERSION, 'image_shape': list(experiment.image_shape_of(config)),
              'inception_sha256': inception_sha256}
  if ref_batch_sha256:
    return {**identity, 'ref_batch_sha256': ref_batch_sha256}
  return {**identity, 'dataset': d.name, 'split': config.eval.ref_split,
          'max_ref_images': config.eval.max_ref_images}


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
  counts = sharding.gather_rows(np.array([images.shape[0]]))
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
  return sharding.gather_rows(features), total


def _reference_batch(config: ml_collections.ConfigDict, inception
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(mu, sigma, pool features of arr_0) of a reference batch of the ADM evaluator (e.g.
  VIRTUAL_imagenet64_labeled.npz): its precomputed whole-dataset statistics make the FID the
  paper's; its images (arr_0) are the reference of precision/recall."""
  path = config.eval.ref_batch
  with np.load(path, allow_pickle=False) as arrays:
    missing = {'mu', 'sigma', 'arr_0'} - set(arrays.files)
    if missing:
      raise ConfigError(f'eval.ref_batch={path} lacks {sorted(missing)} (it has {arrays.files}); pass '
                        'a reference batch of the ADM evaluator (arr_0 images, mu, sigma).')
    mu, sigma, images = arrays['mu'], arrays['sigma'], arrays['arr_0']
  check_images(images, config, f'eval.ref_batch={path}')
  share = _local_features(inception, images[sharding.process_share(len(images))],
                          config.eval.inception_batch_size)['pool']
  return np.asarray(mu, np.float64), np.asarray(sigma, np.float64), sharding.gather_rows(share)


def check_images(images: np.ndarray, config: ml_collections.ConfigDict, what: str) -> None:
  """uint8 NHWC images of the config's image shape, or a ConfigError saying what was found."""
  expected = experiment.image_shape_of(config)
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != expected:
    raise ConfigError(
        f'{what} holds images of dtype {images.dtype} and shape {images.shape}; expected uint8 images '
        f'[N, {", ".join(map(str, expected))}] in [0, 255] (data.image_size={config.data.image_size}, '
        f'data.num_channels={config.data.num_channels}).')


def reference_stats(config: ml_collections.ConfigDict, workdir: str, inception,
                    inception_sha256: str) -> dict[str, Any]:
  """FID statistics (mu, sigma) and pool features of the reference (eval.ref_batch, else the split
  eval.ref_split), from the cache or computed.

  Returns:
    {'mu', 'sigma', 'features', 'split_size', 'path', 'computed'}.
  """
  from cm_jax.evaluation import inception as inception_lib  # pylint: disable=g-import-not-at-top
  batch_sha256 = inception_lib.sha256_of_file(config.eval.ref_batch) if config.eval.ref_batch else ''
  path = reference_stats_path(config, workdir, inception_sha256, batch_sha256)
  identity = _stats_identity(config, inception_sha256, batch_sha256)
  stats = _load_stats(path, identity)
  if jax.process_count() > 1 and not sharding.gather_rows(np.array([stats is not None])).all():
    # Every process must take the same branch: computing gathers across processes. (A stats_dir
    # that is not shared is recomputed by all.)
    stats = None
  if stats is not None:
    logging.info('Reference statistics from %s.', path)
    return {**stats, 'split_size': int(stats['split_size']), 'path': path, 'computed': False}
  from cm_jax.evaluation import metrics  # pylint: disable=g-import-not-at-top
  start = time.time()
  if config.eval.ref_batch:
    mu, sigma, features = _reference_batch(config, inception)
    total = features.shape[0]
  else:
    features, total = _reference_features(config, inception)
    mu, sigma = metrics.feature_stats(features)
  stats = {'mu': mu, 'sigma': sigma, 'features': features.astype(np.float32), 'split_size': total,
           'identity': json.dumps(identity, sort_keys=True)}
  if jax.process_index() == 0:
    files.write_npz(path, **stats)  # Readers never see half a file.
  sharding.barrier('reference_statistics_written')  # Process 0 may take long: not a collective.
  logging.info('Reference statistics of %d of %d images of %s in %.1f s, cached in %s.',
               features.shape[0], total, config.eval.ref_batch or
               f'{config.data.name}[{config.eval.ref_split}]', time.time() - start, path)
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
# Scorers.
# --------------------------------------------------------------------------------------------------
class DigitsScorer:
  """The digits metric (digits_fd, digits_confidence, digits_classes, digits_class_entropy)."""
  search_metrics = ('digits_fd',)  # Lower is better: usable by the time-point search.

  def __init__(self, config: ml_collections.ConfigDict):
    from cm_jax.evaluation import digits_metric  # pylint: disable=g-import-not-at-top
    self._metric = digits_metric.DigitsMetric(config.data)

  def prepare(self) -> None:
    """Nothing to compute ahead: the classifier is trained (or read from its cache) on creation."""

  def __call__(self, images: np.ndarray) -> dict[str, Any]:
    return outputs.plain(self._metric(images))

  def search_score(self, name: str, images: np.ndarray) -> float:
    return float(self(images)[name])

  def record(self) -> dict:
    return {}


class InceptionScorer:
  """FID, Inception Score and precision/recall against the reference statistics (eval section)."""
  search_metrics = ('fid',)

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    from cm_jax.evaluation import inception as inception_lib  # pylint: disable=g-import-not-at-top
    self._config, self._workdir = config, workdir
    weights = inception_path(config)
    self._inception = inception_lib.load_inception(weights)  # Says how to get the weights if missing.
    self._sha256 = inception_lib.sha256_of_file(weights)
    self.reference = None

  def prepare(self) -> None:
    """The reference statistics, from the cache or computed (every process takes part)."""
    if self.reference is None:
      self.reference = reference_stats(self._config, self._workdir, self._inception, self._sha256)

  def features(self, images: np.ndarray) -> dict[str, np.ndarray]:
    return sample_features(self._inception, images, self._config.eval.inception_batch_size)

  def __call__(self, images: np.ndarray) -> dict[str, Any]:
    self.prepare()
    return inception_metrics(self._config, self.features(images), self.reference)

  def search_score(self, name: str, images: np.ndarray) -> float:
    del name  # Only FID: the search scores many candidates, so nothing else is computed.
    from cm_jax.evaluation import metrics  # pylint: disable=g-import-not-at-top
    self.prepare()
    pool = self.features(images)['pool']
    return float(metrics.frechet_distance(*metrics.feature_stats(pool), self.reference['mu'],
                                          self.reference['sigma']))

  def record(self) -> dict:
    """What the scores were computed against, for the result record."""
    return {'reference_stats': self.reference['path'],
            'num_reference': int(self.reference['features'].shape[0]),
            'reference_split': self._config.eval.ref_split, 'inception_sha256': self._sha256}


def scorer(config: ml_collections.ConfigDict, workdir: str):
  """The scorer of the run's dataset. Loads the digits classifier or the FID Inception now, so that
  missing weights fail before anything is sampled (PretrainedWeightsNotFoundError says the fix)."""
  if uses_digits_metric(config):
    return DigitsScorer(config)
  return InceptionScorer(config, workdir)


def training_scorer(config: ml_collections.ConfigDict):
  """The scorer of the samples written when training ends: the digits metric on the embedded digits,
  else None (FID of 50k samples is --mode=eval's work, not the training run's)."""
  return DigitsScorer(config) if uses_digits_metric(config) else None

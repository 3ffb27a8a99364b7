"""A sample-quality metric for the embedded 8x8 digits, in the spirit of FID.

Inception features mean nothing on 8x8 grey digits, so a small CNN trained on the digits 'train' split
stands in for Inception: its penultimate activations (64-d) are the features, and the Frechet distance of
a sample's features to those of the train split is `digits_fd`. The classifier's predictions also say
whether samples look like confident digits and whether all ten classes are generated (mode coverage).

The classifier is trained reproducibly (fixed seed, fixed minibatch order, on the CPU whatever the
accelerator) in a few seconds and cached, with the train-split feature statistics, in
`<cache_dir>/digits_classifier_<version>_<recipe hash>.npz`.

`python -m cm_jax.evaluation.digits_metric` prints what real data and simple corruptions of it score,
to read a model's numbers against.
"""

import argparse
import dataclasses
import hashlib
import json
import os
import time
from typing import Any

from absl import logging
import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import scipy.ndimage

from cm_jax import errors, files
from cm_jax.evaluation import metrics

# Bump when the cached file's contents or meaning change; old files are then ignored.
CACHE_VERSION = 'v1'
DATASET_NAME = 'sklearn_digits'


@dataclasses.dataclass(frozen=True)
class ClassifierRecipe:
  """Everything that determines the trained classifier (hashed into the cache file name)."""
  conv_features: tuple[int, ...] = (16, 32)
  feature_dim: int = 64
  num_classes: int = 10
  num_steps: int = 500
  batch_size: int = 128
  learning_rate: float = 3e-3
  weight_decay: float = 1e-4
  seed: int = 0


DEFAULT_RECIPE = ClassifierRecipe()


class DigitsClassifier(nn.Module):
  """Conv 3x3 -> Conv 3x3 stride 2 -> Dense(feature_dim) -> Dense(classes); returns (logits, features)."""
  conv_features: tuple[int, ...] = DEFAULT_RECIPE.conv_features
  feature_dim: int = DEFAULT_RECIPE.feature_dim
  num_classes: int = DEFAULT_RECIPE.num_classes

  @nn.compact
  def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    x = images
    for i, features in enumerate(self.conv_features):
      x = nn.gelu(nn.Conv(features, (3, 3), strides=1 if i == 0 else 2)(x))
    x = x.reshape((x.shape[0], -1))
    # GELU rather than ReLU: no dead units, so the feature covariance stays full rank.
    features = nn.gelu(nn.Dense(self.feature_dim)(x))
    return nn.Dense(self.num_classes)(features), features


def _make_model(recipe: ClassifierRecipe) -> DigitsClassifier:
  return DigitsClassifier(recipe.conv_features, recipe.feature_dim, recipe.num_classes)


def images_to_model_input(images: np.ndarray, image_size: int = 8, num_channels: int = 1) -> np.ndarray:
  """uint8 [0, 255] or float [-1, 1] NHWC images -> float32 in [-1, 1]."""
  images = np.asarray(images)
  expected = (image_size, image_size, num_channels)
  if images.ndim != 4 or images.shape[1:] != expected:
    raise ValueError(f'The digits metric needs NHWC images of shape [N, {", ".join(map(str, expected))}], '
                     f'got {images.shape}.')
  if images.dtype == np.uint8:
    return images.astype(np.float32) / 127.5 - 1.0
  if not np.issubdtype(images.dtype, np.floating):
    raise ValueError(f'The digits metric needs uint8 images in [0, 255] or float images in [-1, 1], got '
                     f'dtype {images.dtype}.')
  if images.size and np.max(np.abs(images)) > 2.0:
    raise ValueError('Float images must be in [-1, 1] (values up to 2 are clipped); these reach '
                     f'{np.max(np.abs(images)):g}. Pass uint8 for images in [0, 255].')
  # Clipped as when samples are written to uint8.
  return np.clip(images, -1.0, 1.0).astype(np.float32)


def train_classifier(images: np.ndarray, labels: np.ndarray,
                     recipe: ClassifierRecipe = DEFAULT_RECIPE) -> dict[str, Any]:
  """Trains the classifier with AdamW on a fixed minibatch order; returns its Flax variables.

  Runs on the CPU so that the weights (and every number derived from them) do not depend on which
  accelerator trained them. A few seconds for the 1.4k digits.
  """
  model = _make_model(recipe)
  inputs = images_to_model_input(images, images.shape[1], images.shape[3])
  labels = np.asarray(labels, np.int32)
  rng = np.random.default_rng(recipe.seed)
  # Whole epochs in a seeded order, so every example is seen equally often.
  num_epochs = -(-recipe.num_steps * recipe.batch_size // len(labels))
  order = np.concatenate([rng.permutation(len(labels)) for _ in range(num_epochs)])
  order = order[:recipe.num_steps * recipe.batch_size].reshape(recipe.num_steps, recipe.batch_size)
  optimizer = optax.adamw(recipe.learning_rate, weight_decay=recipe.weight_decay)

  @jax.jit
  def train_step(variables, opt_state, batch_images, batch_labels):
    def loss_fn(variables):
      logits, _ = model.apply(variables, batch_images)
      return optax.softmax_cross_entropy_with_integer_labels(logits, batch_labels).mean()

    grads = jax.grad(loss_fn)(variables)
    updates, opt_state = optimizer.update(grads, opt_state, variables)
    return optax.apply_updates(variables, updates), opt_state

  with jax.default_device(jax.devices('cpu')[0]):
    variables = model.init(jax.random.key(recipe.seed), inputs[:1])
    opt_state = optimizer.init(variables)
    for batch_indices in order:
      variables, opt_state = train_step(variables, opt_state, inputs[batch_indices], labels[batch_indices])
  return jax.tree.map(np.asarray, variables)


def default_cache_dir() -> str:
  return os.environ.get('CM_JAX_CACHE') or os.path.join(os.path.expanduser('~'), '.cache', 'cm_jax')


def cache_path(data_config: ml_collections.ConfigDict, cache_dir: str | None = None,
               recipe: ClassifierRecipe = DEFAULT_RECIPE) -> str:
  """Where the classifier trained by `recipe` on `data_config`'s train split is cached."""
  identity = {
      'recipe': dataclasses.asdict(recipe),
      'data': {key: data_config[key]
               for key in ('name', 'split', 'eval_split', 'image_size', 'num_channels')},
  }
  digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
  return os.path.join(cache_dir or default_cache_dir(), f'digits_classifier_{CACHE_VERSION}_{digest}.npz')


def load_whole_split(data_config: ml_collections.ConfigDict, split: str) -> tuple[np.ndarray, np.ndarray]:
  """All of a split (not this process's shard): uint8 NHWC images and int32 labels."""
  from cm_jax import data as data_lib  # pylint: disable=g-import-not-at-top  # Imports TensorFlow.

  return data_lib.load_split(data_config, split, process_index=0, process_count=1)


def _check_digits_config(data_config: ml_collections.ConfigDict) -> None:
  if data_config.name != DATASET_NAME:
    raise errors.ConfigError(f"The digits metric is for data.name='{DATASET_NAME}', got "
                             f"'{data_config.name}'. Use the Inception-based FID for other datasets.")
  if (data_config.image_size, data_config.num_channels) != (8, 1):
    raise errors.ConfigError('The digits metric needs data.image_size=8 and data.num_channels=1, got '
                             f'{data_config.image_size} and {data_config.num_channels}.')


class DigitsMetric:
  """FD, confidence and class coverage of 8x8 digit samples under a small cached digits classifier.

  Attributes:
    cache_path: The .npz holding the classifier and the train-split feature statistics.
    trained: Whether this construction trained the classifier (False when it came from the cache).
    test_accuracy: The classifier's accuracy on the eval split, measured when it was trained.
  """

  def __init__(self, data_config: ml_collections.ConfigDict, cache_dir: str | None = None,
               min_class_fraction: float = 0.02, batch_size: int = 1000,
               recipe: ClassifierRecipe = DEFAULT_RECIPE):
    """Loads the classifier from the cache, or trains and caches it.

    Args:
      data_config: The `config.data` of configs/default.py (name 'sklearn_digits').
      cache_dir: Where the classifier is cached; None means $CM_JAX_CACHE or ~/.cache/cm_jax.
      min_class_fraction: A class counts towards `digits_classes` when at least this fraction of the
        samples is predicted as it.
      batch_size: Images per classifier call.
      recipe: How to train the classifier.
    """
    _check_digits_config(data_config)
    self.data_config = data_config
    self.min_class_fraction = min_class_fraction
    self.batch_size = batch_size
    self.recipe = recipe
    self._model = _make_model(recipe)
    self._apply = jax.jit(self._model.apply)
    self.cache_path = cache_path(data_config, cache_dir, recipe)
    self.trained = False
    if not self._load():
      self._train_and_save()

  def _load(self) -> bool:
    if not os.path.exists(self.cache_path):
      return False
    try:
      with np.load(self.cache_path) as cached:
        arrays = dict(cached)
      variables = traverse_util.unflatten_dict(
          {k: v for k, v in arrays.items() if k.startswith('variables/')}, sep='/')['variables']
      expected = jax.eval_shape(self._model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
      if jax.tree.map(lambda x: x.shape, variables) != jax.tree.map(lambda x: x.shape, expected):
        raise ValueError('parameter shapes differ from the recipe')
      self.variables = variables
      self.train_mu, self.train_sigma = arrays['train_mu'], arrays['train_sigma']
      self.test_accuracy = float(arrays['test_accuracy'])
    except Exception as e:  # pylint: disable=broad-except
      # A stale or damaged file is not fatal: it is rebuilt.
      logging.warning('Ignoring the unreadable digits classifier cache %s (%s); retraining.',
                      self.cache_path, e)
      return False
    return True

  def _train_and_save(self) -> None:
    start = time.time()
    train_images, train_labels = load_whole_split(self.data_config, self.data_config.split)
    test_images, test_labels = load_whole_split(self.data_config, self.data_config.eval_split)
    self.variables = train_classifier(train_images, train_labels, self.recipe)
    self.train_mu, self.train_sigma = metrics.feature_stats(self.features_and_logits(train_images)[0])
    test_logits = self.features_and_logits(test_images)[1]
    self.test_accuracy = float(np.mean(test_logits.argmax(axis=1) == test_labels))
    logging.info('Trained the digits classifier in %.1f s: %.4f accuracy on %s; caching it in %s.',
                 time.time() - start, self.test_accuracy, self.data_config.eval_split, self.cache_path)
    arrays = {'variables/' + k: v for k, v in traverse_util.flatten_dict(self.variables, sep='/').items()}
    arrays.update(train_mu=self.train_mu, train_sigma=self.train_sigma,
                  test_accuracy=np.float64(self.test_accuracy),
                  recipe=np.array(json.dumps(dataclasses.asdict(self.recipe))))
    files.write_npz(self.cache_path, **arrays)
    self.trained = True

  def features_and_logits(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Classifier features [N, feature_dim] and logits [N, classes] of uint8 or [-1, 1] float images."""
    inputs = images_to_model_input(images, self.data_config.image_size, self.data_config.num_channels)
    num = inputs.shape[0]
    # A fixed batch shape: one compilation whatever N.
    padded = np.concatenate([inputs, np.zeros((-num % self.batch_size,) + inputs.shape[1:], np.float32)])
    features, logits = [], []
    # Full float32 matmuls on GPU/TPU too, so numbers agree across hardware.
    with jax.default_matmul_precision('float32'):
      for i in range(0, padded.shape[0], self.batch_size):
        batch_logits, batch_features = self._apply(self.variables, padded[i:i + self.batch_size])
        logits.append(np.asarray(batch_logits))
        features.append(np.asarray(batch_features))
    return np.concatenate(features)[:num], np.concatenate(logits)[:num]

  def __call__(self, images: np.ndarray) -> dict[str, float]:
    """Scores samples: NHWC [N, 8, 8, 1], uint8 in [0, 255] or float in [-1, 1].

    Returns:
      digits_fd: Frechet distance of the classifier features to those of the train split (lower is better).
      digits_confidence: Mean max softmax probability (do samples look like some digit?).
      digits_classes: Classes predicted for at least `min_class_fraction` of the samples (10 is all).
      digits_class_entropy: Entropy (nats) of the predicted-label histogram; ln 10 = 2.303 is uniform.
    """
    features, logits = self.features_and_logits(images)
    if features.shape[0] < 2:
      raise ValueError(f'The digits metric needs at least 2 images, got {features.shape[0]}.')
    mu, sigma = metrics.feature_stats(features)
    logits = logits.astype(np.float64)
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    histogram = np.bincount(logits.argmax(axis=1), minlength=self.recipe.num_classes) / len(logits)
    nonzero = histogram[histogram > 0]
    return {
        'digits_fd': metrics.frechet_distance(mu, sigma, self.train_mu, self.train_sigma),
        'digits_confidence': float(probs.max(axis=1).mean()),
        'digits_classes': int(np.sum(histogram >= self.min_class_fraction)),
        # + 0.0 turns -0.0 (one class) into 0.0.
        'digits_class_entropy': float(-np.sum(nonzero * np.log(nonzero))) + 0.0,
    }


def real_vs_real_reference(data_config: ml_collections.ConfigDict, cache_dir: str | None = None,
                           noise_stds: tuple[float, ...] = (0.1, 0.2, 0.5),
                           blur_sigmas: tuple[float, ...] = (0.5, 1.0),
                           seed: int = 0) -> dict[str, dict[str, float]]:
  """What real digits and simple corruptions of them score, to interpret a model's numbers.

  The eval split is what a perfect generator scores: its FD is not 0 because of finite samples (a random
  train subset of the same size shows the size of that bias); the whole train split against its own
  statistics is 0 by construction.

  Args:
    data_config: The `config.data` of configs/default.py.
    cache_dir: Classifier cache (see DigitsMetric).
    noise_stds: Stds of Gaussian noise added to the train images, in [-1, 1] units (then clipped).
    blur_sigmas: Stds in pixels of Gaussian blurs applied to the train images.
    seed: Seed of the subset and the noise.

  Returns:
    {row name: DigitsMetric result}, in a fixed order.
  """
  metric = DigitsMetric(data_config, cache_dir)
  train_images, train_labels = load_whole_split(data_config, data_config.split)
  eval_images, _ = load_whole_split(data_config, data_config.eval_split)
  train = images_to_model_input(train_images)
  rng = np.random.default_rng(seed)
  split, eval_split = data_config.split, data_config.eval_split
  subset = rng.choice(len(train_images), size=len(eval_images), replace=False)
  candidates = {
      f'{eval_split} split, {len(eval_images)} images (a perfect generator)': eval_images,
      f'{split} split, random {len(eval_images)} of it': train_images[subset],
      f'{split} split, all {len(train_images)} (the reference itself)': train_images,
  }
  for std in noise_stds:
    candidates[f'{split} + Gaussian noise, std {std:g}'] = np.clip(
        train + std * rng.normal(size=train.shape), -1.0, 1.0)
  for blur in blur_sigmas:
    candidates[f'{split} blurred, Gaussian {blur:g} px'] = np.stack(
        [scipy.ndimage.gaussian_filter(image[..., 0], blur, mode='nearest') for image in train])[..., None]
  candidates.update({
      f'{split} digits of class 0 only': train_images[train_labels == 0],
      f'one {split} image repeated': np.repeat(train_images[:1], len(train_images), axis=0),
      'uniform noise in [-1, 1]': rng.uniform(-1.0, 1.0, size=train.shape),
  })
  return {name: metric(images) for name, images in candidates.items()}


def format_table(results: dict[str, dict[str, float]]) -> str:
  """A Markdown table of `real_vs_real_reference` results."""
  lines = ['| images | digits_fd | confidence | classes | class entropy |', '|---|---|---|---|---|']
  for name, r in results.items():
    lines.append(f"| {name} | {r['digits_fd']:.2f} | {r['digits_confidence']:.3f} | "
                 f"{r['digits_classes']} | {r['digits_class_entropy']:.3f} |")
  return '\n'.join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description='Prints what real and corrupted digits score on the digits '
                                   'metric, as a Markdown table.')
  parser.add_argument('--cache_dir', default=None, help='Classifier cache; default $CM_JAX_CACHE or '
                      '~/.cache/cm_jax.')
  parser.add_argument('--data_dir', default='', help="TFDS data dir; '' is the TFDS default.")
  args = parser.parse_args()
  from configs import default  # pylint: disable=g-import-not-at-top

  data_config = default.get_config().data
  data_config.data_dir = args.data_dir
  metric = DigitsMetric(data_config, args.cache_dir)
  print(f'Classifier: {metric.cache_path} ({"trained now" if metric.trained else "cached"}), '
        f'{metric.test_accuracy:.2%} accuracy on the {data_config.eval_split} split.\n')
  print(format_table(real_vs_real_reference(data_config, args.cache_dir)))


if __name__ == '__main__':
  main()

"""Sample-quality metrics as pure functions on features.

- Frechet distance (FID when the features are Inception pool features; Heusel et al. 2017), with the
  numerics of pytorch-fid / the ADM evaluator: float64, `scipy.linalg.sqrtm`, a diagonal offset when the
  product of covariances is near-singular, and a check that the imaginary part of the root is negligible.
- Inception score (Salimans et al. 2016): exp(E_x KL(p(y|x) || p(y))), mean and std over splits.
- Improved precision and recall (Kynkaanniemi et al. 2019): k-NN balls around each real (fake) feature
  estimate the real (fake) manifold; precision is the fraction of fake features inside the real manifold,
  recall the fraction of real features inside the fake manifold. Pairwise distances are computed in chunks
  on the accelerator so 50k x 50k sets fit in memory.
"""

import functools
import warnings

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg
import scipy.special


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Mean and unbiased covariance of features [N, D] (as pytorch-fid and the ADM evaluator), in float64."""
  features = np.asarray(features, dtype=np.float64)
  if features.ndim != 2 or features.shape[0] < 2:
    raise ValueError(f'feature_stats needs features of shape [N >= 2, D], got {features.shape}.')
  mu = features.mean(axis=0)
  sigma = np.cov(features, rowvar=False)
  return mu, np.atleast_2d(sigma)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
  """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2).

  d^2 = ||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)).

  Args:
    mu1: Mean [D] of the first set of features.
    sigma1: Covariance [D, D] of the first set.
    mu2: Mean [D] of the second set.
    sigma2: Covariance [D, D] of the second set.
    eps: Offset added to both diagonals when the square root of the product is not finite.

  Returns:
    The squared Frechet distance (what is called FID), as a Python float.
  """
  mu1 = np.atleast_1d(np.asarray(mu1, dtype=np.float64))
  mu2 = np.atleast_1d(np.asarray(mu2, dtype=np.float64))
  sigma1 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64))
  sigma2 = np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
  if mu1.shape != mu2.shape or mu1.ndim != 1:
    raise ValueError(f'Means must be vectors of the same length, got {mu1.shape} and {mu2.shape}.')
  dim = mu1.shape[0]
  if sigma1.shape != (dim, dim) or sigma2.shape != (dim, dim):
    raise ValueError(f'Covariances must be [{dim}, {dim}] to match the means, got {sigma1.shape} and '
                     f'{sigma2.shape}.')

  diff = mu1 - mu2
  with warnings.catch_warnings():
    # Singular products are common (e.g. a collapsed sample set) and handled below; no need to warn.
    warnings.simplefilter('ignore', scipy.linalg.LinAlgWarning)
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
  if not np.isfinite(covmean).all():
    # A (near-)singular product, e.g. fewer samples than dimensions: regularise both covariances.
    logging.warning('frechet_distance: sqrtm of the covariance product is not finite; adding %g to the '
                    'diagonals.', eps)
    offset = np.eye(dim) * eps
    covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
  if np.iscomplexobj(covmean):
    # The exact root is real (sigma1 sigma2 is similar to a PSD matrix); numerical noise can add a small
    # imaginary part. A large one means the inputs are not covariances.
    max_imag = np.max(np.abs(np.diagonal(covmean).imag))
    if max_imag > 1e-3:
      raise ValueError(f'frechet_distance: the matrix square root has an imaginary component {max_imag:g}; '
                       'are sigma1 and sigma2 symmetric positive semi-definite?')
    covmean = covmean.real
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def inception_score(logits_or_probs: np.ndarray, num_splits: int = 10,
                    from_logits: bool | None = None) -> tuple[float, float]:
  """Inception score exp(E_x KL(p(y|x) || p(y))) (Salimans et al. 2016), mean and std over splits.

  Args:
    logits_or_probs: Class predictions [N, K], either logits or probabilities.
    num_splits: The predictions are cut into this many contiguous, near-equal parts; p(y) is the mean
      prediction of each part and the score is averaged over parts (10 in the original code).
    from_logits: Whether the input is logits. None guesses: probabilities if every row is non-negative
      and sums to 1.

  Returns:
    (mean, std) of the per-split scores. 1 for constant predictions; K for confident predictions spread
    evenly over K classes.
  """
  values = np.asarray(logits_or_probs, dtype=np.float64)
  if values.ndim != 2:
    raise ValueError(f'inception_score needs predictions of shape [N, K], got {values.shape}.')
  if not 1 <= num_splits <= values.shape[0]:
    raise ValueError(f'num_splits must be in [1, N={values.shape[0]}], got {num_splits}.')
  if from_logits is None:
    from_logits = not (np.all(values >= 0) and np.allclose(values.sum(axis=1), 1.0, atol=1e-3))
  if from_logits:
    log_probs = values - scipy.special.logsumexp(values, axis=1, keepdims=True)
    probs = np.exp(log_probs)
  else:
    probs = values / values.sum(axis=1, keepdims=True)

  scores = []
  for part in np.array_split(probs, num_splits):
    marginal = part.mean(axis=0, keepdims=True)
    # xlogy makes 0 log 0 = 0, so exactly one-hot predictions are fine.
    kl = scipy.special.xlogy(part, part) - scipy.special.xlogy(part, marginal)
    scores.append(np.exp(kl.sum(axis=1).mean()))
  return float(np.mean(scores)), float(np.std(scores))


def _sq_distances(rows: jax.Array, cols: jax.Array) -> jax.Array:
  """Squared Euclidean distances [R, C] via ||a||^2 + ||b||^2 - 2 a.b, clamped at 0."""
  # HIGHEST: no TF32/bf16 passes on GPU/TPU, whose error would move points across ball boundaries.
  cross = jnp.matmul(rows, cols.T, precision=jax.lax.Precision.HIGHEST)
  sq = jnp.sum(rows**2, axis=1)[:, None] + jnp.sum(cols**2, axis=1)[None, :] - 2.0 * cross
  return jnp.maximum(sq, 0.0)


@functools.partial(jax.jit, static_argnames=('k',))
def _kth_smallest_sq_distance(rows: jax.Array, col_chunks: jax.Array, col_valid: jax.Array,
                              k: int) -> jax.Array:
  """For each row, the (k+1)-th smallest squared distance to the columns (index k; the row itself is 0)."""

  def merge_chunk(best, chunk):
    cols, valid = chunk
    sq = jnp.where(valid[None, :], _sq_distances(rows, cols), jnp.inf)
    neg_smallest, _ = jax.lax.top_k(-jnp.concatenate([best, sq], axis=1), k + 1)
    return -neg_smallest, None

  init = jnp.full((rows.shape[0], k + 1), jnp.inf, dtype=rows.dtype)
  best, _ = jax.lax.scan(merge_chunk, init, (col_chunks, col_valid))
  return best[:, k]


@jax.jit
def _inside_any_ball(rows: jax.Array, col_chunks: jax.Array, col_sq_radii: jax.Array) -> jax.Array:
  """For each row, whether it lies within the ball (squared radius) around any column."""

  def any_in_chunk(inside, chunk):
    cols, sq_radii = chunk
    return inside | jnp.any(_sq_distances(rows, cols) <= sq_radii[None, :], axis=1), None

  inside, _ = jax.lax.scan(any_in_chunk, jnp.zeros((rows.shape[0],), bool), (col_chunks, col_sq_radii))
  return inside


def _pad_to_multiple(x: np.ndarray, multiple: int, fill: float = 0) -> np.ndarray:
  pad = -x.shape[0] % multiple
  return np.concatenate([x, np.full((pad,) + x.shape[1:], fill, x.dtype)]) if pad else x


def _as_chunks(x: np.ndarray, chunk: int, fill: float = 0) -> jax.Array:
  """[N, ...] -> [ceil(N / chunk), chunk, ...] on device, the last chunk padded with `fill`."""
  x = _pad_to_multiple(x, chunk, fill)
  return jnp.asarray(x.reshape((-1, chunk) + x.shape[1:]))


def _manifold_sq_radii(features: np.ndarray, k: int, batch_size: int) -> np.ndarray:
  """Squared distance of each feature to its k-th nearest neighbour in the same set, excluding itself."""
  col_chunks = _as_chunks(features, batch_size)
  col_valid = _as_chunks(np.ones((features.shape[0],), bool), batch_size, fill=False)
  rows = _pad_to_multiple(features, batch_size)
  radii = [_kth_smallest_sq_distance(rows[i:i + batch_size], col_chunks, col_valid, k=k)
           for i in range(0, rows.shape[0], batch_size)]
  return np.concatenate([np.asarray(r) for r in radii])[:features.shape[0]]


def _fraction_inside(queries: np.ndarray, centres: np.ndarray, sq_radii: np.ndarray,
                     batch_size: int) -> float:
  """Fraction of queries within the k-NN ball of at least one centre."""
  centre_chunks = _as_chunks(centres, batch_size)
  # Padded centres get radius -inf: no distance is <= it.
  radius_chunks = _as_chunks(sq_radii, batch_size, fill=-np.inf)
  rows = _pad_to_multiple(queries, batch_size)
  inside = [_inside_any_ball(rows[i:i + batch_size], centre_chunks, radius_chunks)
            for i in range(0, rows.shape[0], batch_size)]
  return float(np.concatenate([np.asarray(x) for x in inside])[:queries.shape[0]].mean())


def precision_recall(real_features: np.ndarray, fake_features: np.ndarray, k: int = 3,
                     batch_size: int = 4096) -> dict[str, float]:
  """Improved precision and recall of Kynkaanniemi et al. 2019 (k-NN manifold estimate).

  Each feature's ball has radius = distance to its k-th nearest neighbour in its own set (itself
  excluded). A point is inside a manifold if it lies in (or on) at least one ball of that set.

  Args:
    real_features: [N, D] features of real data.
    fake_features: [M, D] features of generated data.
    k: Neighbourhood size (3 in the paper and the ADM evaluator).
    batch_size: Rows and columns per distance block; a block holds batch_size^2 float32 values.

  Returns:
    {'precision': fraction of fake inside the real manifold, 'recall': fraction of real inside the fake
    manifold}.
  """
  real = np.asarray(real_features, dtype=np.float64)
  fake = np.asarray(fake_features, dtype=np.float64)
  if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
    raise ValueError(f'precision_recall needs [N, D] and [M, D] features, got {real.shape} and '
                     f'{fake.shape}.')
  if not 1 <= k < min(real.shape[0], fake.shape[0]):
    raise ValueError(f'k={k} needs more than k features in each set, got {real.shape[0]} real and '
                     f'{fake.shape[0]} fake.')
  # Centre on the real mean before going to float32: distances are translation invariant and the
  # ||a||^2 + ||b||^2 - 2ab expansion loses less precision near the origin.
  centre = real.mean(axis=0)
  real = (real - centre).astype(np.float32)
  fake = (fake - centre).astype(np.float32)

  # No block larger than the data: padding would only cost time.
  batch_size = min(batch_size, max(real.shape[0], fake.shape[0]))
  real_sq_radii = _manifold_sq_radii(real, k, batch_size)
  fake_sq_radii = _manifold_sq_radii(fake, k, batch_size)
  return {
      'precision': _fraction_inside(fake, real, real_sq_radii, batch_size),
      'recall': _fraction_inside(real, fake, fake_sq_radii, batch_size),
  }

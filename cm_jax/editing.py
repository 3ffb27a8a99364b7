"""Zero-shot image editing with a consistency model (CM paper Alg. 4 and Appendix D).

Every editor is a pure, jittable function of (a consistency function f(x, sigma[B]), an RNG key,
images in [-1, 1] NHWC, static time points); `cm_jax.modes.edit` runs them in `jax.jit` with
shardings. Usage:

  f = model.consistency_fn(params)
  out = inpaint(f, key, images, named_mask('lower_half', 8), sigmas, sigma_min=0.002)

Alg. 4 in short: an orthogonal map A and a mask Omega of the components to generate; after every
consistency step the components the reference y fixes are put back:
x <- A^T [(A y) (1 - Omega) + (A x) Omega]. Inpainting (A = I, Omega = the hole), colorization (per
pixel, A's first row is the normalised luminance weights) and super-resolution (per patch, A's first
row is the normalised constant vector, so the patch means are kept) are such maps. Stroke-guided
generation and denoising start Alg. 1 from the input at a noise level; interpolation slerps initial
noises.
"""

import dataclasses
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cm_jax import sampling
from cm_jax.errors import ConfigError

ConsistencyFn = sampling.ConsistencyFn
# ITU-R 601 luma weights (the reference code's colorization).
LUMINANCE_WEIGHTS = (0.2989, 0.5870, 0.1140)
# Alternating projections (image range, known components) after an edit with clip_denoised.
RANGE_ITERATIONS = 50


# --------------------------------------------------------------------------------------------------
# Orthonormal bases and the known components of each task.
# --------------------------------------------------------------------------------------------------
def orthonormal_basis(first: Sequence[float]) -> np.ndarray:
  """A d x d orthogonal matrix whose first column is `first` normalised (QR of [first, e_2, ...]).

  The sign is fixed so that column 0 points along `first` (QR may flip it).
  """
  first = np.asarray(first, np.float64)
  matrix = np.eye(first.shape[0])
  matrix[:, 0] = first / np.linalg.norm(first)
  q = np.linalg.qr(matrix)[0]
  if q[:, 0] @ first < 0:
    q = -q
  return q.astype(np.float32)


def luminance_basis() -> np.ndarray:
  """3 x 3 orthogonal basis of RGB whose first column is the normalised luminance weights."""
  return orthonormal_basis(LUMINANCE_WEIGHTS)


def patch_basis(factor: int) -> np.ndarray:
  """(f^2) x (f^2) orthogonal basis of an f x f patch whose first column is the constant vector."""
  return orthonormal_basis(np.ones(factor * factor))


@dataclasses.dataclass(frozen=True)
class KnownComponents:
  """Alg. 4's orthogonal map A (to_basis; A^-1 = A^T is from_basis) and the known components.

  `known` is 1 where a coefficient of A x is fixed by the reference (1 - Omega in Alg. 4) and
  broadcasts against to_basis(x).
  """
  to_basis: Callable[[jax.Array], jax.Array]
  from_basis: Callable[[jax.Array], jax.Array]
  known: jax.Array

  def merge(self, reference: jax.Array, x: jax.Array) -> jax.Array:
    """A^T [(A y) (1 - Omega) + (A x) Omega]: the reference's known components, x's others."""
    ay, ax = self.to_basis(reference), self.to_basis(x)
    return self.from_basis(jnp.where(self.known > 0, ay, ax))

  def observe(self, reference: jax.Array) -> jax.Array:
    """A^T [(A y) (1 - Omega)]: the reference with every unknown component set to 0 (Alg. 4, line 2)."""
    return self.merge(reference, jnp.zeros_like(reference))


def _identity(x: jax.Array) -> jax.Array:
  return x


def inpainting_components(mask: jax.Array) -> KnownComponents:
  """A = I; `mask` is 1 on the pixels to generate ([H, W], [H, W, C] or [B, H, W, C])."""
  mask = jnp.asarray(mask, jnp.float32)
  if mask.ndim == 2:
    mask = mask[:, :, None]
  return KnownComponents(_identity, _identity, 1.0 - mask)


def colorization_components() -> KnownComponents:
  """Per pixel, A = Q^T with Q = `luminance_basis()`: the first coefficient, the luminance, is known."""
  q = jnp.asarray(luminance_basis())
  to_basis = lambda x: jnp.einsum('bhwc,cd->bhwd', x, q)
  from_basis = lambda a: jnp.einsum('bhwd,cd->bhwc', a, q)
  return KnownComponents(to_basis, from_basis, jnp.asarray([1.0, 0.0, 0.0]))


def superres_components(factor: int) -> KnownComponents:
  """Per f x f patch and channel, A = Q^T with Q = `patch_basis(f)`: the patch mean is known."""
  q = jnp.asarray(patch_basis(factor))

  def to_patches(x):
    b, h, w, c = x.shape
    x = x.reshape(b, h // factor, factor, w // factor, factor, c)
    return x.transpose(0, 1, 3, 5, 2, 4).reshape(b, h // factor, w // factor, c, factor * factor)

  def from_patches(p, h, w):
    b, _, _, c, _ = p.shape
    p = p.reshape(b, h // factor, w // factor, c, factor, factor)
    return p.transpose(0, 1, 4, 2, 5, 3).reshape(b, h, w, c)

  def to_basis(x):
    return jnp.einsum('bijcp,pd->bijcd', to_patches(x), q)

  def from_basis(a):
    h, w = a.shape[1] * factor, a.shape[2] * factor
    return from_patches(jnp.einsum('bijcd,pd->bijcp', a, q), h, w)

  known = jnp.zeros((factor * factor,)).at[0].set(1.0)
  return KnownComponents(to_basis, from_basis, known)


def _border(s: int) -> np.ndarray:
  mask = np.ones((s, s), np.float32)
  mask[s // 4:s - s // 4, s // 4:s - s // 4] = 0
  return mask


def _fill(s: int, rows: slice, cols: slice) -> np.ndarray:
  mask = np.zeros((s, s), np.float32)
  mask[rows, cols] = 1
  return mask


# Named inpainting masks of an s x s image, 1 on the pixels to generate.
MASKS = {
    'lower_half': lambda s: _fill(s, slice(s // 2, None), slice(None)),
    'upper_half': lambda s: _fill(s, slice(None, s // 2), slice(None)),
    'left_half': lambda s: _fill(s, slice(None), slice(None, s // 2)),
    'right_half': lambda s: _fill(s, slice(None), slice(s // 2, None)),
    'center': lambda s: _fill(s, slice(s // 4, s - s // 4), slice(s // 4, s - s // 4)),
    'border': _border,
}


def named_mask(name: str, image_size: int) -> np.ndarray:
  """A [H, W] float mask, 1 on the pixels to generate, of a named shape."""
  if name not in MASKS:
    raise ConfigError(f'edit.mask={name!r} is neither a named mask ({", ".join(MASKS)}) nor a PNG file.')
  return MASKS[name](image_size)


def check_superres(image_shape, factor: int) -> None:
  if factor < 2 or image_shape[0] % factor or image_shape[1] % factor:
    raise ConfigError(f'edit.superres_factor={factor} must be >= 2 and divide the image size '
                      f'{image_shape[0]}x{image_shape[1]}.')


def check_colorization(num_channels: int) -> None:
  if num_channels != 3:
    raise ConfigError(f'Colorization needs RGB images (3 channels); this run models {num_channels}-'
                      'channel images (data.num_channels). Use a model trained on colour images.')


# --------------------------------------------------------------------------------------------------
# Editors.
# --------------------------------------------------------------------------------------------------
def replacement_edit(consistency_fn: ConsistencyFn, rng: jax.Array, reference: jax.Array,
                     components: KnownComponents, sigmas: Sequence[float], sigma_min: float,
                     clip_denoised: bool = False) -> jax.Array:
  """CM paper Alg. 4: multistep sampling that keeps the reference's known components after each step.

  y <- A^T[(A y)(1 - Omega)]; x <- f(y + t_1 z, t_1) merged with y; then for each later t_n: noise by
  sqrt(t_n^2 - eps^2), apply f, merge. The output's known components are the reference's exactly.
  With `clip_denoised`, f's outputs are clamped to [-1, 1] before each merge (as the reference code),
  and the result is brought into [-1, 1] by alternating projections onto the image range and onto the
  known components, ending with the latter: a merge alone can leave the range (a digit's black patch
  of mean -1 with any detail), and clamping the saved image would then change the kept components.
  """
  sigmas = sampling.check_time_points(sigmas, sigma_min, 'edit time points')
  observed = components.observe(reference)
  rngs = jax.random.split(rng, len(sigmas))
  x = observed + sigmas[0] * jax.random.normal(rngs[0], reference.shape, reference.dtype)
  project = lambda x0: components.merge(observed, x0)
  x = sampling.consistency_steps(consistency_fn, rngs[1:], x, sigmas, sigma_min, project,
                                 clip_denoised)
  if clip_denoised:
    x = jax.lax.fori_loop(0, RANGE_ITERATIONS, lambda _, x: project(jnp.clip(x, -1.0, 1.0)), x)
  return x


def inpaint(consistency_fn: ConsistencyFn, rng: jax.Array, images: jax.Array, mask: jax.Array,
            sigmas: Sequence[float], sigma_min: float, clip_denoised: bool = False) -> jax.Array:
  """Fill the pixels where `mask` is 1 ([H, W] or broadcastable to the images); keep the others exactly."""
  return replacement_edit(consistency_fn, rng, images, inpainting_components(mask), sigmas, sigma_min,
                          clip_denoised)


def colorize(consistency_fn: ConsistencyFn, rng: jax.Array, images: jax.Array,
             sigmas: Sequence[float], sigma_min: float, clip_denoised: bool = False) -> jax.Array:
  """Colour RGB images keeping their luminance exactly (grey inputs: R = G = B)."""
  check_colorization(images.shape[-1])
  return replacement_edit(consistency_fn, rng, images, colorization_components(), sigmas, sigma_min,
                          clip_denoised)


def super_resolve(consistency_fn: ConsistencyFn, rng: jax.Array, images: jax.Array, factor: int,
                  sigmas: Sequence[float], sigma_min: float, clip_denoised: bool = False) -> jax.Array:
  """Full-resolution images whose f x f patch means equal those of `images` exactly.

  `images` is at full resolution; only its patch means are read (pass a nearest-upsampled low-res image).
  """
  check_superres(images.shape[1:3], factor)
  return replacement_edit(consistency_fn, rng, images, superres_components(factor), sigmas, sigma_min,
                          clip_denoised)


def stroke_guided(consistency_fn: ConsistencyFn, rng: jax.Array, strokes: jax.Array,
                  sigmas: Sequence[float], sigma_min: float, clip_denoised: bool = False) -> jax.Array:
  """SDEdit-style generation from a stroke painting (CM paper, Appendix D).

  The strokes are noised to sigmas[0] and Alg. 1 runs from there over the later sigmas: nothing is kept
  exactly, the noise level sets how far the result may move from the strokes.
  """
  sigmas = sampling.check_time_points(sigmas, sigma_min, 'stroke time points')
  rngs = jax.random.split(rng, len(sigmas))
  x = strokes + sigmas[0] * jax.random.normal(rngs[0], strokes.shape, strokes.dtype)
  return sampling.consistency_steps(consistency_fn, rngs[1:], x, sigmas, sigma_min,
                                    clip_denoised=clip_denoised)


def denoise(consistency_fn: ConsistencyFn, rng: jax.Array, noisy: jax.Array, noise_sigma: float,
            sigma_min: float, later_sigmas: Sequence[float] = (), clip_denoised: bool = False
            ) -> jax.Array:
  """Denoise images carrying Gaussian noise of std `noise_sigma`: x = f(y, sigma) (Appendix D).

  The noisy image is a point of the PF-ODE's marginal at sigma, so Alg. 1 starts there without adding
  noise; `later_sigmas` (below noise_sigma) add optional multistep refinement.
  """
  sigmas = sampling.check_time_points([noise_sigma, *later_sigmas], sigma_min, 'denoising levels')
  if sigmas[0] != float(noise_sigma):
    raise ConfigError(f'edit.noise_sigma={noise_sigma} must be above sigma_min={sigma_min}.')
  rngs = jax.random.split(rng, len(sigmas))
  return sampling.consistency_steps(consistency_fn, rngs[1:], noisy, sigmas, sigma_min,
                                    clip_denoised=clip_denoised)


def slerp(z0: jax.Array, z1: jax.Array, alpha: jax.Array) -> jax.Array:
  """Spherical interpolation per example: z0 at alpha = 0, z1 at 1, norms kept for Gaussian noises.

  z0, z1: [B, ...]; alpha: [P]. Returns [B, P, ...].
  """
  flat0, flat1 = z0.reshape(z0.shape[0], -1), z1.reshape(z1.shape[0], -1)
  cos = jnp.sum(flat0 * flat1, axis=1) / (jnp.linalg.norm(flat0, axis=1) * jnp.linalg.norm(flat1, axis=1))
  theta = jnp.arccos(jnp.clip(cos, -1.0, 1.0))[:, None]  # [B, 1]
  alpha = jnp.asarray(alpha, z0.dtype)[None, :]  # [1, P]
  sin = jnp.maximum(jnp.sin(theta), 1e-12)
  # Near-parallel noises fall back to linear interpolation (the limit of slerp).
  w0 = jnp.where(theta > 1e-6, jnp.sin((1 - alpha) * theta) / sin, 1 - alpha)
  w1 = jnp.where(theta > 1e-6, jnp.sin(alpha * theta) / sin, alpha)
  expand = (slice(None), slice(None)) + (None,) * (z0.ndim - 1)
  return w0[expand] * z0[:, None] + w1[expand] * z1[:, None]


def interpolate(consistency_fn: ConsistencyFn, rng: jax.Array, noise_a: jax.Array, noise_b: jax.Array,
                num_points: int, sigmas: Sequence[float], sigma_min: float,
                clip_denoised: bool = False) -> jax.Array:
  """Images along the slerp of initial noises z_a -> z_b (CM paper Sec. 6), [B, num_points, H, W, C].

  x = Alg. 1 from T slerp(z_a, z_b, alpha). With later time points, each endpoint also has its own
  noise for every later step (drawn from `rng`), slerped with the same alpha: the endpoints are Alg. 1
  samples of their own noises and the path between them stays smooth. (Sharing one later noise along
  the path would make every point converge to the same image.) `consistency_fn` is called on batches
  of B * num_points.
  """
  sigmas = sampling.check_time_points(sigmas, sigma_min, 'interpolation time points')
  batch = noise_a.shape[0]
  alphas = jnp.linspace(0.0, 1.0, num_points)
  flat = lambda z: z.reshape((batch * num_points,) + noise_a.shape[1:])

  def apply_f(x, sigma):
    x0 = consistency_fn(x, jnp.full((x.shape[0],), sigma, x.dtype))
    return jnp.clip(x0, -1.0, 1.0) if clip_denoised else x0

  x = apply_f(flat(sigmas[0] * slerp(noise_a, noise_b, alphas)), sigmas[0])
  keys = jax.random.split(rng, len(sigmas) - 1) if len(sigmas) > 1 else []
  for key, sigma in zip(keys, sigmas[1:]):
    key_a, key_b = jax.random.split(key)  # Not one (2, batch) draw: rows must not depend on batch.
    step_a = jax.random.normal(key_a, noise_a.shape, noise_a.dtype)
    step_b = jax.random.normal(key_b, noise_a.shape, noise_a.dtype)
    x = apply_f(x + np.sqrt(sigma ** 2 - sigma_min ** 2) * flat(slerp(step_a, step_b, alphas)), sigma)
  return x.reshape((batch, num_points) + noise_a.shape[1:])


# --------------------------------------------------------------------------------------------------
# Trivial baselines and errors, for judging edits against the real images (numpy, [-1, 1] floats).
# --------------------------------------------------------------------------------------------------
def _pixel_mask(mask: np.ndarray, image_shape) -> np.ndarray:
  """A [H, W] or [H, W, C] mask as a boolean [H, W, C] one."""
  mask = np.asarray(mask) > 0.5
  return np.broadcast_to(mask[..., None] if mask.ndim == 2 else mask, tuple(image_shape))


def mean_fill(images: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """Fill the pixels where mask is 1 with the mean of each image's other pixels (per channel)."""
  images = np.asarray(images, np.float64)
  mask = _pixel_mask(mask, images.shape[1:])
  known = ~mask
  means = (images * known).sum(axis=(1, 2)) / np.maximum(known.sum(axis=(0, 1)), 1)  # [B, C]
  return np.where(mask, means[:, None, None, :], images).astype(np.float32)


def patch_means(images: np.ndarray, factor: int) -> np.ndarray:
  """Each f x f patch replaced by its mean: nearest upsampling of the low-resolution image."""
  b, h, w, c = images.shape
  low = np.asarray(images, np.float64).reshape(b, h // factor, factor, w // factor, factor, c).mean(
      axis=(2, 4))
  return np.repeat(np.repeat(low, factor, axis=1), factor, axis=2).astype(np.float32)


def luminance(images: np.ndarray) -> np.ndarray:
  """Luma 0.2989 R + 0.5870 G + 0.1140 B, [B, H, W]."""
  return np.asarray(images, np.float64) @ np.asarray(LUMINANCE_WEIGHTS)


def region_rmse(images: np.ndarray, reference: np.ndarray, region: np.ndarray | None = None) -> float:
  """Root mean squared error over the region's pixels (all pixels when None), on [0, 1] intensities."""
  diff = (np.asarray(images, np.float64) - np.asarray(reference, np.float64)) / 2.0
  if region is None:
    return float(np.sqrt(np.mean(diff ** 2)))
  region = _pixel_mask(region, diff.shape[1:])
  return float(np.sqrt(np.mean(diff[:, region] ** 2)))

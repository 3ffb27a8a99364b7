"""Building blocks of the NCSN++ / DDPM++ U-Nets.

The architecture is that of Song et al. 2021, "Score-Based Generative Modeling through Stochastic
Differential Equations" (arXiv 2011.13456, App. H), as used by the consistency-models CIFAR-10 reference
code. FIR resampling follows StyleGAN2 (Karras et al. 2020, arXiv 1912.04958): an `upfirdn2d` that
zero-inserts, pads, filters with a normalised separable kernel and decimates.

Module and parameter names (`Conv_0`, `Dense_0`, `NIN_0/W`, `Conv2d_0/weight`, ...) and their creation
order follow the reference, so the parameter tree has the reference's layout.

Every module computes in `dtype` and keeps its parameters in float32; numerically delicate parts run
in float32 whatever `dtype` is: group-norm statistics and normalisation, pixel norms, the attention
softmax, the Fourier/sinusoidal embeddings and the per-block projections of the noise embedding
(cast to `dtype` where they meet the activations).
"""

import math
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any
Initializer = Callable[..., jax.Array]

# The reference NCSN++ configs all use swish.
act = nn.swish


def default_init(scale: float = 1.0) -> Initializer:
  """DDPM's initialiser: variance scaling, fan_avg, uniform.

  A scale of 0 stands for 1e-10, as in the reference: the last layer of a residual branch then starts
  (almost) at zero, so every block starts as the identity.
  """
  scale = 1e-10 if scale == 0 else scale
  return nn.initializers.variance_scaling(scale, 'fan_avg', 'uniform')


def num_groups(channels: int) -> int:
  """GroupNorm groups for `channels` features, as in the reference."""
  return min(channels // 4, 32)


def group_norm(x: jax.Array, dtype: Dtype) -> jax.Array:
  # Flax computes the statistics, and normalises, in float32 even when x and `dtype` are bfloat16;
  # only the result is rounded to `dtype` (tests/test_precision.py reads that off the jaxpr).
  return nn.GroupNorm(
      num_groups=num_groups(x.shape[-1]), epsilon=1e-6, dtype=dtype, param_dtype=jnp.float32)(x)


def pixel_norm(x: jax.Array, epsilon: float = 1e-8) -> jax.Array:
  """PGGAN's pixel norm (Karras et al. 2018): x / sqrt(mean over channels of x^2 + eps), in float32."""
  x32 = x.astype(jnp.float32)
  return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + epsilon)).astype(x.dtype)


def conv(x: jax.Array, features: int, kernel_size: int, dtype: Dtype, stride: int = 1,
         init_scale: float = 1.0) -> jax.Array:
  """A 'SAME' convolution with DDPM initialisation, created in the caller's scope (named Conv_i)."""
  return nn.Conv(
      features, kernel_size=(kernel_size, kernel_size), strides=(stride, stride), padding='SAME',
      kernel_init=default_init(init_scale), bias_init=nn.initializers.zeros, dtype=dtype,
      param_dtype=jnp.float32)(x)


# ----------------------------------------------------------------------------------------------------
# FIR up/down sampling (StyleGAN2's upfirdn2d).


def fir_kernel_1d(fir_kernel: Sequence[float], gain: float = 1.0) -> np.ndarray:
  """One axis of the separable FIR kernel: k normalised to sum to `gain`.

  The 2-D kernel is outer(k, k) / sum(outer(k, k)) = outer(k / sum(k), k / sum(k)), so a 2-D gain g is a
  gain of sqrt(g) per axis.
  """
  k = np.asarray(fir_kernel, dtype=np.float64)
  if k.ndim != 1 or k.size == 0 or not np.all(np.isfinite(k)) or k.sum() == 0:
    raise ValueError(f'fir_kernel must be a non-empty 1-D sequence with a non-zero sum, got {fir_kernel}.')
  return k / k.sum() * gain


def upfirdn2d(x: jax.Array, kernel: np.ndarray, up: int = 1, down: int = 1, pad0: int = 0,
              pad1: int = 0) -> jax.Array:
  """StyleGAN2's upfirdn2d on NHWC with the separable kernel outer(`kernel`, `kernel`).

  Per spatial axis: 1. insert `up - 1` zeros after every pixel, 2. pad (`pad0` before, `pad1` after;
  negative crops), 3. convolve (true convolution, VALID) with `kernel`, 4. keep every `down`-th pixel.
  """
  x = _upfirdn1d(x, kernel, up, down, pad0, pad1, axis=1)
  return _upfirdn1d(x, kernel, up, down, pad0, pad1, axis=2)


def _upfirdn1d(x: jax.Array, kernel: np.ndarray, up: int, down: int, pad0: int, pad1: int,
               axis: int) -> jax.Array:
  # One lax.pad does steps 1-2: interior padding inserts the zeros, and the trailing up - 1 zeros of
  # step 1 join pad1. Steps 3-4 are a sum of len(kernel) strided shifted slices: XLA fuses these into one
  # elementwise loop, about 100x faster on CPU than a depthwise (feature-grouped) convolution.
  config = [(0, 0, 0)] * x.ndim
  config[axis] = (pad0, pad1 + up - 1, up - 1)
  x = jax.lax.pad(x, jnp.zeros((), x.dtype), config)
  taps = len(kernel)
  n_out = (x.shape[axis] - taps) // down + 1
  out = None
  for tap, weight in enumerate(kernel[::-1]):  # Flipped: a convolution, not a correlation.
    term = jax.lax.slice_in_dim(x, tap, tap + (n_out - 1) * down + 1, down, axis) * float(weight)
    out = term if out is None else out + term
  return out


def upsample_2d(x: jax.Array, fir_kernel: Sequence[float], factor: int = 2) -> jax.Array:
  """FIR upsampling by `factor`; a constant image stays constant away from the border."""
  # Zero insertion keeps 1 of `factor` samples per axis, hence the gain.
  kernel = fir_kernel_1d(fir_kernel, gain=factor)
  p = len(kernel) - factor
  return upfirdn2d(x, kernel, up=factor, pad0=(p + 1) // 2 + factor - 1, pad1=p // 2)


def downsample_2d(x: jax.Array, fir_kernel: Sequence[float], factor: int = 2) -> jax.Array:
  """FIR (anti-aliased) downsampling by `factor`."""
  kernel = fir_kernel_1d(fir_kernel)
  p = len(kernel) - factor
  return upfirdn2d(x, kernel, down=factor, pad0=(p + 1) // 2, pad1=p // 2)


def naive_upsample_2d(x: jax.Array, factor: int = 2) -> jax.Array:
  """Nearest-neighbour upsampling."""
  return jnp.repeat(jnp.repeat(x, factor, axis=1), factor, axis=2)


def naive_downsample_2d(x: jax.Array, factor: int = 2) -> jax.Array:
  """Average pooling over `factor` x `factor` blocks."""
  b, h, w, c = x.shape
  return x.reshape(b, h // factor, factor, w // factor, factor, c).mean(axis=(2, 4))


class FirConv2d(nn.Module):
  """A convolution fused with FIR up- or downsampling by 2 (StyleGAN2's `upsample_conv_2d` and
  `conv_downsample_2d`): the padding is done once, and the upsampling conv is a transposed conv."""

  features: int
  kernel_size: int = 3
  up: bool = False
  down: bool = False
  fir_kernel: Sequence[float] = (1, 3, 3, 1)
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    ks = self.kernel_size
    w = self.param('weight', default_init(), (ks, ks, x.shape[-1], self.features), jnp.float32)
    b = self.param('bias', nn.initializers.zeros, (self.features,), jnp.float32)
    x = x.astype(self.dtype)
    w = w.astype(self.dtype)
    dims = ('NHWC', 'HWIO', 'NHWC')
    if self.up:
      # Transposed stride-2 conv (output (H - 1) * 2 + ks), then the FIR filter brings it to 2H.
      x = jax.lax.conv_general_dilated(
          x, w, window_strides=(1, 1), padding=[(ks - 1, ks - 1)] * 2, lhs_dilation=(2, 2),
          dimension_numbers=dims)
      kernel = fir_kernel_1d(self.fir_kernel, gain=2)
      p = len(kernel) - 2 - (ks - 1)
      x = upfirdn2d(x, kernel, pad0=(p + 1) // 2 + 1, pad1=p // 2 + 1)
    elif self.down:
      kernel = fir_kernel_1d(self.fir_kernel)
      p = len(kernel) - 2 + (ks - 1)
      x = upfirdn2d(x, kernel, pad0=(p + 1) // 2, pad1=p // 2)
      x = jax.lax.conv_general_dilated(
          x, w, window_strides=(2, 2), padding='VALID', dimension_numbers=dims)
    else:
      x = jax.lax.conv_general_dilated(
          x, w, window_strides=(1, 1), padding='SAME', dimension_numbers=dims)
    return x + b.astype(self.dtype)


class Upsample(nn.Module):
  """2x upsampling: FIR or nearest neighbour, optionally with a convolution."""

  out_ch: Optional[int] = None
  with_conv: bool = False
  fir: bool = False
  fir_kernel: Sequence[float] = (1, 3, 3, 1)
  conv_size: int = 3
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    out_ch = self.out_ch or x.shape[-1]
    if not self.fir:
      h = naive_upsample_2d(x)
      if self.with_conv:
        h = conv(h, out_ch, self.conv_size, self.dtype)
    elif not self.with_conv:
      h = upsample_2d(x, self.fir_kernel)
    else:
      h = FirConv2d(out_ch, self.conv_size, up=True, fir_kernel=self.fir_kernel, dtype=self.dtype,
                    name='Conv2d_0')(x)
    return h


class Downsample(nn.Module):
  """2x downsampling: FIR or average pooling, or a (FIR-fused) stride-2 convolution."""

  out_ch: Optional[int] = None
  with_conv: bool = False
  fir: bool = False
  fir_kernel: Sequence[float] = (1, 3, 3, 1)
  conv_size: int = 3
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    out_ch = self.out_ch or x.shape[-1]
    if not self.fir:
      if self.with_conv:
        return conv(x, out_ch, self.conv_size, self.dtype, stride=2)
      return naive_downsample_2d(x)
    if not self.with_conv:
      return downsample_2d(x, self.fir_kernel)
    return FirConv2d(out_ch, self.conv_size, down=True, fir_kernel=self.fir_kernel, dtype=self.dtype,
                     name='Conv2d_0')(x)


# ----------------------------------------------------------------------------------------------------
# Noise-level embeddings.


class GaussianFourierProjection(nn.Module):
  """Random Fourier features [sin(2 pi W t), cos(2 pi W t)], W ~ N(0, scale^2) (Tancik et al. 2020).

  W lives in `params` (so checkpoints and parameter counts match the reference) but is never trained:
  the gradient is stopped.
  """

  embedding_size: int = 256
  scale: float = 1.0

  @nn.compact
  def __call__(self, t: jax.Array) -> jax.Array:
    w = self.param('W', nn.initializers.normal(stddev=self.scale), (self.embedding_size,), jnp.float32)
    w = jax.lax.stop_gradient(w)
    # float32 regardless of the compute dtype: t * W can be large, and bfloat16 sin/cos of it is noise.
    proj = t.astype(jnp.float32)[:, None] * w[None, :] * (2 * np.pi)
    return jnp.concatenate([jnp.sin(proj), jnp.cos(proj)], axis=-1)


def sinusoidal_embedding(t: jax.Array, dim: int, max_positions: int = 10000) -> jax.Array:
  """Transformer-style sinusoidal embedding of a float [B] array (as in DDPM), shape [B, dim]."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_positions) / (half - 1) * jnp.arange(half, dtype=jnp.float32))
  args = t.astype(jnp.float32)[:, None] * freqs[None, :]
  emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, [(0, 0), (0, 1)])
  return emb


# ----------------------------------------------------------------------------------------------------
# Blocks.


class NIN(nn.Module):
  """A per-pixel dense layer ("network in network"), i.e. a 1x1 conv with params W [in, out], b."""

  num_units: int
  init_scale: float = 0.1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    w = self.param('W', default_init(self.init_scale), (x.shape[-1], self.num_units), jnp.float32)
    b = self.param('b', nn.initializers.zeros, (self.num_units,), jnp.float32)
    x = x.astype(self.dtype)
    return jnp.dot(x, w.astype(self.dtype)) + b.astype(self.dtype)


class AttnBlockpp(nn.Module):
  """Single-head self-attention over all pixels (DDPM), with an optional 1/sqrt(2) skip rescale."""

  skip_rescale: bool = False
  init_scale: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, height, width, c = x.shape
    h = group_norm(x, self.dtype)
    q = NIN(c, dtype=self.dtype)(h).reshape(b, height * width, c)
    k = NIN(c, dtype=self.dtype)(h).reshape(b, height * width, c)
    v = NIN(c, dtype=self.dtype)(h).reshape(b, height * width, c)
    logits = jnp.einsum('bqc,bkc->bqk', q, k, preferred_element_type=jnp.float32) * c**-0.5
    weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    h = jnp.einsum('bqk,bkc->bqc', weights, v).reshape(b, height, width, c)
    h = NIN(c, init_scale=self.init_scale, dtype=self.dtype)(h)
    return _residual(x, h, self.skip_rescale)


def _residual(x: jax.Array, h: jax.Array, skip_rescale: bool) -> jax.Array:
  # Rescaling by 1/sqrt(2) keeps the variance of the sum of two unit-variance branches at 1 (NCSN++).
  # A Python float is weakly typed, so bfloat16 stays bfloat16.
  return (x + h) * (1 / math.sqrt(2.0)) if skip_rescale else x + h


class ResnetBlockDDPMpp(nn.Module):
  """DDPM's residual block: GN-act-conv, + dense(temb), GN-act-dropout-conv, NIN shortcut."""

  out_ch: Optional[int] = None
  dropout: float = 0.1
  skip_rescale: bool = False
  init_scale: float = 0.0
  conv_size: int = 3
  adaptive_double_norm: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, temb: Optional[jax.Array] = None, train: bool = True) -> jax.Array:
    c = x.shape[-1]
    out_ch = self.out_ch or c
    h = act(group_norm(x, self.dtype))
    h = conv(h, out_ch, self.conv_size, self.dtype)
    h = act(_embed_and_norm(h, temb, out_ch, self.adaptive_double_norm, self.dtype))
    h = nn.Dropout(self.dropout)(h, deterministic=not train)
    h = conv(h, out_ch, self.conv_size, self.dtype, init_scale=self.init_scale)
    if c != out_ch:
      x = NIN(out_ch, dtype=self.dtype)(x)
    return _residual(x.astype(self.dtype), h, self.skip_rescale)


class ResnetBlockBigGANpp(nn.Module):
  """BigGAN's residual block, which can up- or downsample both branches (FIR or naive)."""

  up: bool = False
  down: bool = False
  out_ch: Optional[int] = None
  dropout: float = 0.1
  fir: bool = False
  fir_kernel: Sequence[float] = (1, 3, 3, 1)
  skip_rescale: bool = True
  init_scale: float = 0.0
  conv_size: int = 3
  adaptive_double_norm: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, temb: Optional[jax.Array] = None, train: bool = True) -> jax.Array:
    c = x.shape[-1]
    out_ch = self.out_ch or c
    x = x.astype(self.dtype)
    h = act(group_norm(x, self.dtype))
    if self.up:
      resample = (lambda y: upsample_2d(y, self.fir_kernel)) if self.fir else naive_upsample_2d
    elif self.down:
      resample = (lambda y: downsample_2d(y, self.fir_kernel)) if self.fir else naive_downsample_2d
    else:
      resample = None
    if resample is not None:
      h, x = resample(h), resample(x)
    h = conv(h, out_ch, self.conv_size, self.dtype)
    h = act(_embed_and_norm(h, temb, out_ch, self.adaptive_double_norm, self.dtype))
    h = nn.Dropout(self.dropout)(h, deterministic=not train)
    h = conv(h, out_ch, self.conv_size, self.dtype, init_scale=self.init_scale)
    if c != out_ch or resample is not None:
      x = conv(x, out_ch, 1, self.dtype)
    return _residual(x, h, self.skip_rescale)


def _temb_bias(temb: jax.Array, out_ch: int, dtype: Dtype) -> jax.Array:
  """Per-channel bias from the noise-level embedding (a Dense_i in the caller's scope), projected in
  float32 (a [B, 4 nf] x [4 nf, C] product) and rounded to the activations' `dtype` once."""
  bias = nn.Dense(out_ch, kernel_init=default_init(), dtype=jnp.float32,
                  param_dtype=jnp.float32)(act(temb.astype(jnp.float32)))
  return bias.astype(dtype)[:, None, None, :]


def _embed_and_norm(h: jax.Array, temb: Optional[jax.Array], out_ch: int, adaptive_double_norm: bool,
                    dtype: Dtype) -> jax.Array:
  """The block's second GroupNorm with the noise embedding: GN(h + bias(temb)) as in NCSN++, or sCM's
  adaptive double normalisation GN(h) * pnorm(scale(temb)) + pnorm(shift(temb)) (Lu & Song 2024,
  Sec. 4.1), whose per-channel modulation has unit RMS whatever the embedding's scale."""
  if temb is None:
    return group_norm(h, dtype)
  if not adaptive_double_norm:
    return group_norm(h + _temb_bias(temb, out_ch, dtype), dtype)
  # Created in the same place as the bias's Dense (Dense_0), with twice its features.
  modulation = nn.Dense(2 * out_ch, kernel_init=default_init(), dtype=jnp.float32,
                        param_dtype=jnp.float32)(act(temb.astype(jnp.float32)))
  scale, shift = _two_pixel_norms(modulation)
  return group_norm(h, dtype) * scale.astype(dtype) + shift.astype(dtype)


def _two_pixel_norms(modulation: jax.Array) -> tuple[jax.Array, jax.Array]:
  """pnorm(scale), pnorm(shift) of a [B, 2 C] projection, each normalised over its C channels."""
  scale, shift = jnp.split(modulation, 2, axis=-1)
  return pixel_norm(scale)[:, None, None, :], pixel_norm(shift)[:, None, None, :]


class Combine(nn.Module):
  """Merges a pyramid branch into the main branch: 1x1 conv of `x` to y's channels, then sum or concat."""

  method: str = 'cat'
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
    h = conv(x, y.shape[-1], 1, self.dtype)
    if self.method == 'cat':
      return jnp.concatenate([h, y.astype(h.dtype)], axis=-1)
    if self.method == 'sum':
      return h + y
    raise ValueError(f'Unknown combine method {self.method!r}.')

"""EDM2's magnitude-preserving U-Net (Karras et al. 2024, "Analyzing and Improving the Training
Dynamics of Diffusion Models", arXiv 2312.02696; NVlabs/edm2 `training/networks_edm2.py`, config G).

Every layer preserves the magnitude of its input: weights are normalised per output channel at every
call (EDM2 eq. 46-47: w / (eps + ||w_o|| / sqrt(fan_in)) * gain / sqrt(fan_in)), activations go through
mp_silu = silu / 0.596, residual and attention branches are merged by mp_sum (a normalised lerp),
skip connections by mp_cat, and there are no biases and no normalisation layers but pixel norm.
The noise level enters through random Fourier features (cos(2 pi (f t + phi)) sqrt(2), fixed) and a
gain-scaled affine per block; the output is a conv scaled by a learned gain (0 at init).

Architecture, in EDM2's terms and names (level widths nf * ch_mult, blocks of one level alike):
  - emb = mp_silu(mp_sum(emb_noise(fourier(c_noise)), emb_label(onehot sqrt(L)), 0.5)), width
    max(widths); the input gets a channel of ones.
  - Encoder: a 3x3 conv, then per level a down block (average pooling) from the second level on and
    `num_res_blocks` blocks, attention at `attn_resolutions`; each block pixel-normalises its input.
  - Decoder: two blocks (the first with attention) at the lowest resolution, then per level an up
    block (nearest) from the second-lowest on and `num_res_blocks + 1` blocks on mp_cat([h, skip]).
  - Block: [resample, 1x1 skip conv, pixel norm (encoder)], 3x3 conv of mp_silu(x), times
    (1 + gain * affine(emb)), mp_silu, dropout, 3x3 conv, mp_sum with x (t = 0.3), then optional
    attention (q, k, v pixel-normalised per head, mp_sum t = 0.3), clipped to +-256.

Parameters are named as EDM2's modules (`enc_8x8_block0/conv_res0/kernel`), kernels in Flax layout
(3x3: HWIO, linear: in x out). Training here uses the weight normalisation of every call but not
EDM2's forced normalisation of the stored weights after each step (a converted teacher is frozen).
"""

import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
_EPS = 1e-4
_RES_BALANCE = 0.3
_ATTN_BALANCE = 0.3
_LABEL_BALANCE = 0.5
_CONCAT_BALANCE = 0.5
_CLIP_ACT = 256.0


def normalize(x: jax.Array, axes: Sequence[int], eps: float = _EPS) -> jax.Array:
  """x / (eps + ||x|| / sqrt(n)) over `axes` (n elements): unit mean square (EDM2's normalize)."""
  x32 = x.astype(jnp.float32)
  size = math.prod(x.shape[a] for a in axes)
  norm = jnp.sqrt(jnp.sum(jnp.square(x32), axis=tuple(axes), keepdims=True))
  return (x32 / (eps + norm / math.sqrt(size))).astype(x.dtype)


def mp_silu(x: jax.Array) -> jax.Array:
  return nn.silu(x) / 0.596


def mp_sum(a: jax.Array, b: jax.Array, t: float) -> jax.Array:
  return (a + t * (b - a)) / math.sqrt((1 - t)**2 + t**2)


def mp_cat(a: jax.Array, b: jax.Array, t: float) -> jax.Array:
  na, nb = a.shape[-1], b.shape[-1]
  c = math.sqrt((na + nb) / ((1 - t)**2 + t**2))
  return jnp.concatenate([a * (c / math.sqrt(na) * (1 - t)), b * (c / math.sqrt(nb) * t)], axis=-1)


class MPConv(nn.Module):
  """A bias-free conv (kernel_size > 0, HWIO) or linear layer (kernel_size 0, in x out) whose weights
  are normalised per output channel at every call, then scaled by gain / sqrt(fan_in)."""

  features: int
  kernel_size: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, gain: jax.Array | float = 1.0) -> jax.Array:
    k = self.kernel_size
    shape = (k, k, x.shape[-1], self.features) if k else (x.shape[-1], self.features)
    w = self.param('kernel', nn.initializers.normal(1.0), shape, jnp.float32)
    fan_in = math.prod(shape[:-1])
    w = normalize(w, tuple(range(len(shape) - 1))) * (gain / math.sqrt(fan_in))
    w = w.astype(self.dtype)
    x = x.astype(self.dtype)
    if not k:
      return x @ w
    return jax.lax.conv_general_dilated(x, w, (1, 1), [(k // 2, k // 2)] * 2,
                                        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def _resample(x: jax.Array, mode: str) -> jax.Array:
  # EDM2's resample with its [1, 1] filter: 2x2 average pooling down, nearest neighbour up.
  if mode == 'down':
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))
  if mode == 'up':
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
  return x


class Block(nn.Module):
  """EDM2's Block ('enc' or 'dec' flavour)."""

  out_ch: int
  flavor: str = 'enc'
  resample_mode: str = 'keep'
  num_heads: int = 0
  dropout: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, emb: jax.Array, train: bool) -> jax.Array:
    conv = lambda features, k, name: MPConv(features, k, self.dtype, name=name)
    x = _resample(x, self.resample_mode)
    skip = conv(self.out_ch, 1, 'conv_skip') if x.shape[-1] != self.out_ch else None
    if self.flavor == 'enc':
      if skip is not None:
        x = skip(x)
      x = normalize(x, (-1,))  # Pixel norm.
    y = conv(self.out_ch, 3, 'conv_res0')(mp_silu(x))
    emb_gain = self.param('emb_gain', nn.initializers.zeros, (), jnp.float32)
    c = MPConv(self.out_ch, 0, jnp.float32, name='emb_linear')(emb, gain=emb_gain) + 1
    y = mp_silu(y * c[:, None, None, :].astype(y.dtype))
    y = nn.Dropout(self.dropout)(y, deterministic=not train)
    y = conv(self.out_ch, 3, 'conv_res1')(y)
    if self.flavor == 'dec' and skip is not None:
      x = skip(x)
    x = mp_sum(x.astype(y.dtype), y, _RES_BALANCE)
    if self.num_heads:
      b, height, width, channels = x.shape
      heads = self.num_heads
      qkv = conv(3 * channels, 1, 'attn_qkv')(x)
      # Output channels laid out per head, per channel, (q, k, v), as EDM2's reshape.
      qkv = normalize(qkv.reshape(b, height * width, heads, channels // heads, 3), (3,))
      q, k, v = (qkv[..., i] for i in range(3))
      logits = jnp.einsum('bqhc,bkhc->bhqk', q, k / math.sqrt(channels // heads),
                          preferred_element_type=jnp.float32)
      weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
      y = jnp.einsum('bhqk,bkhc->bqhc', weights, v).reshape(b, height, width, channels)
      x = mp_sum(x, conv(channels, 1, 'attn_proj')(y), _ATTN_BALANCE)
    return jnp.clip(x, -_CLIP_ACT, _CLIP_ACT)


class EDM2UNet(nn.Module):
  """EDM2's UNet. Fields mirror `config.model` (see configs/default.py); `get_network` builds it."""

  nf: int = 192  # model_channels
  ch_mult: Sequence[int] = (1, 2, 3, 4)
  num_res_blocks: int = 3
  attn_resolutions: Sequence[int] = (16, 8)
  num_head_channels: int = 64  # channels_per_head
  dropout: float = 0.0
  num_classes: int = 0
  dtype: Dtype = jnp.float32  # Compute dtype; parameters are always float32.

  @nn.compact
  def __call__(self, x: jax.Array, noise_cond: jax.Array, labels: Optional[jax.Array] = None,
               train: bool = False) -> jax.Array:
    """Runs the U-Net on [B, H, W, C] images and [B] c_noise; returns [B, H, W, C] float32."""
    widths = [self.nf * m for m in self.ch_mult]
    cnoise, cemb = widths[0], max(widths)
    # Fixed random Fourier features (EDM2's MPFourier buffers), kept in params like NCSN++'s W.
    freqs = self.param('emb_fourier_freqs', lambda k, s, d: 2 * math.pi * jax.random.normal(k, s, d),
                       (cnoise,), jnp.float32)
    phases = self.param('emb_fourier_phases', lambda k, s, d: 2 * math.pi * jax.random.uniform(k, s, d),
                        (cnoise,), jnp.float32)
    t = noise_cond.astype(jnp.float32)[:, None] * jax.lax.stop_gradient(freqs)[None, :]
    fourier = jnp.cos(t + jax.lax.stop_gradient(phases)[None, :]) * math.sqrt(2)
    emb = MPConv(cemb, 0, jnp.float32, name='emb_noise')(fourier)
    if self.num_classes > 0:
      if labels is None:
        raise ValueError(
            f'The network is class-conditional (num_classes={self.num_classes}); pass labels.')
      w = self.param('emb_label', nn.initializers.normal(1.0), (self.num_classes, cemb), jnp.float32)
      # emb_label(onehot * sqrt(L)): row `label` of the normalised weight, times sqrt(L) / sqrt(L).
      w = normalize(w, (0,))
      emb = mp_sum(emb, jnp.take(w, labels, axis=0), _LABEL_BALANCE)
    emb = mp_silu(emb)

    block = lambda name, out_ch, flavor, mode='keep', attn=False: Block(
        out_ch, flavor, mode, out_ch // self.num_head_channels if attn else 0, self.dropout,
        self.dtype, name=name)
    size = x.shape[1]
    h = jnp.concatenate([x, jnp.ones_like(x[..., :1])], axis=-1).astype(self.dtype)
    skips = []
    for level, width in enumerate(widths):
      res = size >> level
      if level == 0:
        h = MPConv(width, 3, self.dtype, name=f'enc_{res}x{res}_conv')(h)
      else:
        h = block(f'enc_{res}x{res}_down', h.shape[-1], 'enc', 'down')(h, emb, train)
      skips.append(h)
      for idx in range(self.num_res_blocks):
        h = block(f'enc_{res}x{res}_block{idx}', width, 'enc',
                  attn=res in self.attn_resolutions)(h, emb, train)
        skips.append(h)
    for level in reversed(range(len(widths))):
      res = size >> level
      if level == len(widths) - 1:
        h = block(f'dec_{res}x{res}_in0', h.shape[-1], 'dec', attn=True)(h, emb, train)
        h = block(f'dec_{res}x{res}_in1', h.shape[-1], 'dec')(h, emb, train)
      else:
        h = block(f'dec_{res}x{res}_up', h.shape[-1], 'dec', 'up')(h, emb, train)
      for idx in range(self.num_res_blocks + 1):
        h = mp_cat(h, skips.pop(), _CONCAT_BALANCE)
        h = block(f'dec_{res}x{res}_block{idx}', widths[level], 'dec',
                  attn=res in self.attn_resolutions)(h, emb, train)
    assert not skips
    out_gain = self.param('out_gain', nn.initializers.zeros, (), jnp.float32)
    out = MPConv(x.shape[-1], 3, jnp.float32, name='out_conv')(h.astype(jnp.float32), gain=out_gain)
    return out.astype(jnp.float32)

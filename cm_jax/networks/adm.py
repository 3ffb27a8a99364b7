"""The ADM U-Net (Dhariwal & Nichol 2021, "Diffusion Models Beat GANs", arXiv 2105.05233).

The network of the consistency-models paper's ImageNet 64x64 and LSUN 256x256 runs (guided-diffusion's
`UNetModel`, as used by openai/consistency_models). It maps (x, c_noise, labels) to an output of x's
shape and knows nothing of noise schedules: the consistency-models code feeds it
c_noise = 1000 * ln(sigma) / 4 (noise.noise_cond_scale = 1000), embedded like a diffusion timestep.

Architecture, in the reference's terms:
  - c_noise -> sinusoidal timestep embedding (nf features, max period 10000, cos then sin) -> Linear,
    SiLU, Linear to 4 nf; a class embedding is added when class-conditional.
  - A 3x3 conv to nf * ch_mult[0], then per level `num_res_blocks` residual blocks (with attention at
    the resolutions in `attn_resolutions`), and between levels a stride-2 conv or, with
    `resblock_updown`, a residual block that average-pools.
  - Middle: residual block, attention, residual block.
  - Per level on the way up, `num_res_blocks + 1` residual blocks on [h, skip] concatenations (with
    attention where the encoder had it), then a nearest-neighbour upsampling (conv or residual block).
  - GroupNorm(32), SiLU and a 3x3 conv to the image channels.
  Residual blocks: GroupNorm, SiLU, conv; the embedding enters as h + Linear(SiLU(emb)) or, with
  `use_scale_shift_norm`, as GroupNorm(h) * (1 + scale) + shift (FiLM); then SiLU, dropout, conv. The last
  conv of every residual block, every attention output projection and the output conv start at zero
  (the reference's `zero_module`), so an untrained network outputs exactly 0.

Parameter tree (reference module in brackets): `time_embed_in`/`time_embed_out` [time_embed.0/.2],
`label_embed` [label_emb], `in_conv` [input_blocks.0], `enc_{k}_res`/`enc_{k}_attn`/`enc_{k}_down`
[input_blocks.k], `mid_res_0`/`mid_attn`/`mid_res_1` [middle_block], `dec_{k}_res`/`dec_{k}_attn`/
`dec_{k}_up` [output_blocks.k], `out_norm`/`out_conv` [out]. Inside a residual block: `in_norm`,
`in_conv`, `emb_proj`, `out_norm`, `out_conv`, `skip`; inside attention: `norm`, `qkv`, `proj_out`.
Initialisation is PyTorch's default (U(+-1/sqrt(fan_in)) weights and biases, N(0, 1) class embedding).

Precision: parameters are float32; the body computes in `dtype`. As in the reference's fp16 mode, the
noise/class embedding and its per-block projections, the group-norm statistics and normalisation, the
attention softmax and the output head run in float32.
"""

import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from cm_jax.networks import layers

Dtype = Any

# guided-diffusion's `normalization`: GroupNorm with 32 groups and PyTorch's epsilon.
NUM_GROUPS = 32
_GROUP_NORM_EPSILON = 1e-5


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
  """ADM's sinusoidal embedding of a float [B] array: [cos(t f_i), sin(t f_i)], f_i = P^(-i / half).

  It differs from the DDPM/NCSN++ embedding (`layers.sinusoidal_embedding`) in the order (cos first)
  and the frequency spacing (divided by half, not half - 1).
  """
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[:, None] * freqs[None, :]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, [(0, 0), (0, 1)])
  return emb


def _torch_kernel_init() -> nn.initializers.Initializer:
  # PyTorch's default Conv/Linear weight init, kaiming_uniform(a=sqrt(5)): U(-b, b), b = 1/sqrt(fan_in),
  # i.e. a variance scale of 1/3 (b = sqrt(3 * scale / fan_in)).
  return nn.initializers.variance_scaling(1 / 3, 'fan_in', 'uniform')


def _torch_bias_init(fan_in: int) -> nn.initializers.Initializer:
  bound = 1 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def _conv(x: jax.Array, features: int, name: str, dtype: Dtype, kernel_size: int = 3, stride: int = 1,
          zero_init: bool = False) -> jax.Array:
  """A conv with the reference's explicit padding k // 2, created in the caller's scope."""
  # Explicit padding, not 'SAME': for a stride-2 conv 'SAME' pads (0, 1) and samples other pixels than
  # PyTorch's padding=1.
  pad = kernel_size // 2
  fan_in = x.shape[-1] * kernel_size * kernel_size
  return nn.Conv(
      features, (kernel_size, kernel_size), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
      kernel_init=nn.initializers.zeros if zero_init else _torch_kernel_init(),
      bias_init=nn.initializers.zeros if zero_init else _torch_bias_init(fan_in),
      dtype=dtype, param_dtype=jnp.float32, name=name)(x)


def _dense(x: jax.Array, features: int, name: str, dtype: Dtype, zero_init: bool = False) -> jax.Array:
  return nn.Dense(
      features, kernel_init=nn.initializers.zeros if zero_init else _torch_kernel_init(),
      bias_init=nn.initializers.zeros if zero_init else _torch_bias_init(x.shape[-1]),
      dtype=dtype, param_dtype=jnp.float32, name=name)(x)


def num_groups(channels: int, edm_groups: bool = False) -> int:
  """GroupNorm groups: guided-diffusion's 32, or EDM's min(32, C // 4) (the same from 128 channels)."""
  return min(NUM_GROUPS, channels // 4) if edm_groups else NUM_GROUPS


def _group_norm(x: jax.Array, name: str, edm_groups: bool = False) -> jax.Array:
  # The reference's GroupNorm32 normalises in float32 and casts back to the input's dtype.
  y = nn.GroupNorm(num_groups=num_groups(x.shape[-1], edm_groups), epsilon=_GROUP_NORM_EPSILON,
                   dtype=jnp.float32, param_dtype=jnp.float32, name=name)(x.astype(jnp.float32))
  return y.astype(x.dtype)


def _upsample_nearest(x: jax.Array) -> jax.Array:
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def _avg_pool(x: jax.Array) -> jax.Array:
  b, h, w, c = x.shape
  pooled = x.astype(jnp.float32).reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))
  return pooled.astype(x.dtype)


class ResBlock(nn.Module):
  """ADM's residual block, optionally resampling (nearest up / average-pool down) both paths."""

  out_ch: int
  dropout: float = 0.0
  use_scale_shift_norm: bool = True
  adaptive_double_norm: bool = False  # Needs use_scale_shift_norm.
  up: bool = False
  down: bool = False
  edm_groups: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, emb: jax.Array, train: bool) -> jax.Array:
    h = nn.silu(_group_norm(x, 'in_norm', self.edm_groups))
    # Resampling sits between the first norm and conv, for the skip path too.
    if self.up:
      h, x = _upsample_nearest(h), _upsample_nearest(x)
    elif self.down:
      h, x = _avg_pool(h), _avg_pool(x)
    h = _conv(h, self.out_ch, 'in_conv', self.dtype)

    emb_features = 2 * self.out_ch if self.use_scale_shift_norm else self.out_ch
    emb_out = _dense(nn.silu(emb), emb_features, 'emb_proj', jnp.float32)
    emb_out = emb_out.astype(h.dtype)[:, None, None, :]
    if self.use_scale_shift_norm and self.adaptive_double_norm:
      # sCM's adaptive double normalisation (Lu & Song 2024, Sec. 4.1): GN(h) * pnorm(scale) +
      # pnorm(shift), each pixel-normalised over its channels (in float32, as the embedding).
      scale, shift = jnp.split(emb_out.astype(jnp.float32), 2, axis=-1)
      h = (_group_norm(h, 'out_norm', self.edm_groups) * layers.pixel_norm(scale).astype(h.dtype)
           + layers.pixel_norm(shift).astype(h.dtype))
    elif self.use_scale_shift_norm:
      scale, shift = jnp.split(emb_out, 2, axis=-1)
      h = _group_norm(h, 'out_norm', self.edm_groups) * (1 + scale) + shift
    else:
      h = _group_norm(h + emb_out, 'out_norm', self.edm_groups)
    h = nn.silu(h)
    h = nn.Dropout(self.dropout)(h, deterministic=not train)
    h = _conv(h, self.out_ch, 'out_conv', self.dtype, zero_init=True)

    if x.shape[-1] != self.out_ch:
      x = _conv(x, self.out_ch, 'skip', self.dtype, kernel_size=1)
    return x + h


class AttentionBlock(nn.Module):
  """Multi-head self-attention over all pixels, with a residual connection."""

  num_heads: int
  # True: the qkv projection's channels are [q | k | v], each split into heads (guided-diffusion's
  # QKVAttention, and the flash-attention layout of openai/consistency_models). False: split into heads
  # first, each [q | k | v] (guided-diffusion's QKVAttentionLegacy, its default).
  use_new_attention_order: bool = False
  edm_groups: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, height, width, channels = x.shape
    heads = self.num_heads
    head_ch = channels // heads
    qkv = _dense(_group_norm(x, 'norm', self.edm_groups), 3 * channels, 'qkv', self.dtype)
    qkv = qkv.reshape(b, height * width, 3 * channels)
    if self.use_new_attention_order:
      q, k, v = (t.reshape(b, -1, heads, head_ch) for t in jnp.split(qkv, 3, axis=-1))
    else:
      q, k, v = jnp.split(qkv.reshape(b, -1, heads, 3 * head_ch), 3, axis=-1)
    # Scaling q and k by d^(-1/4) each (not the logits by d^(-1/2)) keeps low-precision logits in range.
    scale = head_ch**-0.25
    logits = jnp.einsum('bthd,bshd->bhts', q * scale, k * scale, preferred_element_type=jnp.float32)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    attended = jnp.einsum('bhts,bshd->bthd', weights, v).reshape(b, height, width, channels)
    return x + _dense(attended, channels, 'proj_out', self.dtype, zero_init=True)


class ADM(nn.Module):
  """The ADM U-Net. Fields mirror `config.model` (see configs/default.py); `get_network` builds it."""

  nf: int = 192  # model_channels
  ch_mult: Sequence[int] = (1, 2, 3, 4)
  num_res_blocks: int = 3
  attn_resolutions: Sequence[int] = (32, 16, 8)  # Spatial resolutions, not downsampling rates.
  dropout: float = 0.0
  num_heads: int = 4
  num_head_channels: int = -1  # > 0: heads of this width, overriding num_heads.
  num_heads_upsample: int = -1  # Heads on the way up when num_head_channels == -1; -1: num_heads.
  use_scale_shift_norm: bool = True
  resblock_updown: bool = False
  use_new_attention_order: bool = False
  num_classes: int = 0
  adaptive_double_norm: bool = False  # sCM's, in place of the (1 + scale), shift of scale-shift norm.
  # EDM's DhariwalUNet: GroupNorm groups min(32, C // 4) (the same as 32 from 128 channels up), and
  # C // num_head_channels heads, none (no attention layer) where that is 0.
  edm_groups: bool = False
  dtype: Dtype = jnp.float32  # Compute dtype; parameters are always float32.

  def _heads(self, channels: int, upsampling: bool) -> int:
    if self.num_head_channels > 0:
      return channels // self.num_head_channels
    if upsampling and self.num_heads_upsample > 0:
      return self.num_heads_upsample
    return self.num_heads

  @nn.compact
  def __call__(self, x: jax.Array, noise_cond: jax.Array, labels: Optional[jax.Array] = None,
               train: bool = False) -> jax.Array:
    """Runs the U-Net.

    Args:
      x: [B, H, W, C] images (any float dtype; computed in `dtype`).
      noise_cond: [B] noise conditioning (c_noise), embedded as a diffusion timestep.
      labels: [B] int class labels, or None; ignored unless num_classes > 0.
      train: enables dropout, which then needs the 'dropout' rng.

    Returns:
      [B, H, W, C] float32.
    """
    dtype = self.dtype
    emb_dim = 4 * self.nf
    # The embedding stays float32: c_noise reaches ~1100 (1000 ln(80) / 4), where bfloat16 spaces
    # representable values 8 apart.
    emb = timestep_embedding(noise_cond, self.nf)
    emb = _dense(emb, emb_dim, 'time_embed_in', jnp.float32)
    emb = _dense(nn.silu(emb), emb_dim, 'time_embed_out', jnp.float32)
    if self.num_classes > 0:
      if labels is None:
        raise ValueError(f'The network is class-conditional (num_classes={self.num_classes}); pass labels.')
      emb += nn.Embed(self.num_classes, emb_dim, embedding_init=nn.initializers.normal(1.0),
                      param_dtype=jnp.float32, name='label_embed')(labels)

    def res_block(name, out_ch, up=False, down=False):
      return ResBlock(out_ch=out_ch, dropout=self.dropout, use_scale_shift_norm=self.use_scale_shift_norm,
                      adaptive_double_norm=self.adaptive_double_norm, up=up, down=down,
                      edm_groups=self.edm_groups, dtype=dtype, name=name)

    def attention(name, channels, upsampling=False):
      return AttentionBlock(num_heads=self._heads(channels, upsampling),
                            use_new_attention_order=self.use_new_attention_order,
                            edm_groups=self.edm_groups, dtype=dtype, name=name)

    # ---- Downsampling path; `hs` keeps every block's output for the skip connections.
    h = _conv(x.astype(dtype), self.nf * self.ch_mult[0], 'in_conv', dtype)
    hs = [h]
    k = 1
    for level, mult in enumerate(self.ch_mult):
      for _ in range(self.num_res_blocks):
        h = res_block(f'enc_{k}_res', self.nf * mult)(h, emb, train)
        if h.shape[1] in self.attn_resolutions and self._heads(h.shape[-1], False):
          h = attention(f'enc_{k}_attn', h.shape[-1])(h)
        hs.append(h)
        k += 1
      if level != len(self.ch_mult) - 1:
        if self.resblock_updown:
          h = res_block(f'enc_{k}_down', h.shape[-1], down=True)(h, emb, train)
        else:
          h = _conv(h, h.shape[-1], f'enc_{k}_down', dtype, stride=2)
        hs.append(h)
        k += 1

    # ---- Middle.
    h = res_block('mid_res_0', h.shape[-1])(h, emb, train)
    if self._heads(h.shape[-1], False):
      h = attention('mid_attn', h.shape[-1])(h)
    h = res_block('mid_res_1', h.shape[-1])(h, emb, train)

    # ---- Upsampling path.
    k = 0
    for level in reversed(range(len(self.ch_mult))):
      for i in range(self.num_res_blocks + 1):
        h = jnp.concatenate([h, hs.pop()], axis=-1)
        h = res_block(f'dec_{k}_res', self.nf * self.ch_mult[level])(h, emb, train)
        if h.shape[1] in self.attn_resolutions and self._heads(h.shape[-1], True):
          h = attention(f'dec_{k}_attn', h.shape[-1], upsampling=True)(h)
        if level and i == self.num_res_blocks:
          if self.resblock_updown:
            h = res_block(f'dec_{k}_up', h.shape[-1], up=True)(h, emb, train)
          else:
            h = _conv(_upsample_nearest(h), h.shape[-1], f'dec_{k}_up', dtype)
        k += 1
    assert not hs

    # ---- Output head, in float32 as in the reference's fp16 mode.
    h = nn.silu(_group_norm(h.astype(jnp.float32), 'out_norm', self.edm_groups))
    return _conv(h, x.shape[-1], 'out_conv', jnp.float32, zero_init=True)

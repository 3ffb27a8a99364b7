"""The NCSN++ / DDPM++ U-Net (Song et al. 2021, arXiv 2011.13456, App. H).

One module covers the family: NCSN++ (BigGAN residual blocks with FIR resampling, Fourier noise
embedding, a residual input pyramid) and DDPM++ (DDPM blocks, plain resampling, sinusoidal embedding) are
configurations of it. The network maps (x, c_noise, labels) to an output of x's shape; it knows nothing of
noise schedules or preconditioning, which wrap it from outside.

Precision: parameters are float32; the body (convolutions, NIN layers, activations) computes in
`dtype`. The noise embedding (features, MLP, class embedding and its per-block projections), the
group-norm statistics, the attention softmax and the output head (last norm and conv) run in float32,
so the output is float32 whatever `dtype` is.
"""

import functools
import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from cm_jax.networks import layers

Dtype = Any


class NCSNpp(nn.Module):
  """The NCSN++ U-Net. Fields mirror `config.model` (see configs/default.py); `get_network` builds it."""

  nf: int = 128
  ch_mult: Sequence[int] = (2, 2, 2)
  num_res_blocks: int = 4
  attn_resolutions: Sequence[int] = (16,)
  dropout: float = 0.0
  resamp_with_conv: bool = True
  fir: bool = True
  fir_kernel: Sequence[float] = (1, 3, 3, 1)
  skip_rescale: bool = True
  resblock_type: str = 'biggan'  # 'biggan' | 'ddpm'
  progressive: str = 'none'  # 'none' | 'output_skip' | 'residual'
  progressive_input: str = 'residual'  # 'none' | 'input_skip' | 'residual'
  progressive_combine: str = 'sum'  # 'sum' | 'cat'
  init_scale: float = 0.0
  embedding_type: str = 'fourier'  # 'fourier' | 'positional'
  fourier_scale: float = 16.0
  conv_size: int = 3
  num_classes: int = 0
  # sCM's adaptive double normalisation of the noise embedding in every residual block.
  adaptive_double_norm: bool = False
  # False: the class embedding is added after the noise embedding's MLP (as ADM). True: before it, to
  # the Fourier/sinusoidal features (EDM's SongUNet, whose label map is folded into the table).
  labels_before_mlp: bool = False
  dtype: Dtype = jnp.float32  # Compute dtype; parameters are always float32.

  @nn.compact
  def __call__(self, x: jax.Array, noise_cond: jax.Array, labels: Optional[jax.Array] = None,
               train: bool = False) -> jax.Array:
    """Runs the U-Net.

    Args:
      x: [B, H, W, C] images (any float dtype; computed in `dtype`).
      noise_cond: [B] noise conditioning (c_noise), embedded as is.
      labels: [B] int class labels, or None; ignored unless num_classes > 0.
      train: enables dropout, which then needs the 'dropout' rng.

    Returns:
      [B, H, W, C] float32.
    """
    nf, dtype = self.nf, self.dtype
    num_resolutions = len(self.ch_mult)
    act = layers.act
    conv = functools.partial(layers.conv, kernel_size=self.conv_size, dtype=dtype)
    norm = functools.partial(layers.group_norm, dtype=dtype)

    # Noise-level embedding, then a 2-layer MLP to nf * 4 (the reference's `conditional=True`).
    if self.embedding_type == 'fourier':
      temb = layers.GaussianFourierProjection(embedding_size=nf, scale=self.fourier_scale)(noise_cond)
    elif self.embedding_type == 'positional':
      temb = layers.sinusoidal_embedding(noise_cond, nf)
    else:
      raise ValueError(f'Unknown embedding_type {self.embedding_type!r}.')
    if self.num_classes > 0 and labels is None:
      raise ValueError(f'The network is class-conditional (num_classes={self.num_classes}); pass labels.')
    if self.num_classes > 0 and self.labels_before_mlp:
      temb += nn.Embed(self.num_classes, temb.shape[-1], param_dtype=jnp.float32)(labels)
    # The embedding's MLP stays float32 whatever `dtype` is (as ADM's in its fp16 mode): it costs
    # [B, nf] x [nf, 4 nf], nothing beside the convolutions, and its rounding would reach every block.
    dense = functools.partial(nn.Dense, nf * 4, kernel_init=layers.default_init(), dtype=jnp.float32,
                              param_dtype=jnp.float32)
    temb = dense()(temb)
    temb = dense()(act(temb))
    if self.num_classes > 0 and not self.labels_before_mlp:
      # Class conditioning as in ADM: a learned embedding added to the noise embedding.
      temb += nn.Embed(self.num_classes, nf * 4, dtype=jnp.float32, param_dtype=jnp.float32)(labels)

    attn_block = functools.partial(
        layers.AttnBlockpp, init_scale=self.init_scale, skip_rescale=self.skip_rescale, dtype=dtype)
    resample_args = dict(fir=self.fir, fir_kernel=self.fir_kernel, conv_size=self.conv_size, dtype=dtype)
    if self.resblock_type == 'ddpm':
      resnet_block = functools.partial(
          layers.ResnetBlockDDPMpp, dropout=self.dropout, init_scale=self.init_scale,
          skip_rescale=self.skip_rescale, conv_size=self.conv_size,
          adaptive_double_norm=self.adaptive_double_norm, dtype=dtype)
    elif self.resblock_type == 'biggan':
      resnet_block = functools.partial(
          layers.ResnetBlockBigGANpp, dropout=self.dropout, fir=self.fir, fir_kernel=self.fir_kernel,
          init_scale=self.init_scale, skip_rescale=self.skip_rescale, conv_size=self.conv_size,
          adaptive_double_norm=self.adaptive_double_norm, dtype=dtype)
    else:
      raise ValueError(f'Unknown resblock_type {self.resblock_type!r}.')

    def merge(a, b):
      return (a + b) * (1 / math.sqrt(2.0)) if self.skip_rescale else a + b

    # ---- Downsampling path.
    x = x.astype(dtype)
    input_pyramid = x
    hs = [conv(x, nf)]
    for i_level in range(num_resolutions):
      for _ in range(self.num_res_blocks):
        h = resnet_block(out_ch=nf * self.ch_mult[i_level])(hs[-1], temb, train)
        if h.shape[1] in self.attn_resolutions:
          h = attn_block()(h)
        hs.append(h)

      if i_level != num_resolutions - 1:
        if self.resblock_type == 'ddpm':
          h = layers.Downsample(with_conv=self.resamp_with_conv, **resample_args)(hs[-1])
        else:
          h = resnet_block(down=True)(hs[-1], temb, train)

        # The input image, downsampled alongside, is fed in again at each level.
        if self.progressive_input == 'input_skip':
          input_pyramid = layers.Downsample(with_conv=False, **resample_args)(input_pyramid)
          h = layers.Combine(method=self.progressive_combine, dtype=dtype)(input_pyramid, h)
        elif self.progressive_input == 'residual':
          input_pyramid = layers.Downsample(
              out_ch=h.shape[-1], with_conv=True, **resample_args)(input_pyramid)
          input_pyramid = h = merge(input_pyramid, h)
        hs.append(h)

    # ---- Middle.
    h = hs[-1]
    h = resnet_block()(h, temb, train)
    h = attn_block()(h)
    h = resnet_block()(h, temb, train)

    # ---- Upsampling path.
    out_channels = x.shape[-1]
    pyramid = None
    for i_level in reversed(range(num_resolutions)):
      for _ in range(self.num_res_blocks + 1):
        h = resnet_block(out_ch=nf * self.ch_mult[i_level])(
            jnp.concatenate([h, hs.pop().astype(h.dtype)], axis=-1), temb, train)
      if h.shape[1] in self.attn_resolutions:
        h = attn_block()(h)

      # An output pyramid, upsampled alongside, collects a prediction from every level.
      if self.progressive == 'output_skip':
        skip = conv(act(norm(h)), out_channels, init_scale=self.init_scale)
        if pyramid is None:
          pyramid = skip
        else:
          pyramid = layers.Upsample(with_conv=False, **resample_args)(pyramid) + skip
      elif self.progressive == 'residual':
        if pyramid is None:
          pyramid = conv(act(norm(h)), h.shape[-1])
        else:
          pyramid = layers.Upsample(out_ch=h.shape[-1], with_conv=True, **resample_args)(pyramid)
          pyramid = h = merge(pyramid, h)

      if i_level != 0:
        if self.resblock_type == 'ddpm':
          h = layers.Upsample(with_conv=self.resamp_with_conv, **resample_args)(h)
        else:
          h = resnet_block(up=True)(h, temb, train)

    assert not hs

    if self.progressive == 'output_skip':
      return pyramid.astype(jnp.float32)
    # The output head in float32 (as ADM's): one conv to the image channels, whose rounding would
    # otherwise land on the denoiser's output unaveraged.
    h = act(layers.group_norm(h, jnp.float32))
    return layers.conv(h, out_channels, self.conv_size, jnp.float32, init_scale=self.init_scale)

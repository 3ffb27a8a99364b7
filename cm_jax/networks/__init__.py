"""Networks: `get_network(config.model, image_size, num_channels)` builds and checks one.

config.model.name picks the network: 'ncsnpp' (the NCSN++ / DDPM++ family, ncsnpp.py) or 'adm' (the
ADM U-Net of the ImageNet and LSUN runs, adm.py), or one of the two variants of them in NVlabs/edm,
which `cm_jax.convert` loads EDM's networks into: 'songunet' (NCSN++ / DDPM++ whose class labels enter
before the noise embedding's MLP, as EDM's SongUNet) and 'dhariwalunet' (ADM as EDM's DhariwalUNet: GroupNorm
with min(32, C // 4) groups, C // num_head_channels attention heads and no attention layer where that
is 0; the same as 'adm' where every attended layer has at least num_head_channels channels and 128).
'edm2' is EDM2's magnitude-preserving U-Net (edm2.py), for NVlabs/edm2 networks (nf, ch_mult,
num_res_blocks, attn_resolutions, num_head_channels, dropout, num_classes and dtype apply). Without labels
'songunet' is 'ncsnpp'.

Usage:
  net = get_network(config.model, image_size, num_channels)
  variables = net.init({'params': key, 'dropout': key2}, x, noise_cond, labels, train=False)
  out = net.apply({'params': params}, x, noise_cond, labels, train=True, rngs={'dropout': key})

x is [B, H, W, C], noise_cond the [B] noise conditioning (c_noise, already computed), labels [B] int32 or
None. The output has x's shape and is float32.
"""

import numbers
from typing import Any, NamedTuple, Sequence

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from cm_jax.errors import ConfigError, choose
from cm_jax.networks import adm, layers
from cm_jax.networks.adm import ADM
from cm_jax.networks.edm2 import EDM2UNet
from cm_jax.networks.ncsnpp import NCSNpp

__all__ = ['ADM', 'EDM2UNet', 'NCSNpp', 'RUNTIME_FIELDS', 'get_network']

# Fields of config.model that change how a network is trained or computed, not what trained weights
# compute: two runs whose config.model differs only in these hold interchangeable weights.
RUNTIME_FIELDS = ('dropout', 'init_scale', 'dtype')
_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
_CHOICES = {
    'resblock_type': ('biggan', 'ddpm'),
    'progressive': ('none', 'output_skip', 'residual'),
    'progressive_input': ('none', 'input_skip', 'residual'),
    'progressive_combine': ('sum', 'cat'),
    'embedding_type': ('fourier', 'positional'),
}


def _get(model_config: ml_collections.ConfigDict, key: str) -> Any:
  try:
    return model_config[key]
  except (KeyError, AttributeError):
    raise ConfigError(f'config.model.{key} is missing; see configs/default.py for its default.') from None


def _int_tuple(model_config: ml_collections.ConfigDict, key: str, allow_empty: bool) -> tuple[int, ...]:
  value = _get(model_config, key)
  if isinstance(value, numbers.Integral):
    value = (value,)
  if (not isinstance(value, Sequence) or isinstance(value, str)
      or not all(isinstance(v, numbers.Integral) and v > 0 for v in value)
      or (not value and not allow_empty)):
    raise ConfigError(f'config.model.{key} must be a tuple of positive integers, got {value!r}.')
  return tuple(int(v) for v in value)


def _positive_int(model_config: ml_collections.ConfigDict, key: str, minimum: int = 1) -> int:
  value = _get(model_config, key)
  if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < minimum:
    raise ConfigError(f'config.model.{key} must be an integer >= {minimum}, got {value!r}.')
  return int(value)


def _levels(image_size: int, ch_mult: tuple[int, ...], attn_resolutions: tuple[int, ...]) -> tuple[int, ...]:
  """The U-Net's resolutions, after checking that the levels fit the image and attention is reached."""
  # Each level but the last halves the resolution, which must stay an integer.
  downsamplings = len(ch_mult) - 1
  if image_size % 2**downsamplings:
    raise ConfigError(
        f'config.model.ch_mult={ch_mult} has {len(ch_mult)} levels, so the image size must be divisible '
        f'by 2**{downsamplings}={2**downsamplings}; got {image_size}. Use fewer levels.')
  resolutions = tuple(image_size // 2**i for i in range(len(ch_mult)))
  unreached = sorted(set(attn_resolutions) - set(resolutions))
  if unreached:
    raise ConfigError(
        f'config.model.attn_resolutions={attn_resolutions} includes {unreached}, which the U-Net never '
        f'reaches: with image size {image_size} and ch_mult={ch_mult} its resolutions are {resolutions}.')
  return resolutions


class _Shape(NamedTuple):
  """The fields every U-Net here reads, checked: widths nf * ch_mult, one resolution per level."""
  nf: int
  ch_mult: tuple[int, ...]
  attn_resolutions: tuple[int, ...]
  num_res_blocks: int
  num_classes: int
  resolutions: tuple[int, ...]


def _shape(model_config: ml_collections.ConfigDict, image_size: int) -> _Shape:
  ch_mult = _int_tuple(model_config, 'ch_mult', allow_empty=False)
  attn_resolutions = _int_tuple(model_config, 'attn_resolutions', allow_empty=True)
  return _Shape(nf=_positive_int(model_config, 'nf'), ch_mult=ch_mult,
                attn_resolutions=attn_resolutions,
                num_res_blocks=_positive_int(model_config, 'num_res_blocks'),
                num_classes=_positive_int(model_config, 'num_classes', minimum=0),
                resolutions=_levels(image_size, ch_mult, attn_resolutions))


def _dropout(model_config: ml_collections.ConfigDict) -> float:
  dropout = _get(model_config, 'dropout')
  if not isinstance(dropout, numbers.Real) or not 0 <= dropout < 1:
    raise ConfigError(f'config.model.dropout must be in [0, 1), got {dropout!r}.')
  return float(dropout)


def _dtype(model_config: ml_collections.ConfigDict) -> Any:
  return choose(_DTYPES, _get(model_config, 'dtype'), 'config.model.dtype')


def _flags(model_config: ml_collections.ConfigDict, keys: Sequence[str]) -> dict[str, bool]:
  flags = {}
  for key in keys:
    flags[key] = _get(model_config, key)
    if not isinstance(flags[key], bool):
      raise ConfigError(f'config.model.{key} must be True or False, got {flags[key]!r}.')
  return flags


def _adaptive_double_norm(model_config: ml_collections.ConfigDict) -> bool:
  # Added with sCM: model configs written before it (e.g. by hand) mean the networks as they were.
  value = model_config.get('adaptive_double_norm', False)
  if not isinstance(value, bool):
    raise ConfigError(f'config.model.adaptive_double_norm must be True or False, got {value!r}.')
  return value


def get_network(model_config: ml_collections.ConfigDict, image_size: int, num_channels: int) -> nn.Module:
  """Builds the network that `model_config.name` names, after checking the config against the data.

  Args:
    model_config: `config.model` (fields in configs/default.py).
    image_size: height and width of the (square) images.
    num_channels: image channels; the output has as many.

  Returns:
    An unbound Flax module with the interface in this package's docstring.

  Raises:
    ConfigError: an unknown network or value, or one that does not fit the image size.
  """
  build = choose(_NETWORKS, _get(model_config, 'name'), 'config.model.name')
  if not isinstance(image_size, numbers.Integral) or image_size < 1:
    raise ConfigError(f'The image size must be a positive integer, got {image_size!r}.')
  if not isinstance(num_channels, numbers.Integral) or num_channels < 1:
    raise ConfigError(f'The number of image channels must be a positive integer, got {num_channels!r}.')
  return build(model_config, image_size)


def _ncsnpp(model_config: ml_collections.ConfigDict, image_size: int,
            labels_before_mlp: bool = False) -> NCSNpp:
  choices = {}
  for key, allowed in _CHOICES.items():
    value = _get(model_config, key)
    value = value.lower() if isinstance(value, str) else value
    if value not in allowed:
      raise ConfigError(f'config.model.{key}={value!r} is unknown; use one of {allowed}.')
    choices[key] = value

  nf, ch_mult, attn_resolutions, num_res_blocks, num_classes, _ = _shape(model_config, image_size)
  conv_size = _positive_int(model_config, 'conv_size')
  if conv_size % 2 == 0:
    raise ConfigError(f'config.model.conv_size must be odd (for "same" padding), got {conv_size}.')

  # GroupNorm needs channels divisible by min(channels // 4, 32) groups, at least one group. The input
  # pyramid's concatenation ('input_skip' with 'cat') doubles a level's channels.
  widths = {nf} | {nf * m for m in ch_mult}
  if choices['progressive_input'] == 'input_skip' and choices['progressive_combine'] == 'cat':
    widths |= {2 * nf * m for m in ch_mult}
  for width in sorted(widths):
    groups = layers.num_groups(width)
    if groups < 1 or width % groups:
      raise ConfigError(
          f'A layer of {width} channels (from nf={nf}, ch_mult={ch_mult}) does not split into '
          f'min(C // 4, 32)={groups} GroupNorm groups; use nf and ch_mult giving multiples of 4 below 128 '
          'channels and of 32 above.')

  dropout = _dropout(model_config)
  fourier_scale = _get(model_config, 'fourier_scale')
  if choices['embedding_type'] == 'fourier' and (
      not isinstance(fourier_scale, numbers.Real) or fourier_scale <= 0):
    raise ConfigError(f'config.model.fourier_scale must be positive, got {fourier_scale!r}.')
  init_scale = _get(model_config, 'init_scale')
  if not isinstance(init_scale, numbers.Real) or init_scale < 0:
    raise ConfigError(f'config.model.init_scale must be >= 0 (0 means 1e-10), got {init_scale!r}.')
  fir_kernel = _get(model_config, 'fir_kernel')
  try:
    layers.fir_kernel_1d(fir_kernel)
  except (ValueError, TypeError):
    raise ConfigError(
        f'config.model.fir_kernel must be a 1-D sequence of numbers with a non-zero sum, e.g. (1, 3, 3, 1); '
        f'got {fir_kernel!r}.') from None
  dtype = _dtype(model_config)
  flags = _flags(model_config, ('resamp_with_conv', 'fir', 'skip_rescale'))
  flags['adaptive_double_norm'] = _adaptive_double_norm(model_config)

  return NCSNpp(
      nf=nf,
      ch_mult=ch_mult,
      num_res_blocks=num_res_blocks,
      attn_resolutions=attn_resolutions,
      dropout=dropout,
      fir_kernel=tuple(float(k) for k in fir_kernel),
      init_scale=float(init_scale),
      fourier_scale=float(fourier_scale),
      conv_size=conv_size,
      num_classes=num_classes,
      labels_before_mlp=labels_before_mlp,
      dtype=dtype,
      **flags,
      **choices,
  )


def _heads_setting(model_config: ml_collections.ConfigDict, key: str) -> int:
  """An ADM head setting: a positive integer, or -1 for 'not set'."""
  value = _get(model_config, key)
  if (not isinstance(value, numbers.Integral) or isinstance(value, bool)
      or not (value == -1 or value >= 1)):
    raise ConfigError(f'config.model.{key} must be a positive integer or -1 (unset), got {value!r}.')
  return int(value)


def _adm(model_config: ml_collections.ConfigDict, image_size: int, edm_groups: bool = False) -> ADM:
  nf, ch_mult, attn_resolutions, num_res_blocks, num_classes, resolutions = _shape(model_config,
                                                                                   image_size)

  # Every GroupNorm has 32 groups (the concatenations on the way up add multiples of the level widths),
  # or with EDM's rule min(32, C // 4).
  widths = {nf * m for m in ch_mult}
  widths |= {a + b for a in widths for b in widths}  # The up path's [h, skip] concatenations.
  for width in sorted(widths):
    groups = adm.num_groups(width, edm_groups)
    if groups < 1 or width % groups:
      raise ConfigError(
          f'config.model.nf={nf} with ch_mult={ch_mult} gives a layer of {width} channels, which the '
          f'GroupNorm of {model_config.name!r} cannot split into {groups} groups; use nf * ch_mult '
          f'multiples of {adm.NUM_GROUPS}' + (' (or of 4 below 128 channels).' if edm_groups else '.'))

  num_heads = _positive_int(model_config, 'num_heads')
  num_head_channels = _heads_setting(model_config, 'num_head_channels')
  num_heads_upsample = _heads_setting(model_config, 'num_heads_upsample')
  # Attention runs at the attention resolutions of both paths (num_heads down, num_heads_upsample up)
  # and in the middle, at the last level's width (num_heads).
  attended = {nf * m for m, res in zip(ch_mult, resolutions) if res in attn_resolutions}
  middle = nf * ch_mult[-1]
  if edm_groups:
    # EDM's DhariwalUNet: C // num_head_channels heads of C // heads channels, no attention with none.
    if num_head_channels < 1:
      raise ConfigError(f'config.model.name={model_config.name!r} sets its heads by '
                        f'num_head_channels (EDM\'s channels_per_head), got {num_head_channels}.')
    for width in sorted(attended | {middle}):
      heads = width // num_head_channels
      if heads and width % heads:
        raise ConfigError(
            f'config.model.num_head_channels={num_head_channels} gives {heads} heads to an attention '
            f'layer of {width} channels, which they do not divide (EDM\'s DhariwalUNet would fail '
            'too); use another num_head_channels.')
    checks = []
  elif num_head_channels > 0:
    checks = [('num_head_channels', num_head_channels, attended | {middle})]
  else:
    checks = [('num_heads', num_heads, attended | {middle})]
    if num_heads_upsample > 0:
      checks.append(('num_heads_upsample', num_heads_upsample, attended))
  for key, divisor, widths in checks:
    for width in sorted(widths):
      if width % divisor:
        raise ConfigError(
            f'config.model.{key}={divisor} does not divide the {width} channels of an attention layer '
            f'(nf={nf}, ch_mult={ch_mult}, attn_resolutions={attn_resolutions}); use a divisor of '
            f'{sorted(widths)}.')

  dropout = _dropout(model_config)
  dtype = _dtype(model_config)
  flags = _flags(model_config, ('use_scale_shift_norm', 'resblock_updown', 'use_new_attention_order'))
  flags['adaptive_double_norm'] = _adaptive_double_norm(model_config)
  if flags['adaptive_double_norm'] and not flags['use_scale_shift_norm']:
    raise ConfigError('config.model.adaptive_double_norm=True normalises the scale and shift of ADM\'s '
                      'scale-shift norm: set config.model.use_scale_shift_norm=True as well.')
  return ADM(
      nf=nf,
      ch_mult=ch_mult,
      num_res_blocks=num_res_blocks,
      attn_resolutions=attn_resolutions,
      dropout=dropout,
      num_heads=num_heads,
      num_head_channels=num_head_channels,
      num_heads_upsample=num_heads_upsample,
      num_classes=num_classes,
      edm_groups=edm_groups,
      dtype=dtype,
      **flags,
  )


def _edm2(model_config: ml_collections.ConfigDict, image_size: int) -> EDM2UNet:
  nf, ch_mult, attn_resolutions, num_res_blocks, num_classes, resolutions = _shape(model_config,
                                                                                   image_size)
  head_channels = _heads_setting(model_config, 'num_head_channels')
  if head_channels < 1:
    raise ConfigError("config.model.num_head_channels must be positive for 'edm2' (EDM2's "
                      f'channels_per_head, 64 in its released networks), got {head_channels}.')
  if _adaptive_double_norm(model_config):
    raise ConfigError("config.model.adaptive_double_norm=True is an option of 'ncsnpp' and 'adm'; "
                      "'edm2' has magnitude-preserving modulation of its own: set it to False.")
  # The lowest level always attends (its first decoder block), the others at attn_resolutions.
  attended = {nf * m for m, res in zip(ch_mult, resolutions) if res in attn_resolutions}
  for width in sorted(attended | {nf * ch_mult[-1]}):
    heads = width // head_channels
    if not heads or width % heads:
      raise ConfigError(f'config.model.num_head_channels={head_channels} gives {heads} heads to an '
                        f'attention layer of {width} channels; use a divisor of {width}.')
  return EDM2UNet(nf=nf, ch_mult=ch_mult, num_res_blocks=num_res_blocks,
                  attn_resolutions=attn_resolutions, num_head_channels=head_channels,
                  dropout=_dropout(model_config), num_classes=num_classes, dtype=_dtype(model_config))


_NETWORKS = {
    'ncsnpp': _ncsnpp,
    'adm': _adm,
    'songunet': lambda model_config, image_size: _ncsnpp(model_config, image_size, True),
    'dhariwalunet': lambda model_config, image_size: _adm(model_config, image_size, True),
    'edm2': _edm2,
}

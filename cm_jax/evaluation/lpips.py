"""LPIPS (Zhang et al. 2018), VGG16 variant v0.1, in Flax.

The distance the consistency-models paper uses as d(., .) for its LPIPS runs:

  1. Both images (NHWC in [-1, 1]) are upsampled to 224x224 with bilinear
     interpolation when they are smaller (the paper's trick for 32x32 and 64x64
     data; OpenAI's code resizes below 256, the CIFAR-10 JAX code always).
  2. The LPIPS scaling layer: (x - shift) / scale with shift [-.030, -.088,
     -.188] and scale [.458, .448, .450], i.e. ImageNet mean/std normalisation
     of (x + 1) / 2 written for inputs in [-1, 1].
  3. torchvision's VGG16 `features` conv stack, tapped after relu1_2, relu2_2,
     relu3_3, relu4_3 and relu5_3 (3x3 convs with bias, 2x2 max pools).
  4. Each tap is unit-normalised over channels, the squared difference goes
     through a learned 1x1 linear head without bias (lin0..lin4), is averaged
     over space and the five layers are summed.

Weights: the VGG16 trunk is torchvision's ImageNet `vgg16-397923af.pth`
(SHA-256 VGG16_SHA256) and the linear heads ship inside the `lpips` pip package
as `lpips/weights/v0.1/vgg.pth` (SHA-256 LPIPS_LIN_SHA256). Convert once, with
torch installed:

  python -m cm_jax.evaluation.lpips convert --vgg vgg16-397923af.pth \
      [--lin /path/to/lpips/weights/v0.1/vgg.pth]

(--lin defaults to the installed lpips package's file; `pip install --no-deps
lpips` is enough). This writes `$CM_JAX_CACHE/lpips_vgg16_v0.1.npz` (default
cache: ~/.cache/cm_jax/). A full `lpips.LPIPS(net='vgg').state_dict()` saved
with torch.save also works as --vgg, without --lin.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import os
import pathlib
import re
import sys
from typing import Any, Mapping, Sequence

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from cm_jax.evaluation import inception

VGG16_WEIGHTS_NAME = 'vgg16-397923af.pth'
VGG16_WEIGHTS_URL = 'https://download.pytorch.org/models/vgg16-397923af.pth'
VGG16_SHA256 = '397923af8e79cdbb6a7127f12361acd7a2f83e06b05044ddf496e83de57a5bf0'
LPIPS_LIN_SHA256 = 'a78928a0af1e5f0fcb1f3b9e8f8c3a2a5a3de244d830ad5c1feddc79b8432868'
LPIPS_FILENAME = 'lpips_vgg16_v0.1.npz'

# (index in torchvision's vgg16().features, output channels) of each conv.
VGG16_CONVS = ((0, 64), (2, 64), (5, 128), (7, 128), (10, 256), (12, 256), (14, 256),
               (17, 512), (19, 512), (21, 512), (24, 512), (26, 512), (28, 512))
# Convs whose ReLU output is an LPIPS tap (relu1_2 ... relu5_3); a 2x2 max pool
# follows every tap but the last.
_TAP_CONVS = (2, 7, 14, 21, 28)
LPIPS_CHANNELS = (64, 128, 256, 512, 512)
_SHIFT = (-.030, -.088, -.188)
_SCALE = (.458, .448, .450)

PretrainedWeightsNotFoundError = inception.PretrainedWeightsNotFoundError
Params = Mapping[str, Any]


def _normalize_channels(features: jax.Array, eps: float = 1e-10) -> jax.Array:
  """x / (||x||_channels + eps), as lpips.normalize_tensor."""
  # The max() keeps the gradient finite where a whole feature vector is zero
  # (sqrt'(0) is inf); the value there is 0 either way.
  norm = jnp.sqrt(jnp.maximum(jnp.sum(jnp.square(features), axis=-1, keepdims=True), 1e-30))
  return features / (norm + eps)


# Pooling between the VGG stages: torchvision's max pooling (the lpips package; the CIFAR-10
# reference), or average pooling (piq.LPIPS(replace_pooling=True), the ImageNet-64/LSUN reference).
POOLINGS = {'max': nn.max_pool, 'avg': nn.avg_pool}


class LPIPS(nn.Module):
  """LPIPS-VGG16 distance of two NHWC batches in [-1, 1] (no resizing): [B].

  `dtype` is the trunk's compute dtype (its convolutions, ReLUs and pools; parameters stay float32).
  The scaling layer, the taps' channel normalisation, their difference, the linear heads and the
  means run in float32 whatever it is: the distance of two close images is a difference of nearly
  equal features, which bfloat16 would round before subtracting.
  """
  precision: Any = None
  pooling: str = 'max'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
    batch = x.shape[0]
    shift = jnp.asarray(_SHIFT, jnp.float32)
    scale = jnp.asarray(_SCALE, jnp.float32)
    # One trunk pass over both batches: the convs treat examples independently.
    h = (jnp.concatenate([x, y], axis=0).astype(jnp.float32) - shift) / scale
    taps = []
    for index, channels in VGG16_CONVS:
      h = nn.relu(nn.Conv(channels, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype,
                          param_dtype=jnp.float32, precision=self.precision,
                          name=f'features_{index}')(h))
      if index in _TAP_CONVS:
        taps.append(h.astype(jnp.float32))
        if index != _TAP_CONVS[-1]:
          h = POOLINGS[self.pooling](h, (2, 2), (2, 2))
    distance = jnp.zeros((batch,), jnp.float32)
    for layer, tap in enumerate(taps):
      diff = jnp.square(_normalize_channels(tap[:batch]) - _normalize_channels(tap[batch:]))
      # lin{k}: 1x1 conv to one channel without bias (dropout is train-only).
      weighted = nn.Dense(1, use_bias=False, precision=self.precision, name=f'lin{layer}')(diff)
      distance = distance + jnp.mean(weighted, axis=(1, 2, 3))
    return distance


# The trunk's compute dtypes by name (consistency.lpips_dtype).
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


# jit so eager callers get one compiled call; inside a jitted loss it inlines.
@functools.partial(jax.jit, static_argnames=('resize_to', 'precision', 'pooling', 'dtype'))
def lpips_distance(params: Params, x: jax.Array, y: jax.Array, resize_to: int | None = 224,
                   precision: Any = None, pooling: str = 'max', dtype: Any = jnp.float32
                   ) -> jax.Array:
  """LPIPS(x, y) per example, as the consistency-models loss uses it.

  Args:
    params: from `load_lpips` or `random_lpips_params`.
    x, y: [B, H, W, C] in [-1, 1], C in {1, 3}; grey images are repeated to RGB.
    resize_to: images smaller than this (in H or W) are bilinearly upsampled to
      resize_to x resize_to first (torch F.interpolate(align_corners=False)
      semantics, equal to jax.image.resize when upsampling); None disables it.
    precision: matmul/conv precision (None: the backend default, fast on
      accelerators; jax.lax.Precision.HIGHEST for float32 everywhere).
    pooling: 'max' or 'avg' (see POOLINGS).
    dtype: the VGG trunk's compute dtype (see LPIPS); the resize and the distance stay float32.

  Returns:
    [B] float32 distances; differentiable in x and y.
  """
  if x.shape != y.shape:
    raise ValueError(f'x and y must have the same shape, got {x.shape} and {y.shape}.')
  if x.ndim != 4 or x.shape[-1] not in (1, 3):
    raise ValueError(f'Expected [B, H, W, 1 or 3] images, got shape {x.shape}.')
  if x.shape[-1] == 1:
    x, y = jnp.repeat(x, 3, axis=-1), jnp.repeat(y, 3, axis=-1)
  height, width = x.shape[1:3]
  if resize_to is not None and (height < resize_to or width < resize_to):
    size = (resize_to, resize_to)
    x = inception.resize_bilinear(x.astype(jnp.float32), size, half_pixel=True,
                                  precision=precision)
    y = inception.resize_bilinear(y.astype(jnp.float32), size, half_pixel=True,
                                  precision=precision)
  return LPIPS(precision=precision, pooling=pooling, dtype=dtype).apply({'params': params}, x, y)


# ----------------------------------------------------------------------------
# Parameters: shapes, random fill, conversion, loading.
# ----------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _param_shapes() -> dict[str, tuple[int, ...]]:
  """Flat {'params/features_0/kernel': shape, ...}."""
  dummy = jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32)
  shapes = jax.eval_shape(LPIPS().init, jax.random.key(0), dummy, dummy)
  return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(shapes, sep='/').items()}


def random_lpips_params(seed: int = 0) -> dict[str, Any]:
  """Random params with the real tree (He-scaled trunk, non-negative heads)."""
  rng = np.random.default_rng(seed)
  flat = {}
  for key, shape in _param_shapes().items():
    name = key.split('/')
    if name[1].startswith('lin'):
      # Trained LPIPS heads are non-negative, which makes d >= 0.
      value = rng.uniform(0.0, 1.0, size=shape) / shape[0]
    elif name[-1] == 'kernel':
      value = rng.normal(size=shape) * np.sqrt(2.0 / np.prod(shape[:-1]))
    else:
      value = rng.normal(size=shape) * 0.05
    flat['/'.join(name[1:])] = jnp.asarray(value, jnp.float32)
  return traverse_util.unflatten_dict(flat, sep='/')


def installed_lpips_lin_path() -> pathlib.Path | None:
  """lpips/weights/v0.1/vgg.pth of an installed `lpips` package, if any."""
  # find_spec does not execute the package (whose import needs torchvision).
  spec = importlib.util.find_spec('lpips')
  if spec is None or not spec.submodule_search_locations:
    return None
  for location in spec.submodule_search_locations:
    path = pathlib.Path(location) / 'weights' / 'v0.1' / 'vgg.pth'
    if path.is_file():
      return path
  return None


def lpips_params_from_state_dicts(
    vgg_state: Mapping[str, np.ndarray],
    lin_state: Mapping[str, np.ndarray] | None = None) -> dict[str, Any]:
  """Maps torch arrays onto the Flax params (strict).

  Args:
    vgg_state: torchvision vgg16 state_dict ('features.{i}.weight', classifier
      entries are ignored) or a full lpips.LPIPS(net='vgg') state_dict
      ('net.slice{k}.{i}.weight', 'lin{k}.model.1.weight').
    lin_state: the lpips heads ('lin{k}.model.1.weight', [1, C, 1, 1]) when
      vgg_state does not hold them.
  """
  flat = {}
  for name, value in list(vgg_state.items()) + list((lin_state or {}).items()):
    value = np.asarray(value)
    parts = name.split('.')
    if parts[0] == 'features' or (parts[0] == 'net' and parts[1].startswith('slice')):
      index, leaf = parts[-2], parts[-1]
      if leaf == 'weight':
        flat[f'features_{index}/kernel'] = value.transpose(2, 3, 1, 0)  # OIHW -> HWIO.
      else:
        flat[f'features_{index}/bias'] = value
    elif re.fullmatch(r'lin\d+', parts[0]) and parts[-1] == 'weight':
      flat[f'{parts[0]}/kernel'] = value.reshape(value.shape[1], 1)  # [1,C,1,1] -> [C,1].
    # Otherwise: torchvision's classifier, lpips' scaling_layer buffers (fixed
    # constants here) and its `lins.{k}` aliases of lin{k}.
  expected = {k.split('/', 1)[1]: v for k, v in _param_shapes().items()}
  missing = sorted(set(expected) - set(flat))
  unexpected = sorted(set(flat) - set(expected))
  wrong = sorted(k for k in set(flat) & set(expected) if flat[k].shape != expected[k])
  if missing or unexpected or wrong:
    raise ValueError(
        f'Not an LPIPS-VGG16 checkpoint: missing {missing[:5]}, unexpected '
        f'{unexpected[:5]}, wrong shapes {wrong[:5]}. Pass torchvision\'s '
        f'{VGG16_WEIGHTS_NAME} as --vgg and lpips/weights/v0.1/vgg.pth as --lin.')
  return traverse_util.unflatten_dict(
      {k: v.astype(np.float32) for k, v in flat.items()}, sep='/')


def convert_lpips_weights(vgg_path: str | os.PathLike[str],
                          lin_path: str | os.PathLike[str] | None = None,
                          out_path: str | os.PathLike[str] | None = None) -> str:
  """Converts torchvision VGG16 + lpips v0.1 heads into one .npz; returns its SHA-256.

  Args:
    vgg_path: torchvision's vgg16-397923af.pth (or a full LPIPS state_dict).
    lin_path: lpips/weights/v0.1/vgg.pth; default: the installed lpips
      package's copy (when vgg_path lacks the heads).
    out_path: default `cache_dir() / LPIPS_FILENAME`.
  """
  out_path = pathlib.Path(out_path) if out_path else inception.cache_dir() / LPIPS_FILENAME
  vgg_state = inception._load_torch_state_dict(vgg_path)  # pylint: disable=protected-access
  metadata = {'vgg_sha256': inception.sha256_of_file(vgg_path)}
  lin_state = None
  if not any(re.match(r'lin\d+\.', k) for k in vgg_state):
    lin_path = lin_path or installed_lpips_lin_path()
    if lin_path is None:
      raise PretrainedWeightsNotFoundError(
          'LPIPS linear heads not found: pass --lin lpips/weights/v0.1/vgg.pth '
          '(it ships inside the `lpips` pip package: pip install --no-deps lpips).')
    lin_state = inception._load_torch_state_dict(lin_path)  # pylint: disable=protected-access
    metadata['lin_sha256'] = inception.sha256_of_file(lin_path)
  for key, want, name in (('vgg_sha256', VGG16_SHA256, VGG16_WEIGHTS_NAME),
                          ('lin_sha256', LPIPS_LIN_SHA256, 'lpips v0.1 vgg.pth')):
    if key in metadata and metadata[key] != want:
      print(f'warning: the {name} given has SHA-256 {metadata[key]}, not the '
            f'published {want}.', file=sys.stderr)
  params = lpips_params_from_state_dicts(vgg_state, lin_state)
  return inception.save_variables({'params': params}, out_path, metadata)


def load_lpips(path: str | os.PathLike[str] | None = None) -> dict[str, Any]:
  """Params of the converted LPIPS-VGG16 for `lpips_distance`.

  Raises:
    PretrainedWeightsNotFoundError: the converted file is missing; the message
      says which files to fetch and the conversion command.
  """
  path = pathlib.Path(path) if path else inception.cache_dir() / LPIPS_FILENAME
  if not path.is_file():
    raise PretrainedWeightsNotFoundError(
        f'LPIPS weights not found at {path}. Download {VGG16_WEIGHTS_NAME} '
        f'(SHA-256 {VGG16_SHA256}) from {VGG16_WEIGHTS_URL} on a machine with '
        'network access, `pip install --no-deps lpips` (for '
        'lpips/weights/v0.1/vgg.pth), then run `python -m cm_jax.evaluation.lpips '
        f'convert --vgg {VGG16_WEIGHTS_NAME} --dst {path}` (needs torch). The '
        'cache directory is $CM_JAX_CACHE, default ~/.cache/cm_jax.')
  return inception.load_variables(path, _param_shapes())['params']


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog='python -m cm_jax.evaluation.lpips',
                                   description=__doc__.split('\n', 1)[0])
  commands = parser.add_subparsers(dest='command', required=True)
  convert = commands.add_parser('convert', help='convert VGG16 + LPIPS heads')
  convert.add_argument('--vgg', required=True, help=f'torchvision {VGG16_WEIGHTS_NAME}')
  convert.add_argument('--lin', default=None,
                       help='lpips/weights/v0.1/vgg.pth (default: from the installed lpips package)')
  convert.add_argument('--dst', default=None,
                       help=f'output .npz (default: {inception.cache_dir() / LPIPS_FILENAME})')
  args = parser.parse_args(argv)
  dst = args.dst or str(inception.cache_dir() / LPIPS_FILENAME)
  digest = convert_lpips_weights(args.vgg, args.lin, dst)
  print(f'wrote {dst}\nsha256 {digest}')


if __name__ == '__main__':
  main()

"""The FID Inception-v3 network (TF graph `inception-2015-12-05`) in Flax.

FID and Inception Score are defined by one specific network: the TensorFlow
graph `classify_image_graph_def.pb` from `inception-2015-12-05.tgz`, which the
original FID code (TTUR), OpenAI's evaluator and torch-fidelity run. pytorch-fid
ported its weights to a PyTorch state_dict; this module re-implements that port
(`fid_inception_v3` with the `FIDInceptionA/C/E_1/E_2` blocks) in Flax Linen,
NHWC, inference only:

  * BasicConv2d = conv (no bias) -> BatchNorm(eps=1e-3, running stats) -> ReLU.
  * The 3x3 average pools in Mixed_5b..5d (A), 6b..6e (C) and 7b (E_1) do not
    count the zero padding (TF semantics); Mixed_7c (E_2) max-pools instead.
  * The classifier is the graph's 1008-way `softmax/logits` layer.

Input preprocessing (`InceptionV3.preprocessing`):
  * 'tf' (default): the graph's own ResizeBilinear to 299x299 (TF1 semantics:
    align_corners=False, half_pixel_centers=False) on pixels in [0, 255], then
    (x - 128) / 128. This is what OpenAI's evaluator (the paper's ImageNet and
    LSUN numbers, fed uint8 pixels) and torch-fidelity compute; clean-fid's
    `legacy_tensorflow` mode (the CIFAR-10 numbers) runs StyleGAN2-ADA's
    TorchScript port of the same graph, built to reproduce it.
  * 'pytorch_fid': pytorch-fid's F.interpolate(bilinear, align_corners=False)
    (half-pixel centres) on x / 255, then 2x - 1. Slightly different FIDs.

Outputs: 'pool' [N, 2048] (pool_3, the FID features), 'logits' [N, 1008]
(fc with bias) and 'logits_unbiased' [N, 1008] (pool @ W, no bias).
Inception Score: both reference implementations take the softmax over all 1008
classes of the *unbiased* logits (OpenAI's evaluator multiplies pool_3 by the
weight of `softmax/logits/MatMul`; torch-fidelity's default IS feature is
'logits_unbiased'). Use 'logits_unbiased' for IS, not the first 1000 classes.

Weights: pytorch-fid's release file `pt_inception-2015-12-05-6726825d.pth`
(PYTORCH_FID_WEIGHTS_URL below; 95,628,359 bytes, SHA-256
PYTORCH_FID_WEIGHTS_SHA256 as published in public code; the name carries its
first 8 hex digits, torch.hub's convention. torch-fidelity's
`weights-inception-2015-12-05-6726825d.pth` has the same hash and loads too).
Convert it once, with torch installed, into the cache:

  python -m cm_jax.evaluation.inception convert \
      --src pt_inception-2015-12-05-6726825d.pth

which writes `$CM_JAX_CACHE/inception_v3_fid_2015-12-05.npz` (default cache:
~/.cache/cm_jax/). Nothing is downloaded: this module never touches the network.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import os
import pathlib
import sys
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from cm_jax import errors, files

PYTORCH_FID_WEIGHTS_NAME = 'pt_inception-2015-12-05-6726825d.pth'
PYTORCH_FID_WEIGHTS_URL = (
    'https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/'
    'pt_inception-2015-12-05-6726825d.pth')
PYTORCH_FID_WEIGHTS_SHA256 = (
    '6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2')
INCEPTION_FILENAME = 'inception_v3_fid_2015-12-05.npz'
INCEPTION_SIZE = 299
NUM_CLASSES = 1008
PREPROCESSING_MODES = ('tf', 'pytorch_fid')

Variables = Mapping[str, Any]
ApplyFn = Callable[[Variables, jax.Array], dict[str, jax.Array]]


# Defined with the other user errors; re-exported here where the weights are loaded.
PretrainedWeightsNotFoundError = errors.PretrainedWeightsNotFoundError


def cache_dir() -> pathlib.Path:
  """Where converted pretrained weights live: $CM_JAX_CACHE or ~/.cache/cm_jax."""
  env = os.environ.get('CM_JAX_CACHE')
  return pathlib.Path(env) if env else pathlib.Path.home() / '.cache' / 'cm_jax'


def sha256_of_file(path: str | os.PathLike[str]) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      digest.update(block)
  return digest.hexdigest()


# ----------------------------------------------------------------------------
# Resizing.
# ----------------------------------------------------------------------------


@functools.lru_cache(maxsize=32)
def bilinear_matrix(in_size: int, out_size: int, half_pixel: bool) -> np.ndarray:
  """[out_size, in_size] matrix of a 1-D bilinear resize (no antialiasing).

  half_pixel=False is TF1's ResizeBilinear(align_corners=False): source
  coordinate dst * in/out. half_pixel=True is torch's F.interpolate(bilinear,
  align_corners=False): (dst + 0.5) * in/out - 0.5, clamped at 0. Both clamp
  the upper neighbour at the last pixel. Coordinates are computed in float32 as
  both kernels do, so the sampling positions agree bit for bit.
  """
  scale = np.float32(in_size) / np.float32(out_size)
  dst = np.arange(out_size, dtype=np.float32)
  if half_pixel:
    src = np.maximum((dst + np.float32(0.5)) * scale - np.float32(0.5), 0)
  else:
    src = dst * scale
  lower = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  upper = np.minimum(lower + 1, in_size - 1)
  frac = (src - lower).astype(np.float32)
  matrix = np.zeros((out_size, in_size), np.float32)
  rows = np.arange(out_size)
  np.add.at(matrix, (rows, lower), 1 - frac)
  np.add.at(matrix, (rows, upper), frac)
  return matrix


def resize_bilinear(images: jax.Array, size: tuple[int, int], half_pixel: bool,
                    precision: Any = jax.lax.Precision.HIGHEST) -> jax.Array:
  """Bilinear resize of NHWC images as two small matmuls (differentiable)."""
  height, width = images.shape[1:3]
  if (height, width) != tuple(size):
    rows = jnp.asarray(bilinear_matrix(height, size[0], half_pixel))
    cols = jnp.asarray(bilinear_matrix(width, size[1], half_pixel))
    images = jnp.einsum('oh,nhwc->nowc', rows, images, precision=precision)
    images = jnp.einsum('pw,nowc->nopc', cols, images, precision=precision)
  return images


# ----------------------------------------------------------------------------
# The network. Submodule names equal pytorch-fid's state_dict names, so the
# converter is a rename of leaves.
# ----------------------------------------------------------------------------


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
  return (v, v) if isinstance(v, int) else tuple(v)


class BasicConv2d(nn.Module):
  """Conv (no bias) -> BatchNorm(eps=1e-3) -> ReLU, torch padding semantics."""
  features: int
  kernel_size: int | tuple[int, int]
  strides: int | tuple[int, int] = 1
  padding: int | tuple[int, int] = 0
  precision: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    pad_h, pad_w = _pair(self.padding)
    x = nn.Conv(self.features, _pair(self.kernel_size), _pair(self.strides),
                padding=((pad_h, pad_h), (pad_w, pad_w)), use_bias=False,
                precision=self.precision, name='conv')(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name='bn')(x)
    return nn.relu(x)


def _avg_pool_3x3_same(x: jax.Array) -> jax.Array:
  # TF's average pool divides by the number of real (unpadded) inputs.
  return nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_valid_s2(x: jax.Array) -> jax.Array:
  return nn.max_pool(x, (3, 3), (2, 2), 'VALID')


class InceptionA(nn.Module):
  """Mixed_5b..5d (pytorch-fid FIDInceptionA)."""
  pool_features: int
  precision: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = functools.partial(BasicConv2d, precision=self.precision)
    branch1x1 = conv(64, 1, name='branch1x1')(x)
    branch5x5 = conv(48, 1, name='branch5x5_1')(x)
    branch5x5 = conv(64, 5, padding=2, name='branch5x5_2')(branch5x5)
    branch3x3dbl = conv(64, 1, name='branch3x3dbl_1')(x)
    branch3x3dbl = conv(96, 3, padding=1, name='branch3x3dbl_2')(branch3x3dbl)
    branch3x3dbl = conv(96, 3, padding=1, name='branch3x3dbl_3')(branch3x3dbl)
    branch_pool = conv(self.pool_features, 1, name='branch_pool')(_avg_pool_3x3_same(x))
    return jnp.concatenate([branch1x1, branch5x5, branch3x3dbl, branch_pool], axis=-1)


class InceptionB(nn.Module):
  """Mixed_6a (torchvision InceptionB, unchanged by pytorch-fid)."""
  precision: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = functools.partial(BasicConv2d, precision=self.precision)
    branch3x3 = conv(384, 3, strides=2, name='branch3x3')(x)
    branch3x3dbl = conv(64, 1, name='branch3x3dbl_1')(x)
    branch3x3dbl = conv(96, 3, padding=1, name='branch3x3dbl_2')(branch3x3dbl)
    branch3x3dbl = conv(96, 3, strides=2, name='branch3x3dbl_3')(branch3x3dbl)
    return jnp.concatenate([branch3x3, branch3x3dbl, _max_pool_3x3_valid_s2(x)], axis=-1)


class InceptionC(nn.Module):
  """Mixed_6b..6e (pytorch-fid FIDInceptionC)."""
  channels_7x7: int
  precision: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = functools.partial(BasicConv2d, precision=self.precision)
    c7 = self.channels_7x7
    branch1x1 = conv(192, 1, name='branch1x1')(x)
    branch7x7 = conv(c7, 1, name='branch7x7_1')(x)
    branch7x7 = conv(c7, (1, 7), padding=(0, 3), name='branch7x7_2')(branch7x7)
    branch7x7 = conv(192, (7, 1), padding=(3, 0), name='branch7x7_3')(branch7x7)
    dbl = conv(c7, 1, name='branch7x7dbl_1')(x)
    dbl = conv(c7, (7, 1), padding=(3, 0), name='branch7x7dbl_2')(dbl)
    dbl = conv(c7, (1, 7), padding=(0, 3), name='branch7x7dbl_3')(dbl)
    dbl = conv(c7, (7, 1), padding=(3, 0), name='branch7x7dbl_4')(dbl)
    dbl = conv(192, (1, 7), padding=(0, 3), name='branch7x7dbl_5')(dbl)
    branch_pool = conv(192, 1, name='branch_pool')(_avg_pool_3x3_same(x))
    return jnp.concatenate([branch1x1, branch7x7, dbl, branch_pool], axis=-1)


class InceptionD(nn.Module):
  """Mixed_7a (torchvision InceptionD, unchanged by pytorch-fid)."""
  precision: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = functools.partial(BasicConv2d, precision=self.precision)
    branch3x3 = conv(192, 1, name='branch3x3_1')(x)
    branch3x3 = conv(320, 3, strides=2, name='branch3x3_2')(branch3x3)
    branch7x7x3 = conv(192, 1, name='branch7x7x3_1')(x)
    branch7x7x3 = conv(192, (1, 7), padding=(0, 3), name='branch7x7x3_2')(branch7x7x3)
    branch7x7x3 = conv(192, (7, 1), padding=(3, 0), name='branch7x7x3_3')(branch7x7x3)
    branch7x7x3 = conv(192, 3, strides=2, name='branch7x7x3_4')(branch7x7x3)
    return jnp.concatenate([branch3x3, branch7x7x3, _max_pool_3x3_valid_s2(x)], axis=-1)


class InceptionE(nn.Module):
  """Mixed_7b (FIDInceptionE_1, avg pool) and Mixed_7c (FIDInceptionE_2, max pool)."""
  pool: str
  precision: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = functools.partial(BasicConv2d, precision=self.precision)
    branch1x1 = conv(320, 1, name='branch1x1')(x)
    branch3x3 = conv(384, 1, name='branch3x3_1')(x)
    branch3x3 = jnp.concatenate([
        conv(384, (1, 3), padding=(0, 1), name='branch3x3_2a')(branch3x3),
        conv(384, (3, 1), padding=(1, 0), name='branch3x3_2b')(branch3x3),
    ], axis=-1)
    dbl = conv(448, 1, name='branch3x3dbl_1')(x)
    dbl = conv(384, 3, padding=1, name='branch3x3dbl_2')(dbl)
    dbl = jnp.concatenate([
        conv(384, (1, 3), padding=(0, 1), name='branch3x3dbl_3a')(dbl),
        conv(384, (3, 1), padding=(1, 0), name='branch3x3dbl_3b')(dbl),
    ], axis=-1)
    if self.pool == 'avg':
      pooled = _avg_pool_3x3_same(x)
    else:
      # The TF graph max-pools in its last block (pytorch-fid FIDInceptionE_2);
      # padding with -inf as torch's max_pool2d(padding=1) does.
      pooled = nn.max_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)))
    branch_pool = conv(192, 1, name='branch_pool')(pooled)
    return jnp.concatenate([branch1x1, branch3x3, dbl, branch_pool], axis=-1)


class _Classifier(nn.Module):
  """The graph's 1008-way fc; returns (pool @ W, pool @ W + b)."""
  precision: Any = None

  @nn.compact
  def __call__(self, pool: jax.Array) -> tuple[jax.Array, jax.Array]:
    kernel = self.param('kernel', nn.initializers.lecun_normal(),
                        (pool.shape[-1], NUM_CLASSES))
    bias = self.param('bias', nn.initializers.zeros, (NUM_CLASSES,))
    unbiased = jnp.dot(pool, kernel, precision=self.precision)
    return unbiased, unbiased + bias


class InceptionV3(nn.Module):
  """FID Inception-v3. Input: float NHWC pixels in [0, 255], any size, 3 channels.

  Returns a dict with 'pool' [N, 2048], 'logits' [N, 1008] and
  'logits_unbiased' [N, 1008]. Call with `use_running_average` BatchNorm only:
  the variables are {'params', 'batch_stats'}.
  """
  preprocessing: str = 'tf'
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
    if self.preprocessing not in PREPROCESSING_MODES:
      raise ValueError(f'preprocessing must be one of {PREPROCESSING_MODES}, '
                       f'got {self.preprocessing!r}.')
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f'Expected NHWC RGB images, got shape {images.shape}.')
    x = images.astype(jnp.float32)
    size = (INCEPTION_SIZE, INCEPTION_SIZE)
    if self.preprocessing == 'tf':
      x = resize_bilinear(x, size, half_pixel=False, precision=self.precision)
      x = (x - 128.0) / 128.0  # The graph's Sub/Mul: 255 maps to 127/128.
    else:
      x = resize_bilinear(x / 255.0, size, half_pixel=True, precision=self.precision)
      x = 2.0 * x - 1.0

    p = self.precision
    conv = functools.partial(BasicConv2d, precision=p)
    x = conv(32, 3, strides=2, name='Conv2d_1a_3x3')(x)
    x = conv(32, 3, name='Conv2d_2a_3x3')(x)
    x = conv(64, 3, padding=1, name='Conv2d_2b_3x3')(x)
    x = _max_pool_3x3_valid_s2(x)
    x = conv(80, 1, name='Conv2d_3b_1x1')(x)
    x = conv(192, 3, name='Conv2d_4a_3x3')(x)
    x = _max_pool_3x3_valid_s2(x)
    x = InceptionA(32, precision=p, name='Mixed_5b')(x)
    x = InceptionA(64, precision=p, name='Mixed_5c')(x)
    x = InceptionA(64, precision=p, name='Mixed_5d')(x)
    x = InceptionB(precision=p, name='Mixed_6a')(x)
    x = InceptionC(128, precision=p, name='Mixed_6b')(x)
    x = InceptionC(160, precision=p, name='Mixed_6c')(x)
    x = InceptionC(160, precision=p, name='Mixed_6d')(x)
    x = InceptionC(192, precision=p, name='Mixed_6e')(x)
    x = InceptionD(precision=p, name='Mixed_7a')(x)
    x = InceptionE('avg', precision=p, name='Mixed_7b')(x)
    x = InceptionE('max', precision=p, name='Mixed_7c')(x)
    pool = jnp.mean(x, axis=(1, 2))
    logits_unbiased, logits = _Classifier(precision=p, name='fc')(pool)
    return {'pool': pool, 'logits': logits, 'logits_unbiased': logits_unbiased}


# ----------------------------------------------------------------------------
# Variables: templates, random fill, .npz storage.
# ----------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _variable_shapes() -> dict[str, tuple[int, ...]]:
  """Flat {'params/Mixed_5b/branch1x1/conv/kernel': shape, ...} of the network."""
  # Shapes do not depend on the input size (the fc sees pooled features), so a
  # 299x299 abstract trace is enough; nothing is compiled or allocated.
  shapes = jax.eval_shape(InceptionV3().init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, INCEPTION_SIZE, INCEPTION_SIZE, 3), jnp.float32))
  flat = traverse_util.flatten_dict(shapes, sep='/')
  return {k: tuple(v.shape) for k, v in flat.items()}


def save_variables(variables: Variables, path: str | os.PathLike[str],
                   metadata: Mapping[str, str] | None = None) -> str:
  """Writes a flat .npz ('params/a/b/kernel' keys) and returns its SHA-256."""
  flat = {k: np.asarray(v, np.float32)
          for k, v in traverse_util.flatten_dict(dict(variables), sep='/').items()}
  for key, value in (metadata or {}).items():
    flat[f'meta/{key}'] = np.asarray(str(value))
  # Written whole or not at all: an interrupted conversion never leaves a half file.
  return sha256_of_file(files.write_npz(path, **flat))


def load_variables(path: str | os.PathLike[str],
                   expected_shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
  """Reads a file written by save_variables and checks every leaf's shape."""
  with np.load(path, allow_pickle=False) as data:
    flat = {k: data[k] for k in data.files if not k.startswith('meta/')}
  missing = sorted(set(expected_shapes) - set(flat))
  unexpected = sorted(set(flat) - set(expected_shapes))
  wrong = sorted(k for k in set(flat) & set(expected_shapes)
                 if flat[k].shape != tuple(expected_shapes[k]))
  if missing or unexpected or wrong:
    raise ValueError(
        f'{path} does not hold the expected network: missing {missing[:5]}, '
        f'unexpected {unexpected[:5]}, wrong shapes {wrong[:5]}. Re-run the converter.')
  return traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in flat.items()}, sep='/')


def random_inception_variables(seed: int = 0) -> dict[str, Any]:
  """Random (He-scaled) variables with the real tree: for tests and mock runs."""
  rng = np.random.default_rng(seed)
  flat = {}
  for key, shape in _variable_shapes().items():
    leaf = key.rsplit('/', 1)[-1]
    if leaf == 'kernel':
      fan_in = int(np.prod(shape[:-1]))
      value = rng.normal(size=shape) * np.sqrt(2.0 / fan_in)
    elif leaf in ('scale', 'var'):
      value = rng.uniform(0.8, 1.2, size=shape)
    else:  # bias, mean
      value = rng.normal(size=shape) * 0.05
    flat[key] = jnp.asarray(value, jnp.float32)
  return traverse_util.unflatten_dict(flat, sep='/')


# ----------------------------------------------------------------------------
# Conversion from pytorch-fid's state_dict.
# ----------------------------------------------------------------------------


def _load_torch_state_dict(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError('Converting a .pth file needs PyTorch (CPU is enough): '
                      'pip install torch. Training and evaluation do not.') from e
  state = torch.load(path, map_location='cpu', weights_only=True)
  if 'state_dict' in state and isinstance(state['state_dict'], dict):
    state = state['state_dict']
  return {k: v.detach().cpu().numpy() for k, v in state.items()}


# torch leaf name -> (collection, flax leaf name).
_TORCH_LEAVES = {
    'conv.weight': ('params', 'kernel'),
    'bn.weight': ('params', 'scale'),
    'bn.bias': ('params', 'bias'),
    'bn.running_mean': ('batch_stats', 'mean'),
    'bn.running_var': ('batch_stats', 'var'),
}


def inception_variables_from_state_dict(
    state_dict: Mapping[str, np.ndarray]) -> dict[str, Any]:
  """Maps pytorch-fid Inception state_dict arrays onto the Flax tree (strict)."""
  flat = {}
  for name, value in state_dict.items():
    value = np.asarray(value)
    if name.endswith('num_batches_tracked'):
      continue  # Training-only counter.
    if name in ('fc.weight', 'fc.bias'):
      flat['params/fc/' + ('kernel' if name == 'fc.weight' else 'bias')] = (
          value.T if name == 'fc.weight' else value)
      continue
    parts = name.split('.')
    torch_leaf = '.'.join(parts[-2:])
    if torch_leaf not in _TORCH_LEAVES:
      raise ValueError(f'Unexpected entry {name!r} in the Inception state_dict.')
    collection, leaf = _TORCH_LEAVES[torch_leaf]
    if leaf == 'kernel':
      value = value.transpose(2, 3, 1, 0)  # OIHW -> HWIO.
    flat['/'.join([collection] + parts[:-2] + [parts[-2], leaf])] = value
  expected = _variable_shapes()
  missing = sorted(set(expected) - set(flat))
  unexpected = sorted(set(flat) - set(expected))
  wrong = sorted(k for k in set(flat) & set(expected) if flat[k].shape != expected[k])
  if missing or unexpected or wrong:
    raise ValueError(
        'The state_dict is not pytorch-fid\'s FID Inception '
        f'({PYTORCH_FID_WEIGHTS_NAME}): missing {missing[:5]}, unexpected '
        f'{unexpected[:5]}, wrong shapes {wrong[:5]}.')
  return traverse_util.unflatten_dict(
      {k: v.astype(np.float32) for k, v in flat.items()}, sep='/')


def convert_pytorch_fid_weights(pth_path: str | os.PathLike[str],
                                out_path: str | os.PathLike[str] | None = None) -> str:
  """Converts pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` to our .npz.

  Args:
    pth_path: the torch state_dict file (needs `torch` to read).
    out_path: destination; default `cache_dir() / INCEPTION_FILENAME`.

  Returns:
    The SHA-256 of the written file.
  """
  out_path = pathlib.Path(out_path) if out_path else cache_dir() / INCEPTION_FILENAME
  source_sha = sha256_of_file(pth_path)
  if source_sha != PYTORCH_FID_WEIGHTS_SHA256:
    print(f'warning: {pth_path} has SHA-256 {source_sha}, not the published '
          f'{PYTORCH_FID_WEIGHTS_SHA256} of {PYTORCH_FID_WEIGHTS_NAME}; '
          'FIDs will not be comparable to published ones.', file=sys.stderr)
  variables = inception_variables_from_state_dict(_load_torch_state_dict(pth_path))
  return save_variables(variables, out_path, {'source_sha256': source_sha,
                                               'source_name': pathlib.Path(pth_path).name})


# ----------------------------------------------------------------------------
# Loading and batched feature extraction.
# ----------------------------------------------------------------------------


def load_inception(path: str | os.PathLike[str] | None = None,
                   preprocessing: str = 'tf') -> tuple[ApplyFn, dict[str, Any]]:
  """Returns (apply_fn, variables) of the converted FID Inception.

  apply_fn(variables, images) takes float NHWC pixels in [0, 255] and returns
  {'pool', 'logits', 'logits_unbiased'}; see `inception_features` for batches
  of uint8 or [-1, 1] images.

  Raises:
    PretrainedWeightsNotFoundError: the converted file is missing; the message
      says which file to fetch and which command converts it.
  """
  path = pathlib.Path(path) if path else cache_dir() / INCEPTION_FILENAME
  if not path.is_file():
    raise PretrainedWeightsNotFoundError(
        f'FID Inception weights not found at {path}. Download '
        f'{PYTORCH_FID_WEIGHTS_NAME} (SHA-256 {PYTORCH_FID_WEIGHTS_SHA256}) from '
        f'{PYTORCH_FID_WEIGHTS_URL} on a machine with network access, then run '
        f'`python -m cm_jax.evaluation.inception convert --src '
        f'{PYTORCH_FID_WEIGHTS_NAME} --dst {path}` (needs torch). The cache '
        'directory is $CM_JAX_CACHE, default ~/.cache/cm_jax.')
  variables = load_variables(path, _variable_shapes())
  return InceptionV3(preprocessing=preprocessing).apply, variables


def _to_pixels(images: jax.Array) -> jax.Array:
  """uint8 [0, 255] or float [-1, 1], 1 or 3 channels -> float RGB in [0, 255]."""
  if images.dtype == jnp.uint8:
    pixels = images.astype(jnp.float32)
  else:
    pixels = (images.astype(jnp.float32) + 1.0) * 127.5
  if pixels.shape[-1] == 1:
    pixels = jnp.repeat(pixels, 3, axis=-1)  # Grey -> RGB, as PIL's convert does.
  return pixels


@functools.lru_cache(maxsize=8)
def make_batch_fn(apply_fn: ApplyFn) -> Callable[[Variables, jax.Array], dict[str, jax.Array]]:
  """jit(variables, batch) -> features: a pure function of one batch.

  The batch axis can be sharded over a mesh (pass sharded inputs, or use
  `inception_features(..., sharding=...)`); every example is independent.
  """
  return jax.jit(lambda variables, batch: apply_fn(variables, _to_pixels(batch)))


def inception_features(apply_fn: ApplyFn, variables: Variables, images: Any,
                       batch_size: int = 250,
                       sharding: jax.sharding.Sharding | None = None) -> dict[str, np.ndarray]:
  """Inception features of many images, one fixed-shape jitted batch at a time.

  Args:
    apply_fn: from `load_inception` (or `InceptionV3(...).apply`).
    variables: the network's variables.
    images: [N, H, W, C] with C in {1, 3}: uint8 in [0, 255], or float in
      [-1, 1] (the project's convention). For numbers comparable with the
      reference evaluators, quantise samples to uint8 first as they do.
    batch_size: examples per call; the last batch is zero-padded so only one
      shape is compiled.
    sharding: optional sharding of each [batch_size, H, W, C] batch (e.g.
      NamedSharding(mesh, P('data'))); batch_size must divide over it.

  Returns:
    {'pool': [N, 2048], 'logits': [N, 1008], 'logits_unbiased': [N, 1008]}
    float32 numpy arrays.
  """
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f'Expected [N, H, W, 1 or 3] images, got shape {images.shape}.')
  if batch_size < 1:
    raise ValueError(f'batch_size must be positive, got {batch_size}.')
  batch_shape = (batch_size,) + images.shape[1:]
  if sharding is not None:
    try:
      sharding.shard_shape(batch_shape)
    except ValueError as e:
      raise ValueError(f'batch_size={batch_size} does not divide over the '
                       f'sharding {sharding}: {e}') from e
    if isinstance(sharding, jax.sharding.NamedSharding):
      replicated = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
      variables = jax.device_put(variables, replicated)
  batch_fn = make_batch_fn(apply_fn)
  outputs: dict[str, list[np.ndarray]] = {}
  for start in range(0, images.shape[0], batch_size):
    batch = images[start:start + batch_size]
    count = batch.shape[0]
    if count < batch_size:
      batch = np.concatenate([batch, np.zeros((batch_size - count,) + batch.shape[1:], batch.dtype)])
    batch = jax.device_put(batch, sharding) if sharding is not None else batch
    for key, value in batch_fn(variables, batch).items():
      outputs.setdefault(key, []).append(np.asarray(value)[:count])
  if not outputs:
    return {'pool': np.zeros((0, 2048), np.float32),
            'logits': np.zeros((0, NUM_CLASSES), np.float32),
            'logits_unbiased': np.zeros((0, NUM_CLASSES), np.float32)}
  return {k: np.concatenate(v) for k, v in outputs.items()}


# ----------------------------------------------------------------------------
# CLI.
# ----------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog='python -m cm_jax.evaluation.inception',
                                   description=__doc__.split('\n', 1)[0])
  commands = parser.add_subparsers(dest='command', required=True)
  convert = commands.add_parser('convert', help=f'convert {PYTORCH_FID_WEIGHTS_NAME}')
  convert.add_argument('--src', required=True, help='pytorch-fid .pth state_dict')
  convert.add_argument('--dst', default=None,
                       help=f'output .npz (default: {cache_dir() / INCEPTION_FILENAME})')
  args = parser.parse_args(argv)
  dst = args.dst or str(cache_dir() / INCEPTION_FILENAME)
  digest = convert_pytorch_fid_weights(args.src, dst)
  print(f'wrote {dst}\nsha256 {digest}')


if __name__ == '__main__':
  main()

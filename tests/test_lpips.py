"""Parity of the Flax LPIPS-VGG16 with a PyTorch reference of the `lpips` package.

The `lpips` package imports torchvision (not installable here) for its VGG16
trunk, so the reference below re-implements `lpips.LPIPS(net='vgg',
version='0.1')` in plain torch with the same module names: torchvision's
`vgg16().features` layer list sliced as lpips' `pretrained_networks.vgg16`, its
ScalingLayer, and lin0..lin4 = Sequential(Dropout, 1x1 conv without bias). The
trunk gets random weights (saved in torchvision's state_dict layout); the
linear heads are the real `lpips/weights/v0.1/vgg.pth` when the lpips package
files are installed (`pip install --no-deps lpips`), random otherwise.
"""

import copy
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

# torch (requirements-test.txt) is required: a missing one fails here instead of skipping quietly.
import torch
from torch import nn
import torch.nn.functional as F

from cm_jax.evaluation import lpips  # pylint: disable=g-import-not-at-top

# Each distance is a sum of means of non-negative terms (no cancellation) after
# 13 float32 convs; measured relative error is ~1e-7 (real heads, random trunk).
RTOL = 2e-5
_VGG16_CFG = (64, 64, 'M', 128, 128, 'M', 256, 256, 256, 'M', 512, 512, 512, 'M', 512, 512, 512, 'M')
_SLICES = ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30))


def _vgg16_features():
  """torchvision.models.vgg16().features: the same layers at the same indices."""
  layers, in_channels = [], 3
  for v in _VGG16_CFG:
    if v == 'M':
      layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
    else:
      layers += [nn.Conv2d(in_channels, v, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
      in_channels = v
  return nn.Sequential(*layers)


class _VGG16Slices(nn.Module):
  """lpips.pretrained_networks.vgg16: relu1_2, relu2_2, relu3_3, relu4_3, relu5_3."""

  def __init__(self, features):
    super().__init__()
    for k, (start, stop) in enumerate(_SLICES):
      block = nn.Sequential()
      for i in range(start, stop):
        block.add_module(str(i), features[i])
      setattr(self, f'slice{k + 1}', block)

  def forward(self, x):
    taps = []
    for k in range(5):
      x = getattr(self, f'slice{k + 1}')(x)
      taps.append(x)
    return taps


class _NetLinLayer(nn.Module):

  def __init__(self, channels):
    super().__init__()
    self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, 1, stride=1, padding=0, bias=False))


class TorchLPIPS(nn.Module):
  """lpips.LPIPS(net='vgg', version='0.1', lpips=True, spatial=False), eval mode."""

  def __init__(self, features):
    super().__init__()
    self.register_buffer('shift', torch.tensor([-.030, -.088, -.188])[None, :, None, None])
    self.register_buffer('scale', torch.tensor([.458, .448, .450])[None, :, None, None])
    self.net = _VGG16Slices(features)
    for k, channels in enumerate(lpips.LPIPS_CHANNELS):
      setattr(self, f'lin{k}', _NetLinLayer(channels))

  def forward(self, in0, in1):
    outs0 = self.net((in0 - self.shift) / self.scale)
    outs1 = self.net((in1 - self.shift) / self.scale)
    val = 0
    for k in range(5):
      f0 = outs0[k] / (torch.sqrt(torch.sum(outs0[k]**2, dim=1, keepdim=True)) + 1e-10)
      f1 = outs1[k] / (torch.sqrt(torch.sum(outs1[k]**2, dim=1, keepdim=True)) + 1e-10)
      val = val + getattr(self, f'lin{k}').model((f0 - f1)**2).mean([2, 3], keepdim=True)
    return val


def _torch_distance(model, x_nhwc, y_nhwc, resize_to):
  x = torch.from_numpy(np.asarray(x_nhwc)).permute(0, 3, 1, 2)
  y = torch.from_numpy(np.asarray(y_nhwc)).permute(0, 3, 1, 2)
  if resize_to is not None:
    # What the consistency-models code does before LPIPS on small images.
    x = F.interpolate(x, size=resize_to, mode='bilinear', align_corners=False)
    y = F.interpolate(y, size=resize_to, mode='bilinear', align_corners=False)
  with torch.no_grad():
    return model(x, y).reshape(-1).numpy()


def _images(seed, shape):
  return np.random.default_rng(seed).uniform(-1, 1, size=shape).astype(np.float32)


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  tmp = tmp_path_factory.mktemp('lpips')
  gen = torch.Generator().manual_seed(0)
  features = _vgg16_features()
  with torch.no_grad():
    for layer in features:
      if isinstance(layer, nn.Conv2d):
        fan_in = layer.weight[0].numel()
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen) * (2.0 / fan_in)**0.5)
        layer.bias.copy_(0.05 * torch.randn(layer.bias.shape, generator=gen))
  vgg_state = {f'features.{k}': v for k, v in features.state_dict().items()}
  # torchvision's file also holds the classifier; the converter must skip it.
  vgg_state['classifier.0.weight'] = torch.zeros(8, 8)
  vgg_pth = tmp / lpips.VGG16_WEIGHTS_NAME
  torch.save(vgg_state, vgg_pth)

  lin_pth = lpips.installed_lpips_lin_path()
  if lin_pth is None:
    lin_pth = tmp / 'vgg_lin.pth'
    torch.save({f'lin{k}.model.1.weight': torch.rand(1, c, 1, 1, generator=gen) / c
                for k, c in enumerate(lpips.LPIPS_CHANNELS)}, lin_pth)
  model = TorchLPIPS(features)
  model.load_state_dict(torch.load(lin_pth, map_location='cpu'), strict=False)
  model.eval()

  npz = tmp / 'lpips.npz'
  lpips.main(['convert', '--vgg', str(vgg_pth), '--lin', str(lin_pth), '--dst', str(npz)])
  return dict(model=model, params=lpips.load_lpips(npz), lin_pth=lin_pth, npz=npz)


def _jax_distance(params, x, y, resize_to):
  return np.asarray(lpips.lpips_distance(params, x, y, resize_to=resize_to,
                                         precision=jax.lax.Precision.HIGHEST))


class TestParity:

  def test_upsampled_to_224_matches_torch(self, reference):
    # The paper's setting: 32x32 images upsampled to 224x224 before LPIPS.
    x, y = _images(0, (2, 32, 32, 3)), _images(1, (2, 32, 32, 3))
    expected = _torch_distance(reference['model'], x, y, resize_to=224)
    actual = _jax_distance(reference['params'], x, y, resize_to=224)
    assert actual.shape == (2,)
    np.testing.assert_allclose(actual, expected, rtol=RTOL)

  def test_native_resolution_matches_torch(self, reference):
    x, y = _images(2, (2, 48, 40, 3)), _images(3, (2, 48, 40, 3))
    expected = _torch_distance(reference['model'], x, y, resize_to=None)
    np.testing.assert_allclose(_jax_distance(reference['params'], x, y, None), expected, rtol=RTOL)

  def test_real_linear_heads_are_converted_exactly(self, reference):
    lin = torch.load(reference['lin_pth'], map_location='cpu')
    for k in range(5):
      np.testing.assert_array_equal(reference['params'][f'lin{k}']['kernel'][:, 0],
                                    lin[f'lin{k}.model.1.weight'].numpy().reshape(-1))

  def test_full_lpips_state_dict_converts_to_the_same_params(self, reference):
    # A torch.save(lpips.LPIPS(net='vgg').state_dict()) works as --vgg alone.
    state = {k: v.numpy() for k, v in reference['model'].state_dict().items()}
    params = lpips.lpips_params_from_state_dicts(state)
    jax.tree.map(np.testing.assert_array_equal, params, jax.tree.map(np.asarray, reference['params']))


class TestProperties:

  def test_zero_on_identical_inputs_symmetric_and_positive(self, reference):
    params = reference['params']
    x, y = _images(4, (3, 32, 32, 3)), _images(5, (3, 32, 32, 3))
    np.testing.assert_allclose(_jax_distance(params, x, x, None), 0.0, atol=1e-7)
    d_xy, d_yx = _jax_distance(params, x, y, None), _jax_distance(params, y, x, None)
    np.testing.assert_allclose(d_xy, d_yx, rtol=1e-6)
    assert np.all(d_xy > 1e-3)

  def test_resize_only_below_the_target(self, reference):
    params = reference['params']
    x, y = _images(6, (1, 16, 16, 3)), _images(7, (1, 16, 16, 3))
    up = lambda a: jax.image.resize(a, (1, 32, 32, 3), 'bilinear')
    np.testing.assert_allclose(_jax_distance(params, x, y, 32),
                               _jax_distance(params, up(x), up(y), None), rtol=1e-5)
    # Images already at least resize_to are used as they are.
    np.testing.assert_array_equal(_jax_distance(params, x, y, 8), _jax_distance(params, x, y, None))

  def test_grey_images_are_repeated_to_rgb(self, reference):
    params = reference['params']
    x, y = _images(8, (2, 16, 16, 1)), _images(9, (2, 16, 16, 1))
    rgb = lambda a: np.repeat(a, 3, axis=-1)
    np.testing.assert_allclose(_jax_distance(params, x, y, None),
                               _jax_distance(params, rgb(x), rgb(y), None), rtol=1e-6)

  def test_gradient_is_finite_even_at_zero_distance(self, reference):
    params = reference['params']
    x, y = _images(10, (2, 16, 16, 3)), _images(11, (2, 16, 16, 3))
    # The weights are an argument, not constants folded into the compiled gradient.
    grad_fn = jax.jit(jax.grad(lambda a, b, p: jnp.sum(lpips.lpips_distance(p, a, b, resize_to=None))))
    grad_apart, grad_equal = grad_fn(x, y, params), grad_fn(x, x, params)
    assert np.all(np.isfinite(grad_apart)) and np.any(grad_apart != 0)
    # d(x, y) has its minimum 0 at y = x: the gradient there is exactly zero.
    assert np.all(np.isfinite(grad_equal)) and np.all(np.abs(grad_equal) < 1e-6)

  def test_shape_mismatch_is_rejected(self, reference):
    with pytest.raises(ValueError, match='same shape'):
      lpips.lpips_distance(reference['params'], _images(0, (1, 8, 8, 3)), _images(0, (1, 8, 9, 3)))


class TestFiles:

  def test_missing_file_error_says_what_to_do(self, tmp_path, monkeypatch):
    monkeypatch.setenv('CM_JAX_CACHE', str(tmp_path))
    with pytest.raises(lpips.PretrainedWeightsNotFoundError) as info:
      lpips.load_lpips()
    message = str(info.value)
    assert str(tmp_path / lpips.LPIPS_FILENAME) in message
    assert lpips.VGG16_WEIGHTS_NAME in message and 'python -m cm_jax.evaluation.lpips convert' in message

  def test_random_params_have_the_converted_tree(self, reference):
    shapes = jax.tree.map(np.shape, reference['params'])
    assert jax.tree.map(np.shape, lpips.random_lpips_params(0)) == shapes

  def test_installed_lin_file_is_the_published_one(self):
    path = lpips.installed_lpips_lin_path()
    assert path is not None, ('lpips package files not installed: the README test command installs '
                              'them (pip install --no-deps lpips==0.1.4).')
    from cm_jax.evaluation import inception  # pylint: disable=g-import-not-at-top
    assert inception.sha256_of_file(path) == lpips.LPIPS_LIN_SHA256


# ----------------------------------------------------------------------------
# Opt-in checks with the real trunk / the real package.
# ----------------------------------------------------------------------------


def test_real_vgg16_parity(tmp_path, reference):
  """Set CM_JAX_VGG16_WEIGHTS=/path/to/vgg16-397923af.pth."""
  src = os.environ.get('CM_JAX_VGG16_WEIGHTS')
  if not src or not pathlib.Path(src).is_file():
    pytest.skip('CM_JAX_VGG16_WEIGHTS does not point at torchvision\'s vgg16-397923af.pth.')
  features = _vgg16_features()
  state = torch.load(src, map_location='cpu')
  features.load_state_dict({k[len('features.'):]: v for k, v in state.items() if k.startswith('features.')})
  model = TorchLPIPS(features)
  model.load_state_dict(torch.load(reference['lin_pth'], map_location='cpu'), strict=False)
  model.eval()
  print('converted sha256', lpips.convert_lpips_weights(src, reference['lin_pth'], tmp_path / 'real.npz'))
  params = lpips.load_lpips(tmp_path / 'real.npz')
  x, y = _images(12, (2, 32, 32, 3)), _images(13, (2, 32, 32, 3))
  np.testing.assert_allclose(_jax_distance(params, x, y, 224),
                             _torch_distance(model, x, y, 224), rtol=RTOL)


def test_reference_matches_the_lpips_package(reference):
  """Our torch reference against lpips.LPIPS itself (its package and torchvision are installed by the
  README's test command: a missing one fails here)."""
  import lpips as lpips_package  # pylint: disable=g-import-not-at-top
  net = lpips_package.LPIPS(net='vgg', pnet_rand=True, verbose=False)
  net.load_state_dict(reference['model'].state_dict(), strict=False)
  x, y = _images(14, (2, 32, 32, 3)), _images(15, (2, 32, 32, 3))
  to_torch = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2)
  with torch.no_grad():
    expected = net(to_torch(x), to_torch(y)).reshape(-1).numpy()
  np.testing.assert_allclose(_torch_distance(reference['model'], x, y, None), expected, rtol=1e-6)


def test_average_pooling_matches_torch_with_avgpool(reference):
  """piq.LPIPS(replace_pooling=True), the ImageNet-64 reference: every max pool an average pool."""
  features = copy.deepcopy(reference['model'].net)
  for block in (getattr(features, f'slice{k}') for k in range(1, 6)):
    for name, layer in block.named_children():
      if isinstance(layer, nn.MaxPool2d):
        setattr(block, name, nn.AvgPool2d(kernel_size=2, stride=2))
  model = copy.deepcopy(reference['model'])
  model.net = features
  x, y = _images(16, (2, 32, 32, 3)), _images(17, (2, 32, 32, 3))
  expected = _torch_distance(model, x, y, resize_to=None)
  actual = np.asarray(lpips.lpips_distance(reference['params'], x, y, resize_to=None,
                                           precision=jax.lax.Precision.HIGHEST, pooling='avg'))
  np.testing.assert_allclose(actual, expected, rtol=RTOL)
  assert np.abs(actual - _jax_distance(reference['params'], x, y, None)).min() > 1e-4


def test_the_consistency_loss_feeds_lpips_images_in_minus_one_to_one(reference):
  """f's outputs go to LPIPS as they are ([-1, 1], the scaling layer's range: piq's normalisation of
  (x + 1) / 2 is the same map), upsampled to 224 from 8x8."""
  from cm_jax import consistency
  from cm_jax.methods import consistency_model
  from configs import default
  cons = default.get_config().consistency
  cons.distance, cons.num_scales = 'lpips', 18
  distance = consistency.make_distance(cons, (8, 8, 3), consistency_model.WEIGHTED_DISTANCES)
  loss_fn = consistency.ConsistencyLoss(cons, default.get_config().noise, 10, distance)
  fn = lambda p, x, sigma, rng: jnp.tanh(x * p)  # Outputs in [-1, 1] that differ between the pair.
  x0 = jnp.asarray(_images(18, (2, 8, 8, 3)))
  rng = jax.random.PRNGKey(0)
  loss, _ = loss_fn(fn, 1.0, 1.0, x0, rng, 0, None, reference['params'])
  idx_rng, noise_rng, _ = jax.random.split(rng, 3)
  idx = jax.random.randint(idx_rng, (2,), 0, 17)
  grid = karras_sigmas(18)
  noise = jax.random.normal(noise_rng, x0.shape)
  online = jnp.tanh(x0 + grid[idx][:, None, None, None] * noise)
  target = jnp.tanh(x0 + grid[idx + 1][:, None, None, None] * noise)
  expected = lpips.lpips_distance(reference['params'], online, target)
  assert float(loss) == pytest.approx(float(jnp.mean(expected)), rel=1e-4)
  shifted = lpips.lpips_distance(reference['params'], (online + 1) / 2, (target + 1) / 2)
  assert abs(float(jnp.mean(shifted)) - float(loss)) > 1e-3 * float(loss)  # The range matters.


def karras_sigmas(n):
  from cm_jax import karras
  return karras.karras_sigmas(n, 0.002, 80.0, 7.0)

"""Parity of the Flax FID Inception with a PyTorch reference of pytorch-fid's network.

pytorch-fid builds its network by patching torchvision's Inception3, and
torchvision does not install here, so the reference below is a small
independent plain-torch re-implementation of pytorch-fid's `fid_inception_v3`
(FIDInceptionA/C/E_1/E_2 forwards, torchvision's InceptionB/D and stem) with the
same module names: pytorch-fid's weight file loads into it strictly. It is
filled with random weights and running stats, saved as a .pth, converted with
our CLI and compared with the Flax network on the same images.
"""

import os
import pathlib

import jax
import numpy as np
import pytest

# torch (requirements-test.txt) is required: a missing one fails here instead of skipping quietly.
import torch
from torch import nn
import torch.nn.functional as F

from cm_jax.evaluation import inception  # pylint: disable=g-import-not-at-top

# float32 through ~50 sequential conv+BN layers: each layer adds ~1e-7 relative
# rounding and BN rescaling amplifies it a little. Measured: max |diff| is
# ~5e-7 of the output scale for pool and logits. 1e-5 leaves a 20x margin for
# other CPU kernels, while any wrong layer (padding, pooling, transpose, BN
# epsilon) gives errors of 1e-3 to O(1).
RTOL = 1e-5


# ----------------------------------------------------------------------------
# PyTorch reference (module names as in pytorch-fid's state_dict).
# ----------------------------------------------------------------------------


class BasicConv2d(nn.Module):

  def __init__(self, in_channels, out_channels, **kwargs):
    super().__init__()
    self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **kwargs)
    self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

  def forward(self, x):
    return F.relu(self.bn(self.conv(x)))


class FIDInceptionA(nn.Module):

  def __init__(self, in_channels, pool_features):
    super().__init__()
    self.branch1x1 = BasicConv2d(in_channels, 64, kernel_size=1)
    self.branch5x5_1 = BasicConv2d(in_channels, 48, kernel_size=1)
    self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
    self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
    self.branch_pool = BasicConv2d(in_channels, pool_features, kernel_size=1)

  def forward(self, x):
    b1 = self.branch1x1(x)
    b5 = self.branch5x5_2(self.branch5x5_1(x))
    b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    bp = self.branch_pool(F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False))
    return torch.cat([b1, b5, b3, bp], 1)


class InceptionB(nn.Module):

  def __init__(self, in_channels):
    super().__init__()
    self.branch3x3 = BasicConv2d(in_channels, 384, kernel_size=3, stride=2)
    self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

  def forward(self, x):
    b3 = self.branch3x3(x)
    bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    return torch.cat([b3, bd, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class FIDInceptionC(nn.Module):

  def __init__(self, in_channels, channels_7x7):
    super().__init__()
    c7 = channels_7x7
    self.branch1x1 = BasicConv2d(in_channels, 192, kernel_size=1)
    self.branch7x7_1 = BasicConv2d(in_channels, c7, kernel_size=1)
    self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
    self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
    self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, kernel_size=1)
    self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
    self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
    self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
    self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
    self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

  def forward(self, x):
    b1 = self.branch1x1(x)
    b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
    bd = self.branch7x7dbl_1(x)
    for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
      bd = layer(bd)
    bp = self.branch_pool(F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False))
    return torch.cat([b1, b7, bd, bp], 1)


class InceptionD(nn.Module):

  def __init__(self, in_channels):
    super().__init__()
    self.branch3x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
    self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
    self.branch7x7x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
    self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
    self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
    self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

  def forward(self, x):
    b3 = self.branch3x3_2(self.branch3x3_1(x))
    b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
    return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class FIDInceptionE(nn.Module):
  """FIDInceptionE_1 (avg pool, padding not counted) or FIDInceptionE_2 (max pool)."""

  def __init__(self, in_channels, max_pool):
    super().__init__()
    self.max_pool = max_pool
    self.branch1x1 = BasicConv2d(in_channels, 320, kernel_size=1)
    self.branch3x3_1 = BasicConv2d(in_channels, 384, kernel_size=1)
    self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
    self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
    self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, kernel_size=1)
    self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
    self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
    self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
    self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

  def forward(self, x):
    b1 = self.branch1x1(x)
    b3 = self.branch3x3_1(x)
    b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
    bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
    if self.max_pool:
      pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
    else:
      pooled = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    return torch.cat([b1, b3, bd, self.branch_pool(pooled)], 1)


class FIDInceptionV3(nn.Module):
  """pytorch-fid's fid_inception_v3(): Inception3(num_classes=1008, aux_logits=False)."""

  def __init__(self):
    super().__init__()
    self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
    self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
    self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
    self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
    self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
    self.Mixed_5b = FIDInceptionA(192, pool_features=32)
    self.Mixed_5c = FIDInceptionA(256, pool_features=64)
    self.Mixed_5d = FIDInceptionA(288, pool_features=64)
    self.Mixed_6a = InceptionB(288)
    self.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
    self.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
    self.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
    self.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
    self.Mixed_7a = InceptionD(768)
    self.Mixed_7b = FIDInceptionE(1280, max_pool=False)
    self.Mixed_7c = FIDInceptionE(2048, max_pool=True)
    self.fc = nn.Linear(2048, 1008)

  def forward(self, x):
    """x: [N, 3, 299, 299] already in [-1, 1]. Returns (pool, logits)."""
    x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
    x = F.max_pool2d(x, kernel_size=3, stride=2)
    x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
    x = F.max_pool2d(x, kernel_size=3, stride=2)
    for name in ('5b', '5c', '5d', '6a', '6b', '6c', '6d', '6e', '7a', '7b', '7c'):
      x = getattr(self, 'Mixed_' + name)(x)
    pool = torch.flatten(F.adaptive_avg_pool2d(x, (1, 1)), 1)
    return pool, self.fc(pool)


def _tf1_resize(x, size):
  """TF1 ResizeBilinear(align_corners=False) written out as torch-fidelity does."""
  out_h, out_w = size
  in_h, in_w = x.shape[2:]

  def grid(in_size, out_size):
    src = torch.arange(out_size, dtype=torch.float32) * torch.tensor(in_size / out_size, dtype=torch.float32)
    lo = src.long()
    hi = (lo + 1).clamp_max(in_size - 1)
    return lo, hi, src - lo.float()

  ylo, yhi, dy = grid(in_h, out_h)
  xlo, xhi, dx = grid(in_w, out_w)
  top = x[:, :, ylo][:, :, :, xlo] + (x[:, :, ylo][:, :, :, xhi] - x[:, :, ylo][:, :, :, xlo]) * dx
  bottom = x[:, :, yhi][:, :, :, xlo] + (x[:, :, yhi][:, :, :, xhi] - x[:, :, yhi][:, :, :, xlo]) * dx
  return top + (bottom - top) * dy.view(1, 1, -1, 1)


def _torch_preprocess(pixels_nhwc_uint8, mode):
  x = torch.from_numpy(pixels_nhwc_uint8).permute(0, 3, 1, 2).float()
  if mode == 'tf':
    return (_tf1_resize(x, (299, 299)) - 128) / 128
  # pytorch-fid: ToTensor() to [0, 1], interpolate, then 2x - 1.
  return 2 * F.interpolate(x / 255, size=(299, 299), mode='bilinear', align_corners=False) - 1


def _randomize_(model, seed):
  """Random weights and BN running stats of a realistic scale, in place."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, nn.Conv2d):
        fan_in = module.weight[0].numel()
        module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * (2.0 / fan_in)**0.5)
      elif isinstance(module, nn.BatchNorm2d):
        n = module.num_features
        module.weight.copy_(0.8 + 0.4 * torch.rand(n, generator=gen))
        module.bias.copy_(0.05 * torch.randn(n, generator=gen))
        module.running_mean.copy_(0.05 * torch.randn(n, generator=gen))
        module.running_var.copy_(0.8 + 0.4 * torch.rand(n, generator=gen))
      elif isinstance(module, nn.Linear):
        module.weight.copy_(torch.randn(module.weight.shape, generator=gen) / 2048**0.5)
        module.bias.copy_(torch.randn(module.bias.shape, generator=gen))  # Large: unbiased != biased.
  return model.eval()


def _max_rel_error(actual, expected):
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  return np.max(np.abs(actual - expected)) / np.max(np.abs(expected))


# ----------------------------------------------------------------------------
# Fixtures: one random reference, converted once through the CLI.
# ----------------------------------------------------------------------------


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  torch.manual_seed(0)
  model = _randomize_(FIDInceptionV3(), seed=0)
  tmp = tmp_path_factory.mktemp('inception')
  pth, npz = tmp / inception.PYTORCH_FID_WEIGHTS_NAME, tmp / 'converted.npz'
  torch.save(model.state_dict(), pth)
  inception.main(['convert', '--src', str(pth), '--dst', str(npz)])
  apply_fn, variables = inception.load_inception(npz)
  images = np.random.default_rng(0).integers(0, 256, size=(2, 32, 32, 3), dtype=np.uint8)
  with torch.no_grad():
    pool, logits = model(_torch_preprocess(images, 'tf'))
  unbiased = pool @ model.fc.weight.T
  return dict(model=model, pth=pth, npz=npz, apply_fn=apply_fn, variables=variables,
              images=images, pool=pool.numpy(), logits=logits.numpy(), unbiased=unbiased.detach().numpy())


@pytest.fixture(scope='module')
def features(reference):
  return inception.inception_features(reference['apply_fn'], reference['variables'],
                                      reference['images'], batch_size=2)


class TestParity:

  def test_state_dict_layout_matches_pytorch_fid(self, reference):
    # The published file holds 566 entries: 94 BasicConv2d x (conv + 4 BN + num_batches_tracked) + fc.
    assert len(reference['model'].state_dict()) == 566

  def test_pool_features(self, features, reference):
    assert features['pool'].shape == (2, 2048)
    err = _max_rel_error(features['pool'], reference['pool'])
    assert err < RTOL, err

  def test_logits(self, features, reference):
    assert features['logits'].shape == (2, 1008)
    assert _max_rel_error(features['logits'], reference['logits']) < RTOL
    assert _max_rel_error(features['logits_unbiased'], reference['unbiased']) < RTOL
    # The fc bias is not negligible here, so the two outputs really differ.
    assert np.max(np.abs(features['logits'] - features['logits_unbiased'])) > 0.5

  def test_float_input_in_minus_one_one_matches_uint8(self, features, reference):
    as_float = reference['images'].astype(np.float32) / 127.5 - 1
    out = inception.inception_features(reference['apply_fn'], reference['variables'], as_float, batch_size=2)
    assert _max_rel_error(out['pool'], features['pool']) < 1e-5

  def test_batch_independent_and_deterministic(self, features, reference):
    # Batch 1 (a new compiled shape) and a padded last batch give the same rows.
    single = inception.inception_features(reference['apply_fn'], reference['variables'],
                                          reference['images'][1:], batch_size=1)
    assert _max_rel_error(single['pool'], features['pool'][1:]) < 1e-5
    again = inception.inception_features(reference['apply_fn'], reference['variables'],
                                         reference['images'], batch_size=2)
    np.testing.assert_array_equal(again['pool'], features['pool'])


class TestPreprocessing:

  @pytest.mark.parametrize('mode', ['tf', 'pytorch_fid'])
  @pytest.mark.parametrize('size', [(32, 32), (8, 8), (301, 400), (299, 299)])
  def test_resize_and_scaling_match_torch(self, mode, size):
    images = np.random.default_rng(1).integers(0, 256, size=(1,) + size + (3,), dtype=np.uint8)
    expected = _torch_preprocess(images, mode).permute(0, 2, 3, 1).numpy()
    pixels = images.astype(np.float32)
    if mode == 'tf':
      actual = (inception.resize_bilinear(pixels, (299, 299), half_pixel=False) - 128) / 128
    else:
      actual = 2 * inception.resize_bilinear(pixels / 255, (299, 299), half_pixel=True) - 1
    np.testing.assert_allclose(actual, expected, atol=2e-6)

  def test_tf1_resize_matches_tensorflow_op(self):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    images = np.random.default_rng(2).uniform(0, 255, size=(2, 13, 32, 3)).astype(np.float32)
    for size in [(299, 299), (7, 50)]:
      expected = tf.raw_ops.ResizeBilinear(images=images, size=size, align_corners=False,
                                           half_pixel_centers=False).numpy()
      actual = inception.resize_bilinear(images, size, half_pixel=False)
      np.testing.assert_allclose(actual, expected, atol=1e-4)

  def test_grey_images_are_repeated_to_rgb(self):
    grey = np.random.default_rng(3).integers(0, 256, size=(2, 8, 8, 1), dtype=np.uint8)
    np.testing.assert_array_equal(inception._to_pixels(grey), np.repeat(grey, 3, -1).astype(np.float32))


class TestFiles:

  def test_missing_file_error_says_what_to_do(self, tmp_path, monkeypatch):
    monkeypatch.setenv('CM_JAX_CACHE', str(tmp_path))
    with pytest.raises(inception.PretrainedWeightsNotFoundError) as info:
      inception.load_inception()
    message = str(info.value)
    assert str(tmp_path / inception.INCEPTION_FILENAME) in message
    assert inception.PYTORCH_FID_WEIGHTS_NAME in message
    assert 'python -m cm_jax.evaluation.inception convert' in message
    assert isinstance(info.value, FileNotFoundError)

  def test_converter_rejects_an_incomplete_state_dict(self, reference):
    state = {k: v.numpy() for k, v in reference['model'].state_dict().items()}
    del state['Mixed_7c.branch_pool.bn.running_var']
    with pytest.raises(ValueError, match='branch_pool'):
      inception.inception_variables_from_state_dict(state)

  def test_converted_file_records_its_source(self, reference):
    with np.load(reference['npz']) as data:
      assert str(data['meta/source_sha256']) == inception.sha256_of_file(reference['pth'])

  def test_random_variables_have_the_converted_tree(self, reference):
    random_vars = inception.random_inception_variables(0)
    shapes = jax.tree.map(np.shape, reference['variables'])
    assert jax.tree.map(np.shape, random_vars) == shapes


# ----------------------------------------------------------------------------
# Opt-in checks with the real weights / the real package.
# ----------------------------------------------------------------------------


def test_real_weights_parity(tmp_path):
  """Set CM_JAX_PYTORCH_FID_WEIGHTS=/path/to/pt_inception-2015-12-05-6726825d.pth."""
  src = os.environ.get('CM_JAX_PYTORCH_FID_WEIGHTS')
  if not src or not pathlib.Path(src).is_file():
    pytest.skip('CM_JAX_PYTORCH_FID_WEIGHTS does not point at pytorch-fid\'s weight file.')
  model = FIDInceptionV3().eval()
  model.load_state_dict(torch.load(src, map_location='cpu'), strict=True)
  digest = inception.convert_pytorch_fid_weights(src, tmp_path / 'real.npz')
  print('converted sha256', digest)
  apply_fn, variables = inception.load_inception(tmp_path / 'real.npz')
  images = np.random.default_rng(4).integers(0, 256, size=(2, 32, 32, 3), dtype=np.uint8)
  out = inception.inception_features(apply_fn, variables, images, batch_size=2)
  with torch.no_grad():
    pool, logits = model(_torch_preprocess(images, 'tf'))
  assert _max_rel_error(out['pool'], pool.numpy()) < RTOL
  assert _max_rel_error(out['logits'], logits.numpy()) < RTOL


def test_reference_matches_the_pytorch_fid_package(reference):
  """Our torch reference against pytorch-fid's own blocks (requirements-test.txt installs it and the
  torchvision it builds on: a missing one fails here)."""
  from pytorch_fid import inception as fid_inception  # pylint: disable=g-import-not-at-top
  net = fid_inception._inception_v3(num_classes=1008, aux_logits=False, weights=None)
  net.Mixed_5b = fid_inception.FIDInceptionA(192, pool_features=32)
  net.Mixed_5c = fid_inception.FIDInceptionA(256, pool_features=64)
  net.Mixed_5d = fid_inception.FIDInceptionA(288, pool_features=64)
  net.Mixed_6b = fid_inception.FIDInceptionC(768, channels_7x7=128)
  net.Mixed_6c = fid_inception.FIDInceptionC(768, channels_7x7=160)
  net.Mixed_6d = fid_inception.FIDInceptionC(768, channels_7x7=160)
  net.Mixed_6e = fid_inception.FIDInceptionC(768, channels_7x7=192)
  net.Mixed_7b = fid_inception.FIDInceptionE_1(1280)
  net.Mixed_7c = fid_inception.FIDInceptionE_2(2048)
  net.load_state_dict(reference['model'].state_dict(), strict=True)
  net.eval()
  x = _torch_preprocess(reference['images'], 'tf')
  with torch.no_grad():
    np.testing.assert_allclose(net(x).numpy(), reference['logits'], rtol=1e-5, atol=1e-5)

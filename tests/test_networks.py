"""Checks of cm_jax.networks: the reference parameter count, shapes, conditioning, dtypes, FIR resampling
against closed forms and a NumPy upfirdn2d, and config errors raised before tracing."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from cm_jax.errors import ConfigError
from cm_jax.networks import get_network, layers
from tests import network_checks
from configs import default


def _model_config(**overrides) -> ml_collections.ConfigDict:
  config = default.get_config().model
  config.update(overrides)
  return config


def _cifar10_config(**overrides) -> ml_collections.ConfigDict:
  # The consistency-models reference NCSN++ for CIFAR-10 (configs/cifar10_k_ve.py there).
  config = _model_config(
      nf=128, ch_mult=(2, 2, 2), num_res_blocks=4, attn_resolutions=(16,), resblock_type='biggan',
      fir=True, fir_kernel=(1, 3, 3, 1), skip_rescale=True, progressive='none',
      progressive_input='residual', progressive_combine='sum', embedding_type='fourier',
      fourier_scale=16.0, init_scale=0.0, conv_size=3, resamp_with_conv=True, num_classes=0)
  config.update(overrides)
  return config


def _init_shapes(net, image_size, num_channels, labels=None):
  x = jnp.zeros((2, image_size, image_size, num_channels))
  rngs = {'params': jax.random.key(0), 'dropout': jax.random.key(1)}
  return jax.eval_shape(lambda: net.init(rngs, x, jnp.zeros((2,)), labels, train=False))


_key = network_checks.fast_key


def _inputs(batch, image_size, num_channels):
  x = jax.random.normal(jax.random.key(2), (batch, image_size, image_size, num_channels))
  noise_cond = jnp.linspace(-1.5, 1.0, batch)  # ln(sigma)/4 for sigma in about [0.002, 55]
  return x, noise_cond


# ---------------------------------------------------------------------------------------------------
# Architecture.


def test_cifar10_ncsnpp_matches_the_reference_parameter_count():
  net = get_network(_cifar10_config(), 32, 3)
  params = _init_shapes(net, 32, 3)['params']
  leaves = jax.tree.leaves(params)
  assert sum(int(np.prod(leaf.shape)) for leaf in leaves) == 56_395_651
  assert len(leaves) == 445
  assert all(leaf.dtype == jnp.float32 for leaf in leaves)
  # The Fourier frequencies are counted: embedding size nf.
  assert params['GaussianFourierProjection_0']['W'].shape == (128,)

  out = jax.eval_shape(
      lambda p: net.apply({'params': p}, jnp.zeros((2, 32, 32, 3)), jnp.zeros((2,)), None), params)
  assert out.shape == (2, 32, 32, 3) and out.dtype == jnp.float32


@pytest.mark.parametrize('overrides', [
    dict(),  # NCSN++ as in configs/default.py.
    # DDPM++: DDPM blocks, plain resampling, sinusoidal embedding.
    dict(resblock_type='ddpm', fir=False, progressive_input='none', embedding_type='positional'),
    dict(resblock_type='ddpm', fir=True, resamp_with_conv=False, progressive_input='input_skip',
         progressive_combine='cat'),
    dict(progressive='output_skip', progressive_input='input_skip', progressive_combine='sum'),
    dict(progressive='residual', fir=False, ch_mult=(1, 2, 2), attn_resolutions=(4, 2), conv_size=5),
    dict(num_classes=10, dtype='bfloat16'),
])
def test_variant_shapes(overrides):
  labels = jnp.zeros((2,), jnp.int32) if overrides.get('num_classes') else None
  net = get_network(_model_config(**overrides), 8, 1)
  params = _init_shapes(net, 8, 1, labels)['params']
  x = jnp.zeros((2, 8, 8, 1))
  out = jax.eval_shape(lambda p: net.apply({'params': p}, x, jnp.zeros((2,)), labels), params)
  assert out.shape == x.shape and out.dtype == jnp.float32


@pytest.fixture(scope='module')
def digits():
  """The default digits network, class-conditional with dropout, initialised once for several tests."""
  config = _model_config(num_classes=10, dropout=0.3)
  net = get_network(config, 8, 1)
  labels = jnp.arange(4, dtype=jnp.int32)
  x = jnp.zeros((1, 8, 8, 1))
  init = jax.jit(functools.partial(net.init, train=False))
  params = init({'params': _key(0), 'dropout': _key(1)}, x, jnp.zeros((1,)), labels[:1])['params']
  # With init_scale=0 every residual branch starts at ~0, so conditioning barely shows: most tests
  # perturb the parameters to a generic point.
  rng = np.random.default_rng(0)
  generic = jax.tree.map(lambda p: p + 0.1 * rng.normal(size=p.shape).astype(np.float32), params)
  apply = jax.jit(net.apply, static_argnames='train')
  return config, apply, params, generic, labels


def test_digits_forward_starts_at_zero_with_init_scale_zero(digits):
  _, apply, params, _, labels = digits
  x, noise_cond = _inputs(4, 8, 1)
  out = apply({'params': params}, x, noise_cond, labels)
  assert out.shape == (4, 8, 8, 1) and out.dtype == jnp.float32
  assert np.all(np.isfinite(out))
  # init_scale=0 means a 1e-10 variance scale for the last conv of every residual branch, the attention
  # output and the output conv, so the untrained network outputs (almost) zero.
  assert np.abs(params['ResnetBlockBigGANpp_0']['Conv_1']['kernel']).max() < 1e-4
  assert np.abs(params['AttnBlockpp_0']['NIN_3']['W']).max() < 1e-4
  assert np.abs(params['Conv_1']['kernel']).max() < 1e-4
  assert np.abs(out).max() < 1e-4
  # The ordinary layers have the DDPM init: fan_avg uniform, bound sqrt(3 * 2 / (fan_in + fan_out)).
  kernel = params['ResnetBlockBigGANpp_0']['Conv_0']['kernel']
  bound = np.sqrt(6 / (9 * 32 + 9 * 32))
  assert 0.9 * bound < np.abs(kernel).max() <= bound
  np.testing.assert_allclose(np.std(params['GaussianFourierProjection_0']['W']), 16.0, rtol=0.3)
  # W = scale * z with z ~ N(0, 1) drawn from the key alone: 4096 draws pin the law, and another
  # scale (iCT's 0.02) scales the very same draws.
  t = jnp.zeros((1,))
  w = {scale: np.asarray(layers.GaussianFourierProjection(embedding_size=4096, scale=scale).init(
      jax.random.PRNGKey(3), t)['params']['W']) for scale in (16.0, 0.02)}
  assert np.std(w[16.0] / 16.0) == pytest.approx(1.0, abs=0.04)
  assert abs(np.mean(w[16.0] / 16.0)) < 0.06
  np.testing.assert_allclose(w[0.02] / 0.02, w[16.0] / 16.0, rtol=1e-5)


def test_labels_change_the_output(digits):
  _, apply, params, generic, labels = digits
  assert params['Embed_0']['embedding'].shape == (10, 32 * 4)
  x, noise_cond = _inputs(4, 8, 1)
  out = apply({'params': generic}, x, noise_cond, labels)
  out_other = apply({'params': generic}, x, noise_cond, (labels + 1) % 10)
  assert out.shape == (4, 8, 8, 1)
  assert np.all(np.abs(out - out_other).max(axis=(1, 2, 3)) > 1e-3)
  with pytest.raises(ValueError, match='pass labels'):
    apply({'params': generic}, x, noise_cond, None)


def test_dropout_uses_the_key_only_in_training(digits):
  _, apply, _, generic, labels = digits
  network_checks.check_dropout_uses_the_key_only_in_training(apply, generic, *_inputs(4, 8, 1), labels)


def test_bfloat16_compute_is_close_to_float32(digits):
  config, apply, _, generic, labels = digits
  network_checks.check_bfloat16_close_to_float32(config, apply, generic, *_inputs(4, 8, 1), labels)


def test_noise_embeddings_match_closed_forms():
  t = jnp.array([0.0, 0.3, -2.0])
  fourier = layers.GaussianFourierProjection(embedding_size=4, scale=16.0)
  w = jnp.array([0.5, -1.0, 2.0, 3.0])
  emb = fourier.apply({'params': {'W': w}}, t)
  proj = 2 * np.pi * np.asarray(t)[:, None] * np.asarray(w)[None]
  np.testing.assert_allclose(emb, np.concatenate([np.sin(proj), np.cos(proj)], -1), atol=1e-5)
  # W is a parameter but is never trained.
  grad = jax.grad(lambda p: fourier.apply({'params': p}, t).sum())({'W': w})
  np.testing.assert_array_equal(grad['W'], 0)

  emb = layers.sinusoidal_embedding(t, 8)
  freqs = 10000.0 ** (-np.arange(4) / 3)
  args = np.asarray(t)[:, None] * freqs[None]
  np.testing.assert_allclose(emb, np.concatenate([np.sin(args), np.cos(args)], -1), atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# FIR resampling.


def _jit(fn, *args, **kwargs):
  """fn(x, *args, **kwargs) as one compiled program (faster than op-by-op for the small tests)."""
  return jax.jit(lambda x: fn(x, *args, **kwargs))


def _numpy_upfirdn2d(x, kernel_1d, up=1, down=1, pad0=0, pad1=0):
  """Direct NumPy upfirdn2d (StyleGAN2) with the 2-D kernel outer(k, k), for reference."""
  kernel = np.outer(kernel_1d, kernel_1d)
  n, h, w, c = x.shape
  z = np.zeros((n, h * up, w * up, c))
  z[:, ::up, ::up] = x
  pads = ((0, 0), (max(pad0, 0), max(pad1, 0)), (max(pad0, 0), max(pad1, 0)), (0, 0))
  z = np.pad(z, pads)
  z = z[:, max(-pad0, 0):z.shape[1] - max(-pad1, 0), max(-pad0, 0):z.shape[2] - max(-pad1, 0)]
  kh, kw = kernel.shape
  out = np.zeros((n, z.shape[1] - kh + 1, z.shape[2] - kw + 1, c))
  for a in range(kh):
    for b in range(kw):
      # A true convolution: tap (a, b) of the window meets the flipped kernel.
      out += kernel[kh - 1 - a, kw - 1 - b] * z[:, a:a + out.shape[1], b:b + out.shape[2]]
  return out[:, ::down, ::down]


@pytest.mark.parametrize('fir_kernel', [(1, 3, 3, 1), (1, 1), (1, 2, 1), (1, 4, 6, 4, 1), (0.5, 2.0, 1.0)])
def test_fir_resampling_matches_numpy_upfirdn2d(fir_kernel):
  x = np.random.default_rng(0).normal(size=(2, 8, 6, 3)).astype(np.float32)
  k = np.asarray(fir_kernel, np.float64) / np.sum(fir_kernel)
  p = len(k) - 2
  up = _numpy_upfirdn2d(x, 2 * k, up=2, pad0=(p + 1) // 2 + 1, pad1=p // 2)
  down = _numpy_upfirdn2d(x, k, down=2, pad0=(p + 1) // 2, pad1=p // 2)
  np.testing.assert_allclose(_jit(layers.upsample_2d, fir_kernel)(x), up, atol=1e-5)
  np.testing.assert_allclose(_jit(layers.downsample_2d, fir_kernel)(x), down, atol=1e-5)
  assert up.shape == (2, 16, 12, 3) and down.shape == (2, 4, 3, 3)
  # Negative pads crop.
  np.testing.assert_allclose(
      _jit(layers.upfirdn2d, k, up=2, down=3, pad0=-1, pad1=2)(x),
      _numpy_upfirdn2d(x, k, up=2, down=3, pad0=-1, pad1=2), atol=1e-5)


def test_fir_resampling_of_a_constant_image():
  ones = jnp.ones((1, 8, 8, 2))
  # With [1, 3, 3, 1] / 8 the border taps reach one zero pixel outside the image: 7/8 of the constant.
  profile = np.array([7 / 8, 1, 1, 7 / 8])
  np.testing.assert_allclose(layers.downsample_2d(ones, (1, 3, 3, 1))[0, :, :, 0],
                             np.outer(profile, profile), rtol=1e-6)
  # Upsampling: the first and last outputs miss a 1/4 tap.
  profile = np.array([3 / 4] + [1] * 14 + [3 / 4])
  np.testing.assert_allclose(layers.upsample_2d(ones, (1, 3, 3, 1))[0, :, :, 1],
                             np.outer(profile, profile), rtol=1e-6)
  # Down then up keeps the constant away from the border.
  # (Each border effect reaches two pixels at the higher resolution.)
  constant = 3 * jnp.ones((1, 16, 16, 1))
  round_trip = layers.upsample_2d(layers.downsample_2d(constant, (1, 3, 3, 1)), (1, 3, 3, 1))
  np.testing.assert_allclose(round_trip[:, 4:-4, 4:-4], 3.0, rtol=1e-6)
  # The naive resamplers too.
  np.testing.assert_allclose(layers.naive_downsample_2d(ones), 1.0)
  np.testing.assert_allclose(layers.naive_upsample_2d(ones), 1.0)


def test_fir_resampling_is_centred():
  # A symmetric kernel with centred padding commutes with flipping the image.
  x = jax.random.normal(jax.random.key(0), (1, 8, 8, 1))
  for resample in (layers.upsample_2d, layers.downsample_2d):
    np.testing.assert_allclose(resample(x[:, ::-1], (1, 3, 3, 1)), resample(x, (1, 3, 3, 1))[:, ::-1],
                               atol=1e-6)


def _fused_conv(x, weight, **kwargs):
  params = {'weight': weight, 'bias': jnp.zeros((weight.shape[-1],))}
  module = layers.FirConv2d(weight.shape[-1], weight.shape[0], fir_kernel=(1, 3, 3, 1), **kwargs)
  return jax.jit(module.apply)({'params': params}, x)


def test_fused_fir_convs():
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
  # With a centred identity kernel the fused convs reduce to plain FIR resampling.
  identity = jnp.zeros((3, 3, 3, 3)).at[1, 1].set(jnp.eye(3))
  np.testing.assert_allclose(_fused_conv(x, identity, up=True), layers.upsample_2d(x, (1, 3, 3, 1)),
                             atol=1e-5)
  np.testing.assert_allclose(_fused_conv(x, identity, down=True),
                             layers.downsample_2d(x, (1, 3, 3, 1)), atol=1e-5)
  # The upsampling conv equals the reference's transposed conv (StyleGAN2's upsample_conv_2d) followed
  # by the FIR filter.
  weight = jax.random.normal(jax.random.key(1), (3, 3, 3, 5))
  transposed = jax.lax.conv_transpose(
      x, jnp.transpose(weight[::-1, ::-1], (0, 1, 3, 2)), strides=(2, 2), padding='VALID',
      transpose_kernel=True, dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  k = np.array([1, 3, 3, 1]) / 8
  expected = _numpy_upfirdn2d(np.asarray(transposed), 2 * k, pad0=1, pad1=1)
  np.testing.assert_allclose(_fused_conv(x, weight, up=True), expected, atol=1e-4)
  # The downsampling conv: FIR-filter with pads (2, 2), then a VALID stride-2 conv.
  filtered = jnp.asarray(_numpy_upfirdn2d(np.asarray(x), k, pad0=2, pad1=2), jnp.float32)
  expected = jax.lax.conv_general_dilated(filtered, weight, (2, 2), 'VALID',
                                          dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  np.testing.assert_allclose(_fused_conv(x, weight, down=True), expected, atol=1e-4)


# ---------------------------------------------------------------------------------------------------
# Config errors, raised before anything is traced.


@pytest.mark.parametrize('overrides, image_size, match', [
    (dict(name='unet'), 8, "config.model.name='unet' is not one of 'ncsnpp', 'adm'"),
    (dict(attn_resolutions=(3,)), 8, 'never reaches'),
    (dict(ch_mult=(1, 2, 2, 2), attn_resolutions=(2,)), 4, 'divisible by 2\\*\\*3'),
    (dict(ch_mult=(1, 2, 2)), 6, 'divisible'),
    (dict(resblock_type='resnet'), 8, 'resblock_type'),
    (dict(progressive='skip'), 8, 'progressive'),
    (dict(embedding_type='learned'), 8, 'embedding_type'),
    (dict(nf=50), 8, 'GroupNorm'),
    (dict(nf=2), 8, 'GroupNorm'),
    (dict(ch_mult=()), 8, 'ch_mult'),
    (dict(dropout=1.0), 8, 'dropout'),
    (dict(dtype='float16'), 8, 'dtype'),
    (dict(conv_size=4), 8, 'conv_size'),
    (dict(fir_kernel=(1, -1)), 8, 'fir_kernel'),
    (dict(num_classes=-1), 8, 'num_classes'),
    (dict(num_res_blocks=0), 8, 'num_res_blocks'),
])
def test_bad_configs_raise_config_error(overrides, image_size, match):
  with pytest.raises(ConfigError, match=match):
    get_network(_model_config(**overrides), image_size, 1)


def test_missing_field_raises_config_error():
  config = _model_config()
  del config['fourier_scale']
  with pytest.raises(ConfigError, match='fourier_scale is missing'):
    get_network(config, 8, 1)

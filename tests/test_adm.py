"""Checks of the ADM U-Net (cm_jax/networks/adm.py): the reference parameter counts, the zero-initialised
start, conditioning, dropout, bfloat16, the attention layouts and resampling geometry, and config errors
raised before tracing."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from cm_jax.errors import ConfigError
from cm_jax.networks import adm, get_network
from tests import network_checks
from configs import default, imagenet64_edm


def _small_config(**overrides) -> ml_collections.ConfigDict:
  """A 16x16 class-conditional ADM with every option of the ImageNet-64 model, small enough to run."""
  config = default.get_config().model
  config.update(dict(
      name='adm', nf=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), num_head_channels=16,
      use_scale_shift_norm=True, resblock_updown=True, use_new_attention_order=True, num_classes=10,
      dropout=0.3))
  config.update(overrides)
  return config


_key = network_checks.fast_key


def _inputs(batch, image_size, num_channels):
  x = jax.random.normal(jax.random.key(2), (batch, image_size, image_size, num_channels))
  noise_cond = 250.0 * jnp.log(jnp.geomspace(0.002, 80.0, batch))  # c_noise with noise_cond_scale 1000
  return x, noise_cond


def _count(params):
  leaves = jax.tree.leaves(params)
  return sum(int(np.prod(leaf.shape)) for leaf in leaves), len(leaves)


# ---------------------------------------------------------------------------------------------------
# Architecture.


@pytest.mark.parametrize('image_size, overrides, count, tensors', [
    # configs/imagenet64_edm.py. guided-diffusion's UNetModel with these settings (learn_sigma=False, as
    # in openai/consistency_models) has 295,899,267 parameters in 541 tensors; EDM reports 295.9M.
    (64, dict(), 295_899_267, 541),
    # The consistency-models LSUN-256 ADM (launch.sh): unconditional, 256 channels, ch_mult
    # (1, 1, 2, 2, 4, 4), 2 blocks, no scale-shift norm. guided-diffusion: 526,304,771 in 566 tensors.
    (256, dict(nf=256, ch_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=2, use_scale_shift_norm=False,
               num_classes=0), 526_304_771, 566),
])
def test_reference_parameter_counts(image_size, overrides, count, tensors):
  config = imagenet64_edm.get_config().model
  config.update(overrides)
  net = get_network(config, image_size, 3)
  x = jnp.zeros((2, image_size, image_size, 3))
  labels = jnp.zeros((2,), jnp.int32) if config.num_classes else None
  rngs = {'params': jax.random.key(0), 'dropout': jax.random.key(1)}
  params = jax.eval_shape(lambda: net.init(rngs, x, jnp.zeros((2,)), labels))['params']
  assert _count(params) == (count, tensors)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))
  out = jax.eval_shape(lambda p: net.apply({'params': p}, x, jnp.zeros((2,)), labels), params)
  assert out.shape == x.shape and out.dtype == jnp.float32


@pytest.mark.parametrize('overrides, num_channels', [
    (dict(), 3),
    # No attention on the way, legacy order, conv resampling, additive embedding, heads by count.
    (dict(attn_resolutions=(), use_new_attention_order=False, resblock_updown=False,
          use_scale_shift_norm=False, num_head_channels=-1, num_heads=2, num_heads_upsample=4), 3),
    # The embedded digits (8x8 grey) with the default ADM fields: the output has the input's channels.
    (dict(num_classes=0, ch_mult=(1, 2), attn_resolutions=(4,), num_head_channels=-1), 1),
])
def test_variant_shapes(overrides, num_channels):
  config = _small_config(**overrides)
  size = 8 if num_channels == 1 else 16
  net = get_network(config, size, num_channels)
  x = jnp.zeros((2, size, size, num_channels))
  labels = jnp.zeros((2,), jnp.int32) if config.num_classes else None
  rngs = {'params': jax.random.key(0), 'dropout': jax.random.key(1)}
  params = jax.eval_shape(lambda: net.init(rngs, x, jnp.zeros((2,)), labels))['params']
  out = jax.eval_shape(lambda p: net.apply({'params': p}, x, jnp.zeros((2,)), labels), params)
  assert out.shape == x.shape and out.dtype == jnp.float32


@pytest.fixture(scope='module')
def small():
  """The small ADM, initialised once, and a generic point where no layer is zero."""
  config = _small_config()
  net = get_network(config, 16, 3)
  labels = jnp.arange(4, dtype=jnp.int32)
  init = jax.jit(lambda rngs, x, t, y: net.init(rngs, x, t, y, train=False))
  params = init({'params': _key(0), 'dropout': _key(1)}, jnp.zeros((1, 16, 16, 3)), jnp.zeros((1,)),
                labels[:1])['params']
  rng = np.random.default_rng(0)
  generic = jax.tree.map(lambda p: p + 0.05 * rng.normal(size=p.shape).astype(np.float32), params)
  apply = jax.jit(net.apply, static_argnames='train')
  return config, apply, params, generic, labels


def test_fresh_network_outputs_exactly_zero(small):
  _, apply, params, _, labels = small
  x, noise_cond = _inputs(4, 16, 3)
  out = apply({'params': params}, x, noise_cond, labels)
  assert out.shape == (4, 16, 16, 3) and out.dtype == jnp.float32
  # The reference's zero_module: the output conv, the last conv of each residual block and each attention
  # output projection start at exactly zero.
  np.testing.assert_array_equal(out, 0.0)
  for name in ('enc_1_res', 'mid_res_0', 'dec_2_res', 'enc_2_down', 'dec_1_up'):
    np.testing.assert_array_equal(params[name]['out_conv']['kernel'], 0.0)
  np.testing.assert_array_equal(params['mid_attn']['proj_out']['kernel'], 0.0)
  np.testing.assert_array_equal(params['out_conv']['kernel'], 0.0)
  # Other layers have PyTorch's default init, U(-b, b) with b = 1 / sqrt(fan_in), biases included.
  bound = 1 / math.sqrt(9 * 32)
  for leaf in (params['enc_1_res']['in_conv']['kernel'], params['enc_1_res']['in_conv']['bias']):
    assert 0.8 * bound < np.abs(leaf).max() <= bound
  np.testing.assert_allclose(np.std(params['label_embed']['embedding']), 1.0, rtol=0.1)


def test_labels_change_the_output(small):
  _, apply, _, generic, labels = small
  assert generic['label_embed']['embedding'].shape == (10, 4 * 32)
  x, noise_cond = _inputs(4, 16, 3)
  out = apply({'params': generic}, x, noise_cond, labels)
  out_other = apply({'params': generic}, x, noise_cond, (labels + 1) % 10)
  assert np.all(np.abs(out - out_other).max(axis=(1, 2, 3)) > 1e-3)
  with pytest.raises(ValueError, match='pass labels'):
    apply({'params': generic}, x, noise_cond, None)


def test_noise_conditioning_changes_the_output(small):
  _, apply, _, generic, labels = small
  x, noise_cond = _inputs(4, 16, 3)
  out = apply({'params': generic}, x, noise_cond, labels)
  out_shifted = apply({'params': generic}, x, noise_cond + 100.0, labels)
  assert np.all(np.abs(out - out_shifted).max(axis=(1, 2, 3)) > 1e-3)


def test_dropout_uses_the_key_only_in_training(small):
  _, apply, _, generic, labels = small
  network_checks.check_dropout_uses_the_key_only_in_training(apply, generic, *_inputs(4, 16, 3),
                                                              labels)


def test_bfloat16_compute_is_close_to_float32(small):
  config, apply, _, generic, labels = small
  network_checks.check_bfloat16_close_to_float32(config, apply, generic, *_inputs(4, 16, 3), labels)


def test_timestep_embedding_matches_closed_form():
  t = jnp.array([0.0, 3.0, -1553.0])
  emb = adm.timestep_embedding(t, 8)
  freqs = 10000.0 ** (-np.arange(4) / 4)  # P^(-i / half), not DDPM's P^(-i / (half - 1)).
  args = np.asarray(t, np.float64)[:, None] * freqs[None]
  np.testing.assert_allclose(emb, np.concatenate([np.cos(args), np.sin(args)], -1), atol=2e-4)
  odd = adm.timestep_embedding(t, 9)
  np.testing.assert_array_equal(odd[:, :8], emb)
  np.testing.assert_array_equal(odd[:, 8], 0.0)


def test_attention_orders_are_a_permutation_of_the_qkv_channels():
  heads, head_ch = 2, 16
  channels = heads * head_ch
  x = jax.random.normal(jax.random.key(0), (2, 4, 4, channels))
  new = adm.AttentionBlock(num_heads=heads, use_new_attention_order=True)
  legacy = adm.AttentionBlock(num_heads=heads, use_new_attention_order=False)
  params = jax.jit(new.init)(jax.random.key(1), x)['params']
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda p: p + 0.1 * rng.normal(size=p.shape).astype(np.float32), params)
  # New order: channel (part, head, i) of the qkv projection is part * C + head * d + i; legacy order:
  # head * 3d + part * d + i.
  new_index = np.arange(3 * channels).reshape(3, heads, head_ch)
  legacy_index = np.arange(3 * channels).reshape(heads, 3, head_ch).transpose(1, 0, 2)
  perm = np.empty(3 * channels, int)
  perm[legacy_index.ravel()] = new_index.ravel()
  qkv = params['qkv']
  permuted = dict(params, qkv={'kernel': qkv['kernel'][:, perm], 'bias': qkv['bias'][perm]})
  out_new = jax.jit(new.apply)({'params': params}, x)
  apply_legacy = jax.jit(legacy.apply)
  np.testing.assert_allclose(apply_legacy({'params': permuted}, x), out_new, atol=1e-5)
  assert np.abs(apply_legacy({'params': params}, x) - out_new).max() > 1e-3
  # Against a direct NumPy softmax attention of the new layout (GroupNorm with 32 groups of 1 channel).
  xs = np.asarray(x, np.float64)
  mean, var = xs.mean((1, 2), keepdims=True), xs.var((1, 2), keepdims=True)
  h = (xs - mean) / np.sqrt(var + 1e-5) * params['norm']['scale'] + params['norm']['bias']
  q, k, v = np.split((h @ qkv['kernel'] + qkv['bias']).reshape(2, 16, 3, heads, head_ch), 3, axis=2)
  logits = np.einsum('bthd,bshd->bhts', q[:, :, 0], k[:, :, 0]) / np.sqrt(head_ch)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  attended = np.einsum('bhts,bshd->bthd', weights, v[:, :, 0]).reshape(2, 4, 4, channels)
  proj = params['proj_out']
  np.testing.assert_allclose(out_new, xs + attended @ proj['kernel'] + proj['bias'], atol=1e-4)


class _Conv(nn.Module):
  stride: int

  @nn.compact
  def __call__(self, x):
    # pylint: disable-next=protected-access
    return adm._conv(x, x.shape[-1], 'conv', jnp.float32, stride=self.stride)


def test_stride_two_conv_samples_like_pytorch_padding_one():
  # PyTorch's Conv2d(3, stride=2, padding=1) centres output i on input 2i; 'SAME' would centre it on 2i + 1.
  x = jax.random.normal(jax.random.key(0), (1, 8, 8, 2))
  centre = jnp.zeros((3, 3, 2, 2)).at[1, 1].set(jnp.eye(2))
  params = {'conv': {'kernel': centre, 'bias': jnp.zeros((2,))}}
  np.testing.assert_allclose(_Conv(stride=2).apply({'params': params}, x), x[:, ::2, ::2], atol=1e-6)
  np.testing.assert_allclose(_Conv(stride=1).apply({'params': params}, x), x, atol=1e-6)


# ---------------------------------------------------------------------------------------------------
# Config errors, raised before anything is traced.


@pytest.mark.parametrize('overrides, match', [
    (dict(num_head_channels=24), 'num_head_channels=24 does not divide the 64 channels'),
    (dict(num_head_channels=-1, num_heads=3), 'num_heads=3 does not divide'),
    (dict(num_head_channels=-1, num_heads=1, num_heads_upsample=3), 'num_heads_upsample=3'),
    (dict(num_head_channels=0), 'positive integer or -1'),
    (dict(num_heads=0), 'num_heads must be an integer >= 1'),
    (dict(attn_resolutions=(4,)), 'never reaches'),
    (dict(ch_mult=(1, 2, 2, 2, 2, 2)), 'divisible by 2\\*\\*5'),
    (dict(nf=48), '32 groups'),
    (dict(use_scale_shift_norm='yes'), 'use_scale_shift_norm must be True or False'),
    (dict(resblock_updown=1), 'resblock_updown must be True or False'),
    (dict(dropout=1.0), 'dropout'),
    (dict(dtype='float16'), 'dtype'),
    (dict(num_classes=-1), 'num_classes'),
])
def test_bad_configs_raise_config_error(overrides, match):
  # Not type-safe, to reach our checks with values a type-safe ConfigDict would refuse itself.
  config = ml_collections.ConfigDict(_small_config().to_dict(), type_safe=False)
  config.update(overrides)
  with pytest.raises(ConfigError, match=match):
    get_network(config, 16, 3)


def test_missing_adm_field_raises_config_error():
  config = _small_config()
  del config['num_head_channels']
  with pytest.raises(ConfigError, match='num_head_channels is missing'):
    get_network(config, 16, 3)
  # NCSN++ needs none of the ADM fields.
  ncsnpp = default.get_config().model
  for key in ('num_heads', 'num_head_channels', 'num_heads_upsample', 'use_scale_shift_norm',
              'resblock_updown', 'use_new_attention_order'):
    del ncsnpp[key]
  get_network(ncsnpp, 8, 1)

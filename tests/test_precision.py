"""The mixed-precision policy of config.model.dtype='bfloat16' (configs/default.py, README "Benchmarks").

bfloat16: the convolutions, dense layers and activations of the network body. float32: parameters,
optimizer state, EMA copies and target network; the noise embedding (features and MLP); group-norm
statistics; the preconditioning; the network output and the loss. LPIPS's VGG stays float32 by
default (consistency.lpips_dtype), for the reason the last tests measure.

The dtype checks read traced programs (jax.make_jaxpr, jax.eval_shape), where every dtype is fixed,
so they compile nothing; the numeric ones run tiny networks. The jaxpr rules are also run where they
must fail (layers computing in bfloat16 where the policy says float32; NCSN++ before this policy
failed them too, its embedding MLP and output head in bfloat16), and the numeric bounds have a floor
that float32 compute would fall under, so no check passes by looking at nothing.
"""

import importlib

import flax.linen as nn
import jax
import jax.extend.core
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from cm_jax import checkpointing, consistency, experiment, karras, trainer
from cm_jax.errors import ConfigError
from cm_jax.evaluation import lpips
from cm_jax.methods import consistency_model
from cm_jax.models import Preconditioned
from cm_jax.networks import get_network
from configs import default, digits_edm
from tests import network_checks, tiny

BF16 = jnp.dtype(jnp.bfloat16)
F32 = jnp.dtype(jnp.float32)
# What normalisation statistics are made of: reductions (jnp's sums and means of bfloat16 already
# accumulate in float32, but not what they return), the squares they reduce and the square roots of
# the results. In bfloat16 any of them rounds a statistic; none of them should see a bfloat16 value.
_STATISTICS = ('reduce_sum', 'reduce_max', 'reduce_min', 'square', 'integer_pow', 'sqrt', 'rsqrt')


# --------------------------------------------------------------------------------------------------
# Reading a jaxpr.
# --------------------------------------------------------------------------------------------------
def _equations(jaxpr: jax.extend.core.Jaxpr) -> list:
  """Every equation of `jaxpr`, those of nested jaxprs (pjit, custom_jvp, ...) included."""
  found = []
  for eqn in jaxpr.eqns:
    found.append(eqn)
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      found.extend(_equations(sub))
  return found


def _dtypes(eqn) -> set:
  return {jnp.dtype(v.aval.dtype) for v in eqn.invars if hasattr(v.aval, 'dtype')}


def _report(fn, *args) -> dict:
  """Where `fn(*args)` computes in what: the input dtypes of its convolutions (in program order) and
  the equations that break the float32 rules of the policy."""
  eqns = _equations(jax.make_jaxpr(fn)(*args).jaxpr)
  named = lambda *names: [e for e in eqns if e.primitive.name in names]
  return {
      'convs': [_dtypes(e) for e in named('conv_general_dilated')],
      'low_statistics': [e for e in named(*_STATISTICS) if _dtypes(e) != {F32}],
      # The noise embedding: its sin/cos features and its [B, features] dense layers (the body's
      # dense layers act on [B, H, W, C] or [B, HW, C] arrays).
      'low_trig': [e for e in named('sin', 'cos') if _dtypes(e) != {F32}],
      'low_embedding_dots': [e for e in named('dot_general')
                             if e.invars[0].aval.ndim == 2 and _dtypes(e) != {F32}],
      'any_bf16': any(BF16 in _dtypes(e) for e in eqns),
  }


def _model_config(name: str, dtype: str) -> ml_collections.ConfigDict:
  """Tiny versions of the networks that take config.model.dtype, each with attention."""
  config = tiny.shrink(digits_edm.get_config(), '').model
  if name == 'ncsnpp_scm':  # sCM's: positional embedding, adaptive double normalisation.
    config.update(dict(embedding_type='positional', adaptive_double_norm=True))
  elif name == 'adm':
    config.update(dict(name='adm', nf=32, attn_resolutions=(8,), num_head_channels=16))
  elif name == 'edm2':
    config.update(dict(name='edm2', nf=8, ch_mult=(1, 1), attn_resolutions=(4,), num_head_channels=4))
  config.dtype = dtype
  return config


def _network_report(name: str, dtype: str) -> dict:
  net = get_network(_model_config(name, dtype), 8, 1)
  x, c_noise = jnp.zeros((2, 8, 8, 1)), jnp.zeros((2,))
  params = jax.eval_shape(net.init, jax.random.PRNGKey(0), x, c_noise)['params']
  report = _report(lambda p: net.apply({'params': p}, x, c_noise), params)
  report['output'] = jax.eval_shape(lambda p: net.apply({'params': p}, x, c_noise), params).dtype
  report['params'] = {leaf.dtype for leaf in jax.tree.leaves(params)}
  return report


# --------------------------------------------------------------------------------------------------
# (c) The network: bfloat16 body; float32 embedding, statistics and output.
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('name', ['ncsnpp', 'ncsnpp_scm', 'adm', 'edm2'])
def test_bfloat16_network_computes_its_body_in_bfloat16_and_the_rest_in_float32(name):
  report = _network_report(name, 'bfloat16')
  *body, head = report['convs']
  # Every convolution of the body in bfloat16 (both operands), the output head's in float32.
  assert len(body) >= 4 and all(dtypes == {BF16} for dtypes in body), report['convs']
  assert head == {F32}
  assert report['output'] == F32 and report['params'] == {F32}
  assert not report['low_statistics'], report['low_statistics']
  assert not report['low_trig'] and not report['low_embedding_dots']


@pytest.mark.parametrize('name', ['ncsnpp', 'adm', 'edm2'])
def test_float32_network_has_no_bfloat16_at_all(name):
  """The switch is what changes the compute: without it, no bfloat16 value anywhere."""
  report = _network_report(name, 'float32')
  assert not report['any_bf16'] and all(dtypes == {F32} for dtypes in report['convs'])


def test_the_report_catches_what_the_policy_forbids():
  """The rules above fail on the layers they guard against: norm statistics in bfloat16, an embedding
  dense layer or sin/cos features computed in bfloat16."""
  h = jnp.zeros((2, 4, 4, 8), jnp.bfloat16)
  norm = nn.GroupNorm(num_groups=2, dtype=jnp.bfloat16, force_float32_reductions=False)
  params = norm.init(jax.random.PRNGKey(0), h)
  assert _report(norm.apply, params, h)['low_statistics']
  # Flax's default (what cm_jax's group_norm uses) computes them in float32 though x is bfloat16.
  flax_default = nn.GroupNorm(num_groups=2, dtype=jnp.bfloat16)
  assert not _report(flax_default.apply, params, h)['low_statistics']
  emb = jnp.zeros((2, 32))
  dense = nn.Dense(8, dtype=jnp.bfloat16)
  assert _report(dense.apply, dense.init(jax.random.PRNGKey(0), emb), emb)['low_embedding_dots']
  assert _report(lambda t: jnp.sin(t.astype(jnp.bfloat16)), emb)['low_trig']


# --------------------------------------------------------------------------------------------------
# (d) The preconditioned denoiser.
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def denoisers():
  """The tiny NCSN++ as EDM denoisers in both dtypes, at one generic (perturbed) parameter point: at
  init (init_scale = 0) the network outputs ~0 and D = c_skip x would agree in any dtype."""
  models = {}
  for dtype in ('float32', 'bfloat16'):
    config = tiny.shrink(digits_edm.get_config(), '')
    config.model.dtype = dtype
    models[dtype] = Preconditioned(get_network(config.model, 8, 1), config.noise)
  params = jax.jit(lambda key: models['float32'].init(key, (8, 8, 1)))(network_checks.fast_key(0))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda p: p + 0.1 * rng.normal(size=p.shape).astype(np.float32), params)
  # 8 noise levels from sigma_min to sigma_max, 8 images each.
  sigma = jnp.asarray(np.repeat(np.geomspace(0.002, 80.0, 8), 8), jnp.float32)
  x0 = rng.uniform(-1, 1, (64, 8, 8, 1))
  x = jnp.asarray(x0 + np.asarray(sigma)[:, None, None, None] * rng.normal(size=x0.shape), jnp.float32)
  return models, params, x, sigma


def test_denoiser_output_is_float32_and_close_to_the_float32_model(denoisers):
  models, params, x, sigma = denoisers
  d32 = np.asarray(jax.jit(models['float32'].denoise)(params, x, sigma))
  d16 = jax.jit(models['bfloat16'].denoise)(params, x, sigma)
  assert d16.dtype == jnp.float32
  d16 = np.asarray(d16)
  c_skip, _, _ = karras.edm_scalings(sigma, 0.5)
  network_part = d32 - np.asarray(karras.bcast(c_skip, x) * x)  # c_out F of the float32 model.
  per_level = lambda a: np.linalg.norm(a.reshape(8, -1), axis=1)
  relative = per_level(d16 - d32) / per_level(network_part)
  # bfloat16 keeps 8 significant bits: each rounding is off by up to 2^-9 = 2e-3 relative, and the
  # ~10 rounded layers of this network, at a perturbed parameter point, accumulate that to 1.1-1.2e-2
  # of c_out F at every level (measured). The bound leaves 2.5x; below 1e-3 the body would not be
  # rounding at all.
  assert np.all((1e-3 < relative) & (relative < 3e-2)), relative
  # At sigma_min, D is nearly x (c_skip -> 1): x stays float32 around the network, so D is off by
  # ~1.5e-5 relative (measured), where rounding x itself to bfloat16 costs ~1e-3 (checked here).
  low = slice(0, 8)
  error_at_low = np.linalg.norm(d16[low] - d32[low]) / np.linalg.norm(d32[low])
  rounded_x = x[low].astype(jnp.bfloat16).astype(jnp.float32)
  rounding_x = np.linalg.norm(rounded_x - x[low]) / np.linalg.norm(x[low])
  assert error_at_low < 1e-4 and rounding_x > 5e-4, (error_at_low, rounding_x)


def test_consistency_function_keeps_its_boundary_exactly_in_bfloat16(denoisers):
  models, params, x, _ = denoisers
  sigma_min = jnp.full((8,), 0.002)
  f = jax.jit(models['bfloat16'].consistency)(params, x[:8], sigma_min)
  assert f.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(f), np.asarray(x[:8]))  # f(x, eps) = x, bit for bit.


# --------------------------------------------------------------------------------------------------
# (a, b) A train step of every method: float32 state and loss.
# --------------------------------------------------------------------------------------------------
def _bfloat16_run(method: str):
  config = tiny.shrink(importlib.import_module(f'configs.digits_{method}').get_config(), '')
  config.model.dtype = 'bfloat16'
  config.training.batch_size = 4
  exp = experiment.build(config, '')
  batch = {'image': jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (4, 8, 8, 1)), jnp.float32),
           'label': jnp.arange(4, dtype=jnp.int32)}
  return exp, batch


def _float_dtypes(tree) -> set:
  return {jnp.dtype(leaf.dtype) for leaf in jax.tree.leaves(tree)
          if jnp.issubdtype(leaf.dtype, jnp.floating)}


@pytest.mark.parametrize('method', ['edm', 'cd', 'ct', 'ect', 'sct'])
def test_a_bfloat16_train_step_keeps_every_state_leaf_and_the_loss_float32(method):
  """Dtypes of the state after one step, read off the traced step (jax.eval_shape): params, optimizer
  state, EMA copies and the method's extras (CD/CT's target, sCT's adaptive weight)."""
  exp, batch = _bfloat16_run(method)
  state = exp.abstract_state
  exp.resources.provide(teacher_params=checkpointing.with_shardings(state.params,
                                                                    exp.state_shardings.params))
  frozen = exp.load_frozen()
  step = trainer.make_train_step(exp, trainer.frozen_shardings_of(frozen))
  new, metrics = jax.eval_shape(step, state, frozen, batch, jax.ShapeDtypeStruct((), jnp.int32))
  assert set(new.extra) == {'cd': {'target_params'}, 'ct': {'target_params'},
                            'sct': {'adaptive_weight'}}.get(method, set())
  for name, tree in new.items().items():
    assert _float_dtypes(tree) == ({F32} if jax.tree.leaves(tree) else set()), name
  assert metrics['loss'].shape == () and metrics['loss'].dtype == jnp.float32
  # The state it started from, too (a bfloat16 param would survive the step's float32 promotion).
  assert _float_dtypes(state.items()) == {F32}


def test_a_bfloat16_train_step_runs_to_a_finite_float32_loss():
  """One real CD step (compiled; 20 s on 2 cores): the online, target and teacher networks and the
  teacher's Heun step in bfloat16. (The EDM step: tests/test_distributed.py trains it in bfloat16.)"""
  exp, batch = _bfloat16_run('cd')
  state = jax.jit(exp.init_state_fn())(jax.random.PRNGKey(0))
  exp.resources.provide(teacher_params=jax.tree.map(jnp.copy, state.params))  # The step donates state.
  frozen = exp.load_frozen()
  step = trainer.make_train_step(exp, trainer.frozen_shardings_of(frozen))
  new, metrics = step(state, frozen, batch, jnp.asarray(0, jnp.int32))
  assert metrics['loss'].dtype == jnp.float32 and bool(metrics['finite'])
  assert np.isfinite(float(metrics['loss'])) and float(metrics['loss']) > 0
  assert _float_dtypes(new.items()) == {F32}


# --------------------------------------------------------------------------------------------------
# LPIPS: bfloat16 would change the consistency loss, so it stays float32.
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def lpips_pairs():
  rng = np.random.default_rng(0)
  x = rng.uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
  independent = rng.uniform(-1, 1, x.shape).astype(np.float32)
  close = np.clip(x + 0.01 * rng.normal(size=x.shape), -1, 1).astype(np.float32)
  params = lpips.random_lpips_params(0)
  distance = lambda y, dtype: np.asarray(lpips.lpips_distance(params, x, y, dtype=dtype))
  return independent, close, distance


def test_lpips_in_bfloat16_is_close_for_independent_images(lpips_pairs):
  """32x32 pairs upsampled to 224, as the CIFAR-10 loss: bfloat16's trunk moves the distance of two
  independent images by 2-4e-4 relative (measured over 3 seeds and both poolings; each feature is
  off by ~2^-9, and the distance averages millions of them). The bound leaves 3x; below 1e-6 the
  trunk would not be computing in bfloat16."""
  independent, _, distance = lpips_pairs
  d32, d16 = distance(independent, jnp.float32), distance(independent, jnp.bfloat16)
  relative = np.abs(d16 - d32) / d32
  assert d16.dtype == np.float32 and np.all((1e-6 < relative) & (relative < 1e-3)), relative


def test_lpips_in_bfloat16_is_off_for_close_images_hence_float32_by_default(lpips_pairs):
  """Images 0.01 apart (per pixel, the order of adjacent consistency outputs): bfloat16 rounds the
  two nearly equal feature maps before they are subtracted, and the distance moves by 6-11%
  (measured; 5-9x at 0.001). That is why consistency.lpips_dtype is float32 in every config."""
  _, close, distance = lpips_pairs
  d32, d16 = distance(close, jnp.float32), distance(close, jnp.bfloat16)
  assert np.all(np.abs(d16 - d32) / d32 > 0.02), (d16, d32)
  cons = default.get_config().consistency
  assert cons.lpips_dtype == 'float32'
  cons.distance, cons.lpips_dtype = 'lpips', 'float16'
  with pytest.raises(ConfigError, match="consistency.lpips_dtype='float16' is not one of"):
    consistency.make_distance(cons, (8, 8, 3), consistency_model.WEIGHTED_DISTANCES)

"""sCM (sCT, sCD) in TrigFlow against closed forms: the EDM <-> TrigFlow identity, the JVP against
finite differences through NCSN++ and ADM, a zero gradient at the exact Gaussian consistency function,
a small model distilled to the exact ODE end point, what each stabiliser changes, and the methods end
to end on tiny digits runs."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from cm_jax import experiment, trigflow
from cm_jax.errors import ConfigError
from cm_jax.models import Preconditioned
from cm_jax.modes import train as train_mode
from cm_jax.networks import get_network
from cm_jax.networks.adaptive_weight import AdaptiveWeight
from configs import default, digits_edm, digits_scd, digits_sct
from tests import gaussian, tiny

SD = 0.5
MU, S0 = 0.3, 0.2  # Gaussian pixels: digits-like mean and spread (s0 != sd, so F depends on x).


def _fast_key(seed):
  return jax.random.key(seed, impl='unsafe_rbg')  # Compiles in seconds on XLA:CPU (see network_checks).


_UNOPTIMISED = {'xla_backend_optimization_level': 0}


def _compiled(fn, *args):
  """fn jitted for args like these and compiled without XLA's backend optimisations: these tiny
  graphs run in milliseconds, and an optimised compile (or op-by-op dispatch, which compiles every
  primitive apart) costs several times more than the run."""
  return jax.jit(fn).lower(*args).compile(compiler_options=_UNOPTIMISED)


def _run_once(fn, *args):
  return _compiled(fn, *args)(*args)


def _max_abs(tree) -> float:
  return max(float(jnp.max(jnp.abs(v))) for v in jax.tree.leaves(tree))


def _noise(**overrides) -> ml_collections.ConfigDict:
  noise = default.get_config().noise
  noise.update(overrides)
  return noise


def _random_params(init_fn, seed: int):
  """Params of the tree that init_fn() returns, drawn on the host, so no init is compiled: kernels
  N(0, 1 / fan_in), normalisation scales 1 + N(0, 0.1^2), biases N(0, 0.1^2), NCSN++'s Fourier
  frequencies N(0, 16^2) as it initialises them. No layer is zero (unlike a real init, whose zero
  output layers would hide paths through the network)."""
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    z = rng.standard_normal(leaf.shape).astype(np.float32)
    name = path[-1].key
    if leaf.ndim >= 2:
      return z / np.sqrt(np.prod(leaf.shape[:-1]))
    return {'W': 16.0 * z, 'scale': 1.0 + 0.1 * z}.get(name, 0.1 * z)
  return jax.tree_util.tree_map_with_path(draw, jax.eval_shape(init_fn))


def _init(model: Preconditioned, seed: int = 0):
  return _random_params(lambda: model.init(jax.random.PRNGKey(0), (8, 8, 1)), seed)


def _normal(seed: int, shape, scale: float = 1.0) -> np.ndarray:
  """Test inputs drawn by numpy: an eager jax.random draw compiles its own threefry kernel."""
  return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


def _tiny_model_config(name: str = 'ncsnpp') -> ml_collections.ConfigDict:
  """One resolution level, one residual block per stage, attention at 8x8: the smallest U-Net with
  every kind of layer the full networks have (convs, residual blocks, attention, the time
  embedding), so compiling it costs seconds."""
  m = default.get_config().model
  m.nf, m.ch_mult, m.num_res_blocks, m.attn_resolutions, m.init_scale = 8, (1,), 1, (8,), 1.0
  if name == 'adm':
    m.name, m.nf, m.num_heads = 'adm', 32, 2
  return m


def _network_model(name: str):
  """The tiny network with the paper's changes (c_noise = t, positional embedding, adaptive double
  normalisation) and dropout 0.3, with random params."""
  m = _tiny_model_config(name)
  m.embedding_type, m.adaptive_double_norm, m.dropout = 'positional', True, 0.3
  model = Preconditioned(get_network(m, 8, 1), _noise(time_conditioning='trigflow'))
  return model, _init(model, 1)


# --------------------------------------------------------------------------------------------------
# TrigFlow and EDM.
# --------------------------------------------------------------------------------------------------
def test_gaussian_closed_forms_agree():
  """The exact Gaussian PF-ODE velocity, consistency function and E[x0 | x_t] agree: the velocity is
  the EDM posterior mean read as TrigFlow (App. B.2), and f is constant along the ODE, so the tests'
  references are one model."""
  x = jnp.linspace(-1.5, 1.5, 7).reshape(7, 1, 1, 1)
  t = jnp.linspace(0.05, 1.55, 7)
  velocity = gaussian.trigflow_velocity(MU, S0, SD)(x, t)
  f_fn = gaussian.trigflow_consistency(MU, S0, SD)
  f = f_fn(x, t)
  cm_velocity = gaussian.trigflow_consistency_velocity(MU, S0, SD)(x, t)
  np.testing.assert_allclose(trigflow.consistency(x, t, cm_velocity, SD), f, rtol=1e-5, atol=1e-6)
  # df/dt along dx/dt = sd F is zero (the consistency property), by a JVP of the closed form.
  _, df_dt = jax.jvp(f_fn, (x, t), (SD * velocity, jnp.ones_like(t)))
  np.testing.assert_allclose(df_dt, 0.0, atol=1e-5)
  # The EDM denoiser of N(MU, S0^2) data is E[x0 | x_sigma]; as a TrigFlow F it is the exact PF-ODE.
  from_edm = trigflow.velocity_from_denoiser(gaussian.denoiser(MU, S0), x, t, SD)
  np.testing.assert_allclose(from_edm, velocity, rtol=1e-4, atol=1e-5)
  posterior = gaussian.trigflow_posterior_mean(MU, S0, SD)(x, t)
  np.testing.assert_allclose(gaussian.denoiser(MU, S0)(x / jnp.cos(t)[:, None, None, None],
                                                      SD * jnp.tan(t)), posterior, rtol=1e-5)


def test_an_edm_network_is_its_own_trigflow_model():
  """An EDM-preconditioned network (the digits teacher's kind) read as TrigFlow at t = arctan(sigma /
  sd), x_t = cos(t) x: f(x_t, t) equals D(x, sigma), and F equals the conversion of D (App. B.2)."""
  model = Preconditioned(get_network(_tiny_model_config(), 8, 1), _noise())
  params = _init(model)
  sigmas = jnp.array([0.002, 0.05, 0.5, 3.0, 80.0])
  x = _normal(1, (5, 8, 8, 1)) * jnp.sqrt(SD ** 2 + sigmas ** 2)[:, None, None, None]
  t = trigflow.time_from_sigma(sigmas, SD)
  x_t = jnp.cos(t)[:, None, None, None] * x

  def both_ways(params, x, x_t, sigmas, t):
    return (model.denoise(params, x, sigmas), model.trigflow_consistency(params, x_t, t),
            model.trigflow(params, x_t, t),
            trigflow.velocity_from_denoiser(model.denoiser_fn(params), x_t, t, SD))
  denoised, f, velocity, converted = _run_once(both_ways, params, x, x_t, sigmas, t)
  for i in range(5):
    scale = float(jnp.max(jnp.abs(denoised[i])))
    # t = arctan(sigma / sd) is rounded to float32 (1.2e-7 near pi/2), which moves c_noise =
    # ln(sd tan t) / 4 by 1.2e-7 / (4 sin t cos t), and Fourier features of scale 16 turn that into
    # a phase error of up to 2 pi 16 4 |dc_noise| (4 std of their frequencies): 2e-3 at sigma = 80.
    c, s = math.cos(float(t[i])), math.sin(float(t[i]))
    phase = 2 * math.pi * 16 * 4 * 1.2e-7 / (4 * s * c)
    np.testing.assert_allclose(f[i], denoised[i], atol=scale * (1e-5 + phase))
    # The conversion divides by sd sin(t): its float32 rounding grows as 1 / sin(t) at small sigma.
    np.testing.assert_allclose(velocity[i], converted[i],
                               atol=(2e-6 / s + phase) * scale / SD + 1e-5)


def test_trigflow_time_conditioning_is_arctan_of_sigma():
  model = Preconditioned(None, _noise(time_conditioning='trigflow', noise_cond_scale=2.0))
  sigma = jnp.array([0.002, 0.5, 80.0])
  np.testing.assert_allclose(model.c_noise(sigma), 2.0 * np.arctan(np.asarray(sigma) / SD), rtol=1e-6)
  edm = Preconditioned(None, _noise())
  np.testing.assert_allclose(edm.c_noise(sigma), np.log(np.asarray(sigma)) / 4, rtol=1e-6)


# --------------------------------------------------------------------------------------------------
# The JVP through the networks.
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('name', ['ncsnpp', 'adm'])
def test_jvp_tangent_equals_central_difference(name):
  """jax.jvp of F through the whole network (attention, and dropout with a fixed key) along sCM's
  rearranged tangent (cos t sin t dx/dt, cos t sin t) equals a central difference along it.

  Tolerance: the central difference's truncation error is h^2 |F^(3)| / 6 and its float32 rounding
  about eps |F| / h (eps ~ 1e-7 per value, a few ulps through the network). Measured on these
  networks (four draws of the params), the RMS difference relative to the tangent is 5-6e-4 at
  h = 3e-2 (truncation), 1.0-1.6e-4 at h = 1e-2, and 1.2-1.3e-3 at h = 1e-3 (rounding); we allow
  1e-3 at h = 1e-2, where a wrong tangent (a missing factor, sign or term) is O(1) off.
  """
  model, params = _network_model(name)
  x_t = _normal(4, (3, 8, 8, 1), SD)
  t = jnp.array([0.1, 0.8, 1.4])
  dxdt = _normal(5, x_t.shape, SD)
  h = 1e-2

  def tangent_and_difference(params, x_t, t, dxdt, key):
    fn = lambda x, tt: model.trigflow(params, x, tt, train=True, rng=key)
    cs = jnp.cos(t) * jnp.sin(t)
    v_x, v_t = cs[:, None, None, None] * dxdt, cs
    velocity, tangent = trigflow.velocity_and_tangent(fn, x_t, t, dxdt)
    difference = (fn(x_t + h * v_x, t + h * v_t) - fn(x_t - h * v_x, t - h * v_t)) / (2 * h)
    return velocity, tangent, difference

  compiled = jax.jit(tangent_and_difference).lower(params, x_t, t, dxdt, _fast_key(3)).compile(
      compiler_options=_UNOPTIMISED)
  velocity, tangent, difference = compiled(params, x_t, t, dxdt, _fast_key(3))
  rel = float(jnp.linalg.norm(tangent - difference) / jnp.linalg.norm(tangent))
  assert rel < 1e-3, rel
  # The tangent is not small (the check could not pass on zeros) and dropout is on: another key's
  # masks give another tangent.
  assert float(jnp.linalg.norm(tangent)) > 1e-2 * float(jnp.linalg.norm(velocity))
  _, other_tangent, _ = compiled(params, x_t, t, dxdt, _fast_key(4))
  assert float(jnp.linalg.norm(other_tangent - tangent) / jnp.linalg.norm(tangent)) > 1e-2


# --------------------------------------------------------------------------------------------------
# The objective at the exact Gaussian consistency function.
# --------------------------------------------------------------------------------------------------
def _gaussian_loss(**overrides):
  fields = dict(sigma_data=SD, sigma_min=0.002, sigma_max=80.0, p_mean=-1.0, p_std=1.4,
                warmup_steps=0, tangent_norm='rms', tangent_norm_const=0.1)
  fields.update(overrides)
  return trigflow.ScmLoss(**fields)


def _gaussian_velocity(params, x, t):
  """The F of the exact Gaussian consistency function at params (mu, s0)."""
  return gaussian.trigflow_consistency_velocity(params['mu'], params['s0'], SD)(x, t)


EXACT = {'mu': jnp.float32(MU), 's0': jnp.float32(S0)}
WRONG = {'mu': jnp.float32(MU + 0.05), 's0': jnp.float32(S0 * 1.2)}


@pytest.mark.parametrize('norm', ['rms', 'l2', 'clip', 'none'])
def test_exact_consistency_function_gives_zero_scd_gradient(norm):
  """F of the exact Gaussian PF-ODE, distilled from the exact teacher: the tangent g = cos(t) df/dt
  vanishes along the ODE, so the gradient is zero up to float error, under every normalisation and
  with the adaptive weighting; at other params it is not."""
  loss_fn = _gaussian_loss(tangent_norm=norm)
  teacher = lambda x, t: SD * gaussian.trigflow_velocity(MU, S0, SD)(x, t)
  x0 = MU + _normal(0, (512, 2, 2, 1), S0)
  log_weight = lambda t: 0.3 * jnp.cos(3 * t)
  grad = _compiled(jax.grad(lambda p: loss_fn(_gaussian_velocity, p, x0, _fast_key(1), 0, teacher,
                                              log_weight)[0]), EXACT)
  at_exact, at_wrong = _max_abs(grad(EXACT)), _max_abs(grad(WRONG))
  assert at_exact < 2e-5, at_exact
  assert at_wrong > 1e-2, at_wrong


def test_exact_consistency_function_gives_zero_expected_sct_gradient():
  """sCT's dx/dt = cos(t) z - sin(t) x0 is the PF-ODE only on average given x_t; g is linear in it,
  so two pairs (x0, z) with the same x_t and t whose x0 lie symmetrically about E[x0 | x_t] average
  to the exact velocity, and their mean gradient at the exact F is zero up to float error (without
  tangent normalisation, which is not linear)."""
  loss_fn = _gaussian_loss(tangent_norm='none')
  n = 256

  def gradients(unit_noise, delta):
    t = trigflow.sample_times(_fast_key(0), n, -1.0, 1.4, SD, 0.002, 80.0)
    c, s = jnp.cos(t)[:, None, None, None], jnp.sin(t)[:, None, None, None]
    x_t = MU * c + jnp.sqrt(c ** 2 * S0 ** 2 + s ** 2 * SD ** 2) * unit_noise
    mean = gaussian.trigflow_posterior_mean(MU, S0, SD)(x_t, t)
    x0 = jnp.concatenate([mean + delta, mean - delta])
    tt, c2, s2 = jnp.concatenate([t, t]), jnp.concatenate([c, c]), jnp.concatenate([s, s])
    z = (jnp.concatenate([x_t, x_t]) - c2 * x0) / s2
    grad = lambda p, x0, z, t: jax.grad(lambda q: jnp.mean(loss_fn.objective(
        _gaussian_velocity, q, x0, z, t, 0)[0]))(p)
    # And one pair alone, whose gradient is not zero: the zero is the average's, not the loss's.
    return grad(EXACT, x0, z, tt), grad(WRONG, x0, z, tt), grad(EXACT, x0[:n], z[:n], t)
  at_exact, at_wrong, single = map(_max_abs, _run_once(
      gradients, _normal(1, (n, 2, 2, 1)), _normal(2, (n, 2, 2, 1), 0.3)))
  assert at_exact < 1e-4, at_exact
  assert at_wrong > 1e-2, at_wrong
  assert single > 1e-2, single


class AffineVelocity(nn.Module):
  """F(x, t) = a(t) x + b(t), with a and b from a small MLP on features of t: the F of the exact
  Gaussian consistency function has this form, so what remains is optimisation."""

  @nn.compact
  def __call__(self, x, t):
    feats = jnp.stack([jnp.sin(t), jnp.cos(t), jnp.sin(2 * t), jnp.cos(2 * t), t], axis=-1)
    h = nn.silu(nn.Dense(32)(feats))
    h = nn.silu(nn.Dense(32)(h))
    a, b = jnp.split(nn.Dense(2)(h), 2, axis=-1)
    return a[:, :, None, None] * x + b[:, :, None, None]


def test_scd_trains_a_small_model_to_the_exact_ode_end_point():
  """sCD from the exact Gaussian teacher, every stabiliser on, trains a small model whose one step
  from t_max lands on the exact PF-ODE end point.

  Tolerance: sCD's fixed point is the exact consistency function (no discretisation, unlike CD's
  N-grid), so the error left is optimisation error: Adam's steps keep it at 10-30% of the data's std
  at a constant rate; a cosine decay to 0 over 4000 steps brings it to 0.4-3.4% over seven draws of
  the initial weights (1-8% over 2000 steps), alike at t = 0.3, 1.0, 1.4 and t_max. We allow 6%
  (mean absolute, in units of the data's std), where predicting the mean alone is 80% off, and so is
  a model that only matches velocities (the tangent's second term dropped).
  """
  model = AffineVelocity()
  head = AdaptiveWeight(SD, 16)
  x_shape = (256, 2, 2, 1)
  params = _run_once(lambda key: {
      'net': model.init(key, jnp.zeros((1, 2, 2, 1)), jnp.ones((1,))),
      'w': head.init(jax.random.fold_in(key, 1), jnp.ones((1,)))['params']}, _fast_key(0))
  loss_fn = _gaussian_loss(warmup_steps=100)
  teacher = lambda x, t: SD * gaussian.trigflow_velocity(MU, S0, SD)(x, t)
  velocity = lambda p, x, t: model.apply(p, x, t)
  tx = optax.adam(optax.cosine_decay_schedule(3e-3, 4000))

  @jax.jit
  def train(params, opt_state, steps):
    def body(i, carry):
      params, opt_state = carry
      key = jax.random.fold_in(jax.random.PRNGKey(2), i)
      x0 = MU + S0 * jax.random.normal(jax.random.fold_in(key, 1), x_shape)
      loss = lambda p: loss_fn(velocity, p['net'], x0, key, i, teacher,
                               lambda t: head.apply({'params': p['w']}, t))[0]
      updates, opt_state = tx.update(jax.grad(loss)(params), opt_state)
      return optax.apply_updates(params, updates), opt_state
    return jax.lax.fori_loop(0, steps, body, (params, opt_state))

  t_max = trigflow.time_from_sigma(np.float32(80.0), SD)
  x = _normal(9, (1024, 2, 2, 1), SD)
  tt = jnp.full((1024,), t_max)

  def errors(p):
    """(one step's error, the mean's), mean absolute in units of the data's std."""
    exact = gaussian.trigflow_consistency(MU, S0, SD)(x, tt)
    one_step = trigflow.consistency(x, tt, velocity(p['net'], x, tt), SD)
    return jnp.mean(jnp.abs(one_step - exact)) / S0, jnp.mean(jnp.abs(MU - exact)) / S0
  error = _compiled(errors, params)
  before, mean_only = map(float, error(params))
  params, _ = train(params, tx.init(params), 4000)
  after = float(error(params)[0])
  assert mean_only > 0.7 and before > 0.7, (mean_only, before)
  assert after < 0.06, after


def test_fused_jvp_gives_the_gradient_of_a_separate_forward_and_jvp():
  """The forward that carries the gradient is the JVP's primal (one network pass less): the same
  loss and gradient as a separate forward plus a JVP at stopgrad(params)."""
  loss_fn = _gaussian_loss(warmup_steps=10)
  x0 = MU + _normal(0, (64, 2, 2, 1), S0)

  def loss(params, separate):
    tangent_fn = None
    if separate:
      tangent_fn = lambda x, t: _gaussian_velocity(jax.lax.stop_gradient(params), x, t)
    return loss_fn(_gaussian_velocity, params, x0, _fast_key(3), 5, None, None, tangent_fn)[0]
  fused, separate = _run_once(lambda p: [jax.value_and_grad(loss)(p, s) for s in (False, True)],
                              WRONG)
  assert float(fused[0]) == pytest.approx(float(separate[0]), rel=1e-6)
  for a, b in zip(jax.tree.leaves(fused[1]), jax.tree.leaves(separate[1])):
    assert float(a) == pytest.approx(float(b), rel=1e-5)


# --------------------------------------------------------------------------------------------------
# What each stabiliser changes.
# --------------------------------------------------------------------------------------------------
def _tangent_inputs(batch=4):
  x_t, velocity, velocity_tangent, dxdt = (_normal(i, (batch, 4, 4, 1)) for i in range(4))
  t = np.random.default_rng(4).uniform(0.1, 1.5, batch).astype(np.float32)
  return velocity, velocity_tangent, x_t, dxdt, t


def test_tangent_warmup_scales_only_the_second_term():
  args = _tangent_inputs()
  velocity, velocity_tangent, x_t, dxdt, t = args
  first = trigflow.tangent(*args, SD, jnp.float32(0.0))
  c = jnp.cos(t)[:, None, None, None]
  np.testing.assert_allclose(first, -c ** 2 * (SD * velocity - dxdt), rtol=1e-6)
  full = trigflow.tangent(*args, SD, jnp.float32(1.0))
  half = trigflow.tangent(*args, SD, jnp.float32(0.5))
  np.testing.assert_allclose(half, 0.5 * (first + full), rtol=1e-5, atol=1e-6)
  assert [float(trigflow.warmup_ratio(s, 1000)) for s in (0, 250, 1000, 5000)] == [0, 0.25, 1, 1]
  assert float(trigflow.warmup_ratio(0, 0)) == 1.0  # H = 0: no warm-up.


def test_tangent_normalisations():
  g = _normal(0, (4, 8, 8, 1), 3.0)
  g[0] *= 1e-3  # A small tangent is left nearly alone by c, a large one normalised.
  rms = jnp.sqrt(jnp.mean(g.reshape(4, -1) ** 2, axis=1))
  l2 = jnp.sqrt(jnp.sum(g.reshape(4, -1) ** 2, axis=1))
  out = trigflow.normalise_tangent(g, 'rms', 0.1)
  np.testing.assert_allclose(jnp.sqrt(jnp.mean(out.reshape(4, -1) ** 2, axis=1)), rms / (rms + 0.1),
                             rtol=1e-5)
  out = trigflow.normalise_tangent(g, 'l2', 0.1)
  np.testing.assert_allclose(jnp.sqrt(jnp.sum(out.reshape(4, -1) ** 2, axis=1)), l2 / (l2 + 0.1),
                             rtol=1e-5)
  out = trigflow.normalise_tangent(g, 'clip', 0.1)
  assert float(jnp.max(jnp.abs(out))) == 1.0 and np.array_equal(out[0], g[0])
  assert np.array_equal(trigflow.normalise_tangent(g, 'none', 0.1), g)
  with pytest.raises(ConfigError, match="scm.tangent_norm='unit'"):
    trigflow.normalise_tangent(g, 'unit', 0.1)


def test_adaptive_and_prior_weighting():
  """With w(t), each example's loss is e^w mse - w, minimised in w at e^-w = mse (so every t gives
  gradients of one size); the prior weighting multiplies mse by 1 / (sd tan t)."""
  x0 = MU + _normal(0, (8, 2, 2, 1), S0)
  z = _normal(1, x0.shape, SD)
  t = np.linspace(0.1, 1.5, 8, dtype=np.float32)
  plain, prior = (_gaussian_loss(tangent_norm='none', prior_weighting=p) for p in (False, True))

  def losses(x0, z, t):
    mse, _ = plain.objective(_gaussian_velocity, WRONG, x0, z, t, 0)  # Per example, unweighted.
    w = jnp.log(0.5 / mse)
    weighted, aux = plain.objective(_gaussian_velocity, WRONG, x0, z, t, 0, None, lambda tt: w)
    # d/dw (e^w mse - w) = e^w mse - 1: zero at the optimum w* = -ln mse.
    dw = jax.grad(lambda ww: jnp.sum(plain.objective(_gaussian_velocity, WRONG, x0, z, t, 0, None,
                                                     lambda tt: ww)[0]))
    return (mse, prior.objective(_gaussian_velocity, WRONG, x0, z, t, 0)[0], w, weighted,
            aux['log_weight'], dw(w), dw(-jnp.log(mse)))
  mse, prior_weighted, w, weighted, log_weight, dw_half, dw_optimum = _run_once(losses, x0, z, t)
  np.testing.assert_allclose(prior_weighted, mse / (SD * np.tan(t)), rtol=1e-5)
  np.testing.assert_allclose(weighted, 0.5 - w, rtol=1e-5)
  assert float(log_weight) == pytest.approx(float(jnp.mean(w)), rel=1e-5)
  np.testing.assert_allclose(dw_half, -0.5 * np.ones(8), rtol=1e-4)
  np.testing.assert_allclose(dw_optimum, np.zeros(8), atol=1e-5)


def test_adaptive_weight_head_starts_at_zero_and_trains():
  head = AdaptiveWeight(SD, 128)
  t = jnp.linspace(0.01, 1.56, 16)
  params = _run_once(lambda t: head.init(_fast_key(0), t)['params'], t)
  weight, grads = _run_once(lambda p: (head.apply({'params': p}, t), jax.grad(
      lambda q: jnp.sum(head.apply({'params': q}, t) * t))(p)), params)
  assert np.array_equal(weight, np.zeros(16))
  assert float(jnp.linalg.norm(grads['Dense_0']['kernel'])) > 0
  assert not np.any(grads['GaussianFourierProjection_0']['W'])  # The frequencies stay fixed.


def test_trigflow_time_conditioning_keeps_the_time_tangent_bounded():
  """sin(t) dc_noise/dt: 1 / (4 cos t) with EDM's ln(sd tan t) / 4, unbounded as t -> pi/2 (Sec. 4.1);
  sin(t) <= 1 with TrigFlow's c_noise = t."""
  t = jnp.array([0.5, 1.2, 1.5645])
  for kind, expected in (('log_sigma', 0.25 / jnp.cos(t)), ('trigflow', jnp.sin(t))):
    dc = jax.vmap(jax.grad(lambda tt: trigflow.c_noise_of_time(tt, kind, SD)))(t)
    np.testing.assert_allclose(jnp.sin(t) * dc, expected, rtol=1e-3)
  assert float(0.25 / jnp.cos(t[-1])) > 35


@pytest.mark.parametrize('name', ['ncsnpp', 'adm'])
def test_adaptive_double_norm_makes_the_embedding_scale_irrelevant(name):
  """Adaptive double normalisation pixel-normalises the scale and shift, so scaling their projection
  changes nothing; with NCSN++'s added bias (or ADM's 1 + scale, shift) it changes the output."""
  m = _tiny_model_config(name)
  m.attn_resolutions = ()
  x = _normal(0, (2, 8, 8, 1))
  c_noise = jnp.array([0.3, 1.2])
  projection = 'emb_proj' if name == 'adm' else 'Dense_0'
  is_block = lambda name: 'Resnet' in name or '_res' in name
  outputs = {}
  for adn in (False, True):
    m.adaptive_double_norm = adn
    net = get_network(m, 8, 1)
    params = _random_params(lambda: net.init({'params': jax.random.PRNGKey(0)}, x, c_noise)[
        'params'], 2)
    blocks = [k for k in params if is_block(k)]
    assert blocks and all(projection in params[k] for k in blocks)
    # Every residual block's embedding projection (kernel and bias) times 10.
    scaled = {k: ({**v, projection: jax.tree.map(lambda w: 10.0 * w, v[projection])}
                  if is_block(k) else v) for k, v in params.items()}
    apply = jax.jit(lambda p: net.apply({'params': p}, x, c_noise)).lower(params).compile(
        compiler_options=_UNOPTIMISED)
    outputs[adn] = float(jnp.max(jnp.abs(apply(params) - apply(scaled))))
  assert outputs[True] < 1e-4, outputs
  assert outputs[False] > 1e-2, outputs
  m.use_scale_shift_norm = False
  if name == 'adm':
    with pytest.raises(ConfigError, match='use_scale_shift_norm=True'):
      get_network(m, 8, 1)


def test_network_defaults_are_unchanged_by_the_options():
  """The new fields at their defaults leave the parameter tree (and so every checkpoint) as it was."""
  m = default.get_config().model
  assert m.adaptive_double_norm is False and default.get_config().noise.time_conditioning == 'log_sigma'
  x, c_noise = jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,))
  del m['adaptive_double_norm']  # A model config from before the field.
  shapes = lambda net: jax.tree.map(lambda v: v.shape, jax.eval_shape(
      lambda: net.init({'params': jax.random.PRNGKey(0)}, x, c_noise))['params'])
  before = shapes(get_network(m, 8, 1))
  m.adaptive_double_norm = False
  assert shapes(get_network(m, 8, 1)) == before


# --------------------------------------------------------------------------------------------------
# Configs and the methods end to end.
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('field, value, match', [
    ('scm.tangent_norm', 'unit', "scm.tangent_norm='unit'"),
    ('scm.jvp_dtype', 'float16', "scm.jvp_dtype='float16'"),
    ('scm.guidance_scale', 2.0, 'unconditional mode'),
    ('scm.multistep_times', (1.1, 1.3), 'must decrease'),
    ('scm.p_std', 0.0, 'scm.p_std'),
    ('noise.time_conditioning', 'log_t', "noise.time_conditioning='log_t'"),
])
def test_bad_scm_settings_are_config_errors(field, value, match):
  config = digits_sct.get_config()
  section, key = field.split('.')
  config[section][key] = value
  with pytest.raises(ConfigError, match=match):
    experiment.build(config, '/nonexistent')


def test_sampling_times_and_the_editing_function():
  config = tiny.shrink(digits_scd.get_config(), '')
  config.model.attn_resolutions = ()
  exp = experiment.build(config, '/nonexistent')
  t_max = math.atan(80.0 / SD)
  assert exp.method.multistep_times() == pytest.approx([t_max, 1.1])
  assert exp.method.sampler('onestep').nfe == 1 and exp.method.sampler('multistep').nfe == 2
  config.sampling.sigmas = (80.0, 0.8)
  exp = experiment.build(config, '/nonexistent')
  assert exp.method.multistep_times() == pytest.approx([t_max, math.atan(1.6)])
  # The editors' f(x, sigma) in EDM units is the EDM denoiser of the same network.
  params = _init(exp.model, 0)
  x = _normal(1, (2, 8, 8, 1))
  sigma = jnp.array([0.3, 5.0])
  edited, denoised = _run_once(lambda p, x, s: (exp.method.edit_consistency_fn(p, None)(x, s),
                                                exp.model.denoise(p, x, s)), params, x, sigma)
  np.testing.assert_allclose(edited, denoised, rtol=1e-4, atol=1e-5)


def _tiny(config, data_dir, steps):
  """tiny.shrink (one level, no attention: the JVP through attention is tested above) with a tangent
  warm-up that ends within the run."""
  config = tiny.shrink(config, data_dir, steps)
  if config.method in ('sct', 'scd'):
    config.scm.tangent_warmup_steps = 2
  return config


@pytest.mark.slow
def test_sct_trains_resumes_and_samples(tmp_path, digits_data_dir):
  config = _tiny(digits_sct.get_config(), digits_data_dir, 3)
  out = train_mode.run(config, str(tmp_path))
  assert np.isfinite([loss for _, loss in out.losses]).all()
  assert set(out.samples) == {'onestep', 'multistep'}
  assert (out.samples['onestep']['nfe'], out.samples['multistep']['nfe']) == (1, 2)
  weight = out.state.extra['adaptive_weight']
  assert float(jnp.abs(weight['Dense_0']['bias'])[0]) > 0  # Trained with the params.
  config.training.num_steps = 4
  resumed = tiny.train(config, str(tmp_path))
  assert [s for s, _ in resumed.losses] == [3]
  assert not np.array_equal(resumed.state.extra['adaptive_weight']['Dense_0']['bias'],
                            weight['Dense_0']['bias'])


@pytest.mark.slow
def test_scd_starts_from_the_teacher_and_distils_it(tmp_path, digits_data_dir):
  teacher_dir = str(tmp_path / 'teacher')
  tiny.train(_tiny(digits_edm.get_config(), digits_data_dir, 2), teacher_dir)
  config = _tiny(digits_scd.get_config(), digits_data_dir, 2)
  config.teacher.workdir, config.teacher.train_if_missing = teacher_dir, False
  start = tiny.train(_zero_steps(config), str(tmp_path / 's0'))
  teacher = start.frozen['teacher_params']
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(start.state.params),
                                                  jax.tree.leaves(teacher)))
  out = train_mode.run(config, str(tmp_path / 'scd'))
  assert np.isfinite([loss for _, loss in out.losses]).all()
  assert set(out.samples) == {'onestep', 'multistep', 'teacher_heun'}


def _zero_steps(config):
  config = ml_collections.ConfigDict(config.to_dict())
  config.training.num_steps = 0
  return config

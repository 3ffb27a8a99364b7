"""CD/CT losses, schedules and distances against closed forms (Gaussian data has exact answers)."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats
from scipy.special import erf

from cm_jax import consistency
from cm_jax.errors import ConfigError
from cm_jax.models import Preconditioned
from configs import default
from tests import gaussian


def cons_config(**overrides):
  config = default.get_config().consistency
  config.update(overrides)
  return config


def noise_config():
  return default.get_config().noise


# --------------------------------------------------------------------------------------------------
# Schedules.
# --------------------------------------------------------------------------------------------------
def test_ct_num_scales_hand_computed():
  n = lambda k: int(consistency.ct_num_scales(k, 1000, 2, 150))
  assert n(0) == 2  # ceil(sqrt(4) - 1) + 1
  assert n(1000) == 151  # ceil(sqrt(151^2) - 1) + 1
  # k/K = 1/2: sqrt(0.5 (151^2 - 4) + 4) = 106.78 -> ceil(105.78) + 1 = 107.
  assert n(500) == 107
  assert n(1) == 6  # sqrt(22797 / 1000 + 4) = 5.18 -> ceil(4.18) + 1.


def test_ct_target_ema_follows_the_reference_code():
  # openai/consistency_models(_cifar10): exp(s0 ln mu0 / scales) with scales = N - 1, max 1.
  assert float(consistency.ct_target_ema(2, 2, 0.9)) == pytest.approx(0.81, rel=1e-6)  # mu(0), CIFAR-10.
  assert float(consistency.ct_target_ema(2, 2, 0.95)) == pytest.approx(0.9025, rel=1e-6)  # ImageNet 64.
  assert float(consistency.ct_target_ema(151, 2, 0.9)) == pytest.approx(0.998596, abs=1e-6)
  assert float(consistency.ct_target_ema(201, 2, 0.95)) == pytest.approx(0.95 ** (2 / 200), rel=1e-6)
  assert float(consistency.ct_target_ema(1, 2, 0.9)) == pytest.approx(0.81, rel=1e-6)  # The clamp.
  # At a schedule step: cifar10_ct's first step.
  from configs import cifar10_ct
  c = cifar10_ct.get_config().consistency
  n0 = consistency.num_scales_at(c, 0, 800_000)
  assert int(n0) == 2 and float(consistency.target_ema_at(c, n0)) == pytest.approx(0.81, rel=1e-6)


def test_ict_curriculum_first_doubling_last():
  # K = 400k, s0 = 10, s1 = 1280: K' = floor(400000 / (log2(128) + 1)) = 50000.
  n = lambda k: int(consistency.ict_num_scales(k, 400_000, 10, 1280))
  assert n(0) == 11 and n(49_999) == 11
  assert n(50_000) == 21 and n(99_999) == 21 and n(100_000) == 41
  assert n(350_000) == 1281 and n(399_999) == 1281
  # s1 not a power-of-two multiple of s0: the last stage is capped at s1.
  assert int(consistency.ict_num_scales(10**6, 1000, 10, 1000)) == 1001


def test_schedule_dispatch_and_errors():
  fixed = cons_config(num_scales=18)
  assert int(consistency.num_scales_at(fixed, 123, 1000)) == 18
  assert float(consistency.target_ema_at(cons_config(target_ema=0.95), 18)) == pytest.approx(0.95)
  with pytest.raises(ConfigError, match='scale_schedule'):
    consistency.num_scales_at(cons_config(scale_schedule='cosine'), 0, 10)
  with pytest.raises(ConfigError, match="consistency.distance='lp3' is not one of 'l2', 'l1', 'pseudo_huber'"):
    consistency.make_distance(cons_config(distance='lp3'), (8, 8, 1))
  with pytest.raises(ConfigError, match='weighting'):  # Every choice is checked when the loss is built.
    consistency.ConsistencyLoss(cons_config(weighting='snr'), noise_config(), 10,
                                consistency.make_distance(cons_config(), (8, 8, 1)))


# --------------------------------------------------------------------------------------------------
# Index sampling and weighting.
# --------------------------------------------------------------------------------------------------
def lognormal_probs_reference(num_scales, p_mean=-1.1, p_std=2.0):
  """iCT eq. (10) in float64 on the increasing grid, written independently of the code under test."""
  lo, hi = 0.002 ** (1 / 7), 80.0 ** (1 / 7)
  asc = [(lo + i / (num_scales - 1) * (hi - lo)) ** 7 for i in range(num_scales)]
  cdf = lambda s: erf((math.log(s) - p_mean) / (math.sqrt(2) * p_std))
  mass = np.array([cdf(asc[i + 1]) - cdf(asc[i]) for i in range(num_scales - 1)])
  # Index i on the increasing grid is index N - 2 - i of the pair (sigma_i, sigma_{i+1}) decreasing.
  return (mass / mass.sum())[::-1]


def test_lognormal_index_probabilities_match_formula():
  for n in (11, 21, 41):
    logits = consistency.lognormal_index_logits(jnp.int32(n), 1281, 0.002, 80.0, 7.0, -1.1, 2.0)
    probs = np.asarray(jax.nn.softmax(logits), np.float64)
    assert np.all(probs[n - 1:] == 0)  # No pair beyond the current grid.
    np.testing.assert_allclose(probs[:n - 1], lognormal_probs_reference(n), rtol=2e-4, atol=1e-7)


@pytest.mark.xla_optimised  # Thousands of steps or 10^5 samples of one program.
def test_lognormal_index_samples_chi_square():
  config = cons_config(noise_sampling='lognormal')
  idx = np.asarray(consistency.sample_indices(jax.random.PRNGKey(0), 200_000, config, noise_config(),
                                              jnp.int32(11), 1281))
  expected = lognormal_probs_reference(11) * idx.size
  observed = np.bincount(idx, minlength=10)
  assert observed.size == 10  # Never an index without a pair.
  _, p_value = stats.chisquare(observed, expected)
  assert p_value > 1e-3
  # The test can fail: uniform indices are rejected.
  uniform = np.asarray(consistency.sample_indices(jax.random.PRNGKey(0), 200_000, cons_config(),
                                                  noise_config(), jnp.int32(11), 11))
  assert stats.chisquare(np.bincount(uniform, minlength=10), expected)[1] < 1e-6


def test_ict_weighting():
  w = consistency.loss_weight('ict', jnp.array([3.0, 0.5]), jnp.array([2.5, 0.4]))
  np.testing.assert_allclose(np.asarray(w), [2.0, 10.0], rtol=1e-5)
  assert float(consistency.loss_weight('uniform', jnp.array([3.0]), jnp.array([2.0]))[0]) == 1.0


# --------------------------------------------------------------------------------------------------
# Distances.
# --------------------------------------------------------------------------------------------------
def test_distances_known_values():
  x = jnp.array([[3.0, 4.0], [1.0, -1.0]]).reshape(2, 1, 2, 1)
  y = jnp.zeros_like(x)
  np.testing.assert_allclose(consistency.l2_distance(x, y), [12.5, 1.0])
  np.testing.assert_allclose(consistency.l1_distance(x, y), [3.5, 1.0])
  np.testing.assert_allclose(consistency.pseudo_huber_distance(x, y, 1.0),
                             [math.sqrt(26) - 1, math.sqrt(3) - 1], rtol=1e-6)
  assert consistency.ict_huber_c(32 * 32 * 3) == pytest.approx(0.03, abs=1e-4)  # iCT: c = 0.03.
  dist = consistency.make_distance(cons_config(distance='pseudo_huber'), (32, 32, 3))
  assert float(dist.fn(x[:1], x[:1], None)[0]) == 0.0


def test_pseudo_huber_gradient_known_value():
  grad = jax.grad(lambda x: consistency.pseudo_huber_distance(x, jnp.zeros_like(x), 1.0)[0])(
      jnp.array([[3.0, 4.0]]))
  np.testing.assert_allclose(np.asarray(grad), [[3 / math.sqrt(26), 4 / math.sqrt(26)]], rtol=1e-6)
  # Near zero it behaves like a scaled L2 (gradient -> (x - y) / c), far away like L1 (unit norm).
  small = jax.grad(lambda x: consistency.pseudo_huber_distance(x, jnp.zeros_like(x), 0.5)[0])(
      jnp.array([[1e-4, 0.0]]))
  assert float(small[0, 0]) == pytest.approx(2e-4, rel=1e-3)


# --------------------------------------------------------------------------------------------------
# The losses on Gaussian data, where the consistency function is known exactly.
# --------------------------------------------------------------------------------------------------
MU, S0 = 0.2, 0.5


def exact_cm_fn(params, x, sigma, rng):
  """The exact consistency function, plus a learnable scale and offset that are 0 at the optimum."""
  del rng
  f = gaussian.consistency_function(MU, S0, 0.002)(x, sigma)
  return f * (1.0 + params['scale']) + params['offset']


def make_loss(**overrides):
  return consistency.ConsistencyLoss(cons_config(**overrides), noise_config(), 1000,
                                     consistency.make_distance(cons_config(**overrides), (4, 4, 1)))


def data(n, seed=0):
  return MU + S0 * jax.random.normal(jax.random.PRNGKey(seed), (n, 4, 4, 1))


ZERO = {'scale': jnp.float32(0.0), 'offset': jnp.float32(0.0)}


def test_cd_loss_of_exact_consistency_function_is_zero():
  exact_step = lambda x, s, s_next: gaussian.ode_solution(x, s, s_next, MU, S0)
  loss_fn = make_loss(num_scales=18)
  loss, aux = loss_fn(exact_cm_fn, ZERO, ZERO, data(512), jax.random.PRNGKey(1), 0, exact_step)
  assert float(loss) < 1e-10
  assert int(aux['num_scales']) == 18
  # With the teacher's Heun step the only error is Heun's local error, still tiny ...
  heun = consistency.teacher_ode_step(gaussian.denoiser(MU, S0), 'heun')
  heun_loss, _ = loss_fn(exact_cm_fn, ZERO, ZERO, data(512), jax.random.PRNGKey(1), 0, heun)
  assert float(heun_loss) < 1e-4
  # ... and a wrong model has a clearly positive loss.
  wrong = {'scale': jnp.float32(0.0), 'offset': jnp.float32(0.1)}
  loss_wrong, _ = loss_fn(exact_cm_fn, wrong, ZERO, data(512), jax.random.PRNGKey(1), 0, exact_step)
  assert float(loss_wrong) == pytest.approx(0.01, rel=1e-3)


def test_target_and_online_share_dropout_key_and_target_has_no_gradient():
  seen = []

  def spy_fn(params, x, sigma, rng):
    seen.append(rng)
    return exact_cm_fn(params, x, sigma, rng)

  grads = jax.grad(lambda p: make_loss()(spy_fn, p, ZERO, data(8), jax.random.PRNGKey(0), 0)[0])(
      {'scale': jnp.float32(0.1), 'offset': jnp.float32(0.1)})
  assert len(seen) == 2 and np.array_equal(np.asarray(seen[0]), np.asarray(seen[1]))
  target_grads = jax.grad(lambda t: make_loss()(exact_cm_fn, ZERO, t, data(8),
                                                jax.random.PRNGKey(0), 0)[0])(ZERO)
  assert all(float(g) == 0.0 for g in jax.tree.leaves(target_grads))
  assert all(float(g) != 0.0 for g in jax.tree.leaves(grads))


def test_ct_gradient_is_unbiased_estimate_of_cd_gradient():
  """CT's target x0 + t_n z is the Euler step with an unbiased score estimate; the exact target
  function is affine in x, so the CT gradient averages to the CD gradient with the exact denoiser
  and an Euler teacher step (CM paper Thm. 2, exact here). Same RNG: same indices and noise."""
  loss_fn = make_loss(num_scales=18)
  params = {'scale': jnp.float32(0.05), 'offset': jnp.float32(-0.03)}
  euler = consistency.teacher_ode_step(gaussian.denoiser(MU, S0), 'euler')
  heun = consistency.teacher_ode_step(gaussian.denoiser(MU, S0), 'heun')

  def per_draw_grads(key, ode_step):
    # One gradient per example, so the spread over draws gives the Monte-Carlo error.
    x = data(1, seed=0)
    g = lambda k: jax.grad(lambda p: loss_fn(exact_cm_fn, p, ZERO, MU + S0 * jax.random.normal(
        jax.random.fold_in(k, 7), x.shape), k, 0, ode_step)[0])(params)
    return jax.vmap(g)(jax.random.split(key, 40_000))

  ct = per_draw_grads(jax.random.PRNGKey(3), None)
  cd = per_draw_grads(jax.random.PRNGKey(3), euler)
  cd_heun = per_draw_grads(jax.random.PRNGKey(3), heun)
  for name in ('scale', 'offset'):
    diff = np.asarray(ct[name] - cd[name], np.float64)
    stderr = diff.std() / math.sqrt(diff.size)
    assert abs(diff.mean()) < 4 * stderr, name
    assert abs(np.mean(cd[name])) > 10 * stderr  # The gradients are not trivially zero.
  # CT is unbiased for the Euler-teacher CD gradient, not for Heun's.
  diff = np.asarray(ct['scale'] - cd_heun['scale'], np.float64)
  assert abs(diff.mean()) > 4 * diff.std() / math.sqrt(diff.size)


def test_target_update():
  target = {'w': jnp.array([1.0, 2.0])}
  online = {'w': jnp.array([3.0, 6.0])}
  np.testing.assert_allclose(consistency.update_target(target, online, 0.75)['w'], [1.5, 3.0])
  np.testing.assert_allclose(consistency.update_target(target, online, 0.0)['w'], [3.0, 6.0])


class PixelMLP(nn.Module):
  """F(c_in x, c_noise) applied per pixel: enough for iid Gaussian pixels."""

  @nn.compact
  def __call__(self, x, noise_cond, labels=None, train=False):
    del labels, train
    cond = jnp.broadcast_to(noise_cond[:, None, None, None], x.shape)
    h = jnp.concatenate([x, cond], axis=-1)
    for _ in range(2):
      h = nn.silu(nn.Dense(64)(h))
    return nn.Dense(x.shape[-1])(h)


@pytest.mark.slow
@pytest.mark.xla_optimised  # Thousands of steps or 10^5 samples of one program.
def test_cd_with_exact_teacher_learns_the_pf_ode_endpoint():
  """A small model distilled from the exact Gaussian denoiser maps x_T to the exact ODE endpoint.

  Tolerance: the CD fixed point is the consistency function of the Heun-discretised ODE on the
  N = 18 grid, whose endpoint error is ~0.05 s0 on average (test_karras); we allow 0.15 s0 mean
  absolute error for that plus optimisation error. Predicting the mean alone scores ~0.8 s0.
  """
  mconfig = noise_config()
  model = Preconditioned(PixelMLP(), mconfig)
  params = model.init(jax.random.PRNGKey(0), (2, 2, 1))
  loss_fn = consistency.ConsistencyLoss(cons_config(num_scales=18), mconfig, 1000,
                                        consistency.make_distance(cons_config(), (2, 2, 1)))
  teacher = consistency.teacher_ode_step(gaussian.denoiser(MU, S0), 'heun')
  tx = optax.adam(2e-3)
  cm_fn = lambda p, x, s, rng: model.consistency(p, x, s)

  @jax.jit
  def step(params, opt_state, key):
    x0 = MU + S0 * jax.random.normal(jax.random.fold_in(key, 1), (256, 2, 2, 1))
    grads = jax.grad(lambda p: loss_fn(cm_fn, p, params, x0, key, 0, teacher)[0])(params)
    updates, opt_state = tx.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state

  opt_state = tx.init(params)
  for i in range(3000):
    params, opt_state = step(params, opt_state, jax.random.PRNGKey(i))
  z = jax.random.normal(jax.random.PRNGKey(99), (2048, 2, 2, 1))
  x_t = MU + 80.0 * z
  sigma = jnp.full((2048,), 80.0)
  exact = gaussian.ode_solution(x_t, sigma, jnp.full((2048,), 0.002), MU, S0)
  err = float(jnp.mean(jnp.abs(model.consistency(params, x_t, sigma) - exact))) / S0
  baseline = float(jnp.mean(jnp.abs(MU - exact))) / S0
  assert baseline > 0.7
  assert err < 0.15, err
  # Boundary condition holds exactly for the trained model.
  x = jax.random.normal(jax.random.PRNGKey(5), (4, 2, 2, 1))
  np.testing.assert_array_equal(np.asarray(model.consistency(params, x, jnp.full((4,), 0.002))),
                                np.asarray(x))


# --------------------------------------------------------------------------------------------------
# The whole iCT loss at a known value.
# --------------------------------------------------------------------------------------------------
def test_ict_loss_at_a_known_value():
  """Log-normal indices, the N(k) curriculum, 1/(sigma_hi - sigma_lo) and pseudo-Huber together,
  recomputed in float64 numpy from the same random draws."""
  from configs import cifar10_ict
  cons = cifar10_ict.get_config().consistency
  shape = (4, 4, 4, 1)  # data(4)'s: d = 16 values per example.
  loss_fn = consistency.ConsistencyLoss(cons, noise_config(), 400_000,
                                        consistency.make_distance(cons, shape[1:]))
  params = {'scale': jnp.float32(0.3), 'offset': jnp.float32(-0.2)}
  x0, rng, step = data(4), jax.random.PRNGKey(7), 120_000
  loss, aux = loss_fn(exact_cm_fn, params, params, x0, rng, step)

  n = 10 * 2 ** (120_000 // 50_000) + 1  # iCT eq. 11: K' = 400k / (log2(128) + 1) = 50k; N = 41.
  assert int(aux['num_scales']) == n
  idx_rng, noise_rng, _ = jax.random.split(rng, 3)
  probs = np.zeros(1280)
  probs[:n - 1] = lognormal_probs_reference(n)
  with np.errstate(divide='ignore'):
    idx = np.asarray(jax.random.categorical(idx_rng, jnp.log(jnp.asarray(probs)), shape=(4,)))
  grid = (80.0 ** (1 / 7) + np.arange(n) / (n - 1) * (0.002 ** (1 / 7) - 80.0 ** (1 / 7))) ** 7
  hi, lo = grid[idx], grid[idx + 1]
  z = np.asarray(jax.random.normal(noise_rng, shape), np.float64)
  x = np.asarray(x0, np.float64)
  # The exact Gaussian consistency function, scaled and offset by the params.
  f = lambda y, s: (MU + np.sqrt(S0 ** 2 + 0.002 ** 2) / np.sqrt(S0 ** 2 + s[:, None, None, None] ** 2)
                    * (y - MU)) * 1.3 - 0.2
  diff = (f(x + hi[:, None, None, None] * z, hi) - f(x + lo[:, None, None, None] * z, lo)).reshape(4, -1)
  c = 0.00054 * math.sqrt(16)
  expected = np.mean((np.sqrt((diff ** 2).sum(axis=1) + c ** 2) - c) / (hi - lo))
  assert float(loss) == pytest.approx(expected, rel=2e-4)

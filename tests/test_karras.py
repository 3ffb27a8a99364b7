"""EDM maths against closed forms: the Karras grid, preconditioning, losses and the PF-ODE samplers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cm_jax import karras
from tests import gaussian

SMIN, SMAX, RHO, SD = 0.002, 80.0, 7.0, 0.5


def test_karras_grid_endpoints_and_values():
  grid = np.asarray(karras.karras_sigmas(18, SMIN, SMAX, RHO))
  assert grid[0] == pytest.approx(80.0, rel=1e-6)
  assert grid[-1] == pytest.approx(0.002, rel=1e-5)
  assert np.all(np.diff(grid) < 0)
  # Hand-computed: (80^(1/7) + 9/17 (0.002^(1/7) - 80^(1/7)))^7.
  expected = (80 ** (1 / 7) + 9 / 17 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
  assert grid[9] == pytest.approx(expected, rel=1e-5)
  # By hand: 80^(1/7) = 1.87027, 0.002^(1/7) = 0.41150, 1.87027 - 9/17 * 1.45877 = 1.09798.
  assert expected == pytest.approx(1.09798 ** 7, rel=1e-3) and grid[9] == pytest.approx(1.9233, abs=1e-3)
  # Traced N gives the same values as the array form.
  assert float(karras.sigma_at(9, jnp.int32(18), SMIN, SMAX, RHO)) == pytest.approx(grid[9], rel=1e-6)


def test_edm_scalings_at_sigma_data():
  c_skip, c_out, c_in = karras.edm_scalings(jnp.array(SD), SD)
  assert float(c_skip) == pytest.approx(0.5)
  assert float(c_out) == pytest.approx(SD / np.sqrt(2))
  assert float(c_in) == pytest.approx(1 / (SD * np.sqrt(2)))
  assert float(karras.noise_conditioning(jnp.array(np.e ** 4))) == pytest.approx(1.0)


def test_consistency_scalings_boundary_and_large_sigma():
  c_skip, c_out, _ = karras.consistency_scalings(jnp.array(SMIN), SD, SMIN)
  assert float(c_skip) == 1.0 and float(c_out) == 0.0
  c_skip, c_out, c_in = karras.consistency_scalings(jnp.array(1.0), SD, SMIN)
  assert float(c_skip) == pytest.approx(0.25 / (0.998 ** 2 + 0.25))
  assert float(c_out) == pytest.approx(0.5 * 0.998 / np.sqrt(1.25))
  assert float(c_in) == pytest.approx(1 / np.sqrt(1.25))


def test_precondition_boundary_condition_is_exact():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(4, 3, 3, 2)), jnp.float32)
  wild_net = lambda x_in, c_noise: 1e3 * jnp.ones_like(x_in)
  out = karras.precondition(wild_net, x, jnp.full((4,), SMIN),
                            karras.consistency_scalings(jnp.full((4,), SMIN), SD, SMIN), 1.0)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(x))


def test_edm_loss_weight_and_sigma_distribution():
  assert float(karras.edm_loss_weight(jnp.array(SD), SD)) == pytest.approx(2 / SD ** 2)
  sig = np.asarray(karras.edm_loss_sigmas(jax.random.PRNGKey(0), 200_000, -1.2, 1.2))
  assert np.mean(np.log(sig)) == pytest.approx(-1.2, abs=0.01)
  assert np.std(np.log(sig)) == pytest.approx(1.2, abs=0.01)


@pytest.mark.parametrize('mu,s0', [(0.0, 0.5), (0.3, 0.2)])
def test_heun_sampler_lands_on_exact_ode_solution(mu, s0):
  """With the exact denoiser, Heun converges to the exact PF-ODE endpoint at second order.

  Measured here: the max error over 4k pixels is 0.21 s0 at 18 levels (35 NFE, mean 0.045 s0), and
  shrinks ~4x for each doubling of the levels, to ~1e-3 s0 at 200 levels; the tolerances leave 2x.
  """
  z = jax.random.normal(jax.random.PRNGKey(1), (256, 4, 4, 1))
  exact = gaussian.ode_solution(SMAX * z, jnp.float32(SMAX), jnp.float32(0.0), mu, s0)
  errors = {}
  for steps in (18, 40, 80, 200):
    sigmas = karras.karras_sigmas(steps, SMIN, SMAX, RHO)
    out = karras.ode_sample(gaussian.denoiser(mu, s0), z, sigmas, 'heun')
    errors[steps] = float(jnp.max(jnp.abs(out - exact))) / s0
  assert errors[18] < 0.5
  assert 3.0 < errors[40] / errors[80] < 5.5  # Second order: halving the step quarters the error.
  assert errors[200] < 3e-3
  euler = karras.ode_sample(gaussian.denoiser(mu, s0), z, karras.karras_sigmas(18, SMIN, SMAX, RHO),
                            'euler')
  assert float(jnp.max(jnp.abs(euler - exact))) / s0 > errors[18]  # First order is worse.


def test_single_steps_match_ode_for_linear_denoiser():
  mu, s0 = 0.1, 0.4
  x = jax.random.normal(jax.random.PRNGKey(2), (8, 2, 2, 1)) * 3
  s_hi, s_lo = jnp.full((8,), 3.0), jnp.full((8,), 2.9)
  exact = gaussian.ode_solution(x, s_hi, s_lo, mu, s0)
  heun = karras.heun_step(gaussian.denoiser(mu, s0), x, s_hi, s_lo)
  euler = karras.euler_step(gaussian.denoiser(mu, s0), x, s_hi, s_lo)
  assert float(jnp.max(jnp.abs(heun - exact))) < 1e-5
  assert float(jnp.max(jnp.abs(euler - exact))) < 1e-3
  assert karras.ode_nfe(18, 'heun') == 35 and karras.ode_nfe(18, 'euler') == 18

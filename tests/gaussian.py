"""Closed forms for Gaussian data x0 ~ N(mu, s0^2) per dimension (the tests' exact reference).

x_sigma = x0 + sigma z ~ N(mu, s0^2 + sigma^2). The optimal denoiser is E[x0 | x_sigma] =
mu + s0^2 / (s0^2 + sigma^2) (x - mu), and the PF-ODE dx/dsigma = (x - D) / sigma keeps
(x - mu) / sqrt(s0^2 + sigma^2) constant, so every ODE solution and the consistency function are
known exactly.
"""

import jax.numpy as jnp


def _b(v, x):
  return jnp.reshape(v, jnp.shape(v) + (1,) * (x.ndim - jnp.ndim(v)))


def denoiser(mu: float, s0: float):
  return lambda x, sigma: mu + _b(s0 ** 2 / (s0 ** 2 + sigma ** 2), x) * (x - mu)


def ode_solution(x, sigma_from, sigma_to, mu: float, s0: float):
  """The exact PF-ODE map from noise level sigma_from to sigma_to (either may be 0)."""
  ratio = jnp.sqrt(s0 ** 2 + sigma_to ** 2) / jnp.sqrt(s0 ** 2 + sigma_from ** 2)
  return mu + _b(ratio, x) * (x - mu)


def consistency_function(mu: float, s0: float, sigma_min: float):
  """f(x, sigma) = the ODE solution at sigma_min (the CM paper's boundary is eps, not 0)."""
  return lambda x, sigma: ode_solution(x, sigma, jnp.full_like(sigma, sigma_min), mu, s0)


# TrigFlow (sCM): x_t = cos(t) x0 + sin(t) z, z ~ N(0, sd^2), so x_t ~ N(cos(t) mu, v_t) with
# v_t = cos^2(t) s0^2 + sin^2(t) sd^2, and the PF-ODE keeps u = (x_t - cos(t) mu) / sqrt(v_t) constant.
def _trig_var(t, s0, sd):
  return jnp.cos(t) ** 2 * s0 ** 2 + jnp.sin(t) ** 2 * sd ** 2


def trigflow_velocity(mu, s0, sd: float):
  """The exact F(x_t / sd, t) = (dx_t/dt) / sd of the PF-ODE (mu and s0 may be traced params)."""
  def velocity(x, t):
    c, s = _b(jnp.cos(t), x), _b(jnp.sin(t), x)
    var = _b(_trig_var(t, s0, sd), x)
    return (-s * mu + (x - c * mu) * s * c * (sd ** 2 - s0 ** 2) / var) / sd
  return velocity


def trigflow_consistency_velocity(mu, s0, sd: float):
  """The F of the exact consistency function in sCM's form f = cos(t) x - sin(t) sd F (eq. 5):
  (cos(t) x - f(x, t)) / (sd sin t), written without the cancellation at small t."""
  def velocity(x, t):
    c, s = _b(jnp.cos(t), x), _b(jnp.sin(t), x)
    std = _b(jnp.sqrt(_trig_var(t, s0, sd)), x)
    u = (x - c * mu) / std
    return (-s * mu + u * s * (c ** 2 * sd ** 2 - s0 ** 2 * (1 + c ** 2)) / (c * std + s0)) / sd
  return velocity


def trigflow_consistency(mu, s0, sd: float):
  """The exact f(x_t, t): the PF-ODE's end point at t = 0, mu + s0 u."""
  return lambda x, t: mu + s0 * (x - _b(jnp.cos(t), x) * mu) / _b(jnp.sqrt(_trig_var(t, s0, sd)), x)


def trigflow_posterior_mean(mu, s0, sd: float):
  """E[x0 | x_t] (x_t and x0 jointly Gaussian)."""
  return lambda x, t: mu + _b(jnp.cos(t) * s0 ** 2 / _trig_var(t, s0, sd), x) * (x - _b(jnp.cos(t), x) * mu)

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

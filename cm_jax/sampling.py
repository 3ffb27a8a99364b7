"""Samplers: consistency-model one-step and multistep sampling (CM paper Alg. 1) and EDM's ODE sampler.

Each sampler is a pure function of (a function of the params, noise or an RNG key); the CLI and the
training loop wrap them in `jax.jit` with shardings.
"""

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cm_jax import karras
from cm_jax.errors import ConfigError

ConsistencyFn = Callable[[jax.Array, jax.Array], jax.Array]  # f(x, sigma[B]) -> x0


def multistep_sample(consistency_fn: ConsistencyFn, rng: jax.Array, shape, sigmas: Sequence[float],
                     sigma_min: float) -> jax.Array:
  """CM paper Alg. 1: x = T z, x <- f(x, T); then for each tau: x <- f(x + sqrt(tau^2 - eps^2) z, tau).

  `sigmas` is the decreasing list [T, tau_1, ...]; levels at sigma_min are skipped, since noising to
  eps adds nothing and f(x, eps) = x. One network evaluation per remaining level.
  """
  sigmas = [float(s) for s in sigmas if float(s) > sigma_min * (1 + 1e-6)]
  if not sigmas:
    raise ConfigError('multistep sampling needs at least one time point above sigma_min.')
  if any(a <= b for a, b in zip(sigmas, sigmas[1:])):
    raise ConfigError(f'multistep time points must decrease strictly; got sigmas {sigmas}.')
  rngs = jax.random.split(rng, len(sigmas))
  batch = shape[0]
  x = sigmas[0] * jax.random.normal(rngs[0], shape)
  x = consistency_fn(x, jnp.full((batch,), sigmas[0]))
  for key, sigma in zip(rngs[1:], sigmas[1:]):
    z = jax.random.normal(key, shape)
    x_noisy = x + np.sqrt(sigma ** 2 - sigma_min ** 2) * z
    x = consistency_fn(x_noisy, jnp.full((batch,), sigma))
  return x


def sigmas_from_indices(ts: Sequence[int], num_scales: int, model_config) -> list[float]:
  """Time points given as indices on the N-grid (0 = sigma_max, N-1 = sigma_min) as sigmas."""
  for t in ts:
    if not 0 <= int(t) < num_scales:
      raise ConfigError(f'sampling.ts={tuple(ts)} has index {t} outside the N-grid [0, {num_scales - 1}] '
                        f'(N = {num_scales}); pass indices on that grid or sigmas via sampling.sigmas.')
  grid = np.asarray(karras.karras_sigmas(num_scales, model_config.sigma_min, model_config.sigma_max,
                                         model_config.rho))
  return [float(grid[int(t)]) for t in ts]


def edm_sample(denoiser: karras.Denoiser, rng: jax.Array, shape, num_steps: int, model_config,
               solver: str = 'heun') -> jax.Array:
  """EDM's deterministic sampler over a Karras grid of `num_steps` levels (18 Heun steps = 35 NFE)."""
  sigmas = karras.karras_sigmas(num_steps, model_config.sigma_min, model_config.sigma_max,
                                model_config.rho)
  return karras.ode_sample(denoiser, jax.random.normal(rng, shape), sigmas, solver)

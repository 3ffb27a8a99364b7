"""Noise levels, preconditioning and probability-flow ODE solvers of EDM (Karras et al. 2022).

Everything here is a small pure function of arrays. Denoisers are passed in as callables
`denoise(x, sigma) -> x0_estimate` (sigma of shape [B]), so the samplers work the same with a network
or with a closed-form denoiser in tests.
"""

import dataclasses
from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from cm_jax.errors import choose

Denoiser = Callable[[jax.Array, jax.Array], jax.Array]
# One ODE step: (denoiser, x, sigma [B], sigma_next [B]) -> x at sigma_next.
OdeStep = Callable[[Denoiser, jax.Array, jax.Array, jax.Array], jax.Array]


def sigma_at(index, num_scales, sigma_min: float, sigma_max: float, rho: float):
  """sigma_index of the Karras grid, index 0 = sigma_max, index N-1 = sigma_min (EDM eq. 5).

  `index` and `num_scales` may be traced scalars or arrays, so a curriculum that changes N during
  training does not change any array shape (and so never recompiles the step).
  """
  lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
  frac = jnp.asarray(index, jnp.float32) / (jnp.asarray(num_scales, jnp.float32) - 1.0)
  return (hi + frac * (lo - hi)) ** rho


def karras_sigmas(num_scales: int, sigma_min: float, sigma_max: float, rho: float) -> jax.Array:
  """The whole decreasing grid [sigma_max, ..., sigma_min] of `num_scales` levels."""
  return sigma_at(jnp.arange(num_scales), num_scales, sigma_min, sigma_max, rho)


def bcast(coef: jax.Array, x: jax.Array) -> jax.Array:
  """A per-example coefficient [B] shaped to multiply x [B, ...]."""
  return coef.reshape(coef.shape + (1,) * (x.ndim - coef.ndim))


def noise_conditioning(sigma: jax.Array, noise_cond_scale: float = 1.0) -> jax.Array:
  """c_noise = scale * ln(sigma) / 4 (EDM Table 1 with scale 1)."""
  return noise_cond_scale * 0.25 * jnp.log(sigma)


def edm_scalings(sigma: jax.Array, sigma_data: float):
  """EDM preconditioning (EDM Table 1): (c_skip, c_out, c_in)."""
  sd2 = sigma_data ** 2
  c_skip = sd2 / (sigma ** 2 + sd2)
  c_out = sigma * sigma_data / jnp.sqrt(sigma ** 2 + sd2)
  c_in = 1.0 / jnp.sqrt(sigma ** 2 + sd2)
  return c_skip, c_out, c_in


def consistency_scalings(sigma: jax.Array, sigma_data: float, sigma_min: float):
  """Consistency-model preconditioning (CM paper, Appendix C): c_skip(eps) = 1, c_out(eps) = 0.

  c_skip = sd^2 / ((t - eps)^2 + sd^2), c_out = sd (t - eps) / sqrt(sd^2 + t^2), c_in as EDM, so
  f(x, eps) = x holds exactly whatever the network outputs.
  """
  sd2 = sigma_data ** 2
  c_skip = sd2 / ((sigma - sigma_min) ** 2 + sd2)
  c_out = sigma_data * (sigma - sigma_min) / jnp.sqrt(sd2 + sigma ** 2)
  c_in = 1.0 / jnp.sqrt(sigma ** 2 + sd2)
  return c_skip, c_out, c_in


def precondition(network_fn: Callable[[jax.Array, jax.Array], jax.Array], x: jax.Array,
                 sigma: jax.Array, scalings, noise_cond_scale: float,
                 c_noise: jax.Array | None = None) -> jax.Array:
  """c_skip x + c_out F(c_in x, c_noise) for per-example sigma [B]; c_noise defaults to EDM's
  `noise_conditioning(sigma, noise_cond_scale)`.

  In float32 (at least) whatever the network computes in: a bfloat16 network's output is cast back
  before c_skip x + c_out F, so its rounding enters D only through c_out F, and x, which is nearly
  all of D at low sigma (c_skip -> 1, c_out -> 0), is never rounded to bfloat16.
  """
  dtype = jnp.promote_types(x.dtype, jnp.float32)
  x = x.astype(dtype)
  c_skip, c_out, c_in = (jnp.asarray(c, dtype) for c in scalings)
  if c_noise is None:
    c_noise = noise_conditioning(sigma, noise_cond_scale)
  net_out = network_fn(bcast(c_in, x) * x, c_noise)
  return bcast(c_skip, x) * x + bcast(c_out, x) * net_out.astype(dtype)


def edm_loss_sigmas(rng: jax.Array, batch_size: int, p_mean: float, p_std: float) -> jax.Array:
  """ln(sigma) ~ N(p_mean, p_std^2) (EDM Table 1, training)."""
  return jnp.exp(p_mean + p_std * jax.random.normal(rng, (batch_size,)))


def edm_loss_weight(sigma: jax.Array, sigma_data: float) -> jax.Array:
  """lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2 (EDM Table 1)."""
  return (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2


def euler_step(denoise: Denoiser, x: jax.Array, sigma: jax.Array, sigma_next: jax.Array) -> jax.Array:
  """One Euler step of the PF-ODE dx/dsigma = (x - D(x, sigma)) / sigma (EDM eq. 3)."""
  d = (x - denoise(x, sigma)) / bcast(sigma, x)
  return x + bcast(sigma_next - sigma, x) * d


def heun_step(denoise: Denoiser, x: jax.Array, sigma: jax.Array, sigma_next: jax.Array) -> jax.Array:
  """One Heun (2nd order) step of the PF-ODE (EDM Alg. 1, lines 5-8); needs sigma_next > 0."""
  d = (x - denoise(x, sigma)) / bcast(sigma, x)
  x_euler = x + bcast(sigma_next - sigma, x) * d
  d_next = (x_euler - denoise(x_euler, sigma_next)) / bcast(sigma_next, x)
  return x + bcast(sigma_next - sigma, x) * 0.5 * (d + d_next)


@dataclasses.dataclass(frozen=True)
class Solver:
  step: OdeStep
  nfe_per_step: int  # Network evaluations of one step.


# The PF-ODE solvers by name.
SOLVERS = {'heun': Solver(heun_step, 2), 'euler': Solver(euler_step, 1)}


def solver(name: str, field: str = 'solver') -> Solver:
  """The solver of a name ('heun' or 'euler'); ConfigError naming `field` otherwise."""
  return choose(SOLVERS, name, field)


def ode_sample(denoise: Denoiser, noise: jax.Array, sigmas: Sequence[float] | jax.Array,
               solver_name: str = 'heun') -> jax.Array:
  """Deterministic EDM sampler (EDM Alg. 1 without churn) from x = sigmas[0] * noise down to 0.

  `sigmas` is decreasing and ends at sigma_min; the last step goes from sigma_min to 0 with Euler (as
  EDM does when t_{i+1} = 0), so N Heun levels cost 2N - 1 network evaluations (18 -> 35 NFE).
  """
  sigmas = jnp.concatenate([jnp.asarray(sigmas, jnp.float32), jnp.zeros((1,), jnp.float32)])
  batch = noise.shape[0]
  step_fn = SOLVERS[solver_name].step

  def body(i, x):
    sigma = jnp.full((batch,), sigmas[i])
    sigma_next = jnp.full((batch,), sigmas[i + 1])
    return step_fn(denoise, x, sigma, sigma_next)

  x = noise * sigmas[0]
  # All steps but the last use the chosen solver; the last one (to sigma = 0) is always Euler.
  x = jax.lax.fori_loop(0, sigmas.shape[0] - 2, body, x)
  sigma_last = jnp.full((batch,), sigmas[-2])
  return euler_step(denoise, x, sigma_last, jnp.zeros((batch,)))


def ode_nfe(num_steps: int, solver_name: str) -> int:
  """Network evaluations of `ode_sample` over a grid of `num_steps` levels (the last step is Euler)."""
  return (num_steps - 1) * SOLVERS[solver_name].nfe_per_step + 1

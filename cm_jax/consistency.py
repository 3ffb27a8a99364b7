"""Consistency distillation and consistency training losses (CM paper Alg. 2 and 3; iCT switches).

Losses know nothing of meshes or optimizers: they are pure functions of parameter pytrees, a batch and
an RNG key. The discretisation is the Karras grid with 0-based indices on the DEcreasing grid: index
i has the larger noise level sigma_i, index i + 1 the smaller one (the paper's t_{n+1} and t_n).
"""

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.scipy.special import erf

from cm_jax import karras
from cm_jax.errors import choose

# f(params, x, sigma, rng) -> f_theta(x, sigma); rng drives dropout (shared by online and target calls).
ConsistencyFn = Callable[[Any, jax.Array, jax.Array, jax.Array], jax.Array]
# One step of the teacher's PF-ODE: (x, sigma_from, sigma_to) -> x at sigma_to.
OdeStep = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def teacher_ode_step(denoiser: karras.Denoiser, solver: str) -> OdeStep:
  """CD's teacher step (Alg. 2): Heun (the paper's choice for CD) or Euler with the teacher D."""
  step_fn = karras.solver(solver, 'consistency.teacher_solver').step
  return lambda x, sigma, sigma_next: step_fn(denoiser, x, sigma, sigma_next)


# ----------------------------------------------------------------------------------------------------
# Schedules of the number of discretisation levels N(k) and of the target EMA rate mu(k).
# ----------------------------------------------------------------------------------------------------
def ct_num_scales(step, total_steps: int, start_scales: int, end_scales: int):
  """CM paper, Appendix C: N(k) = ceil(sqrt(k/K ((s1 + 1)^2 - s0^2) + s0^2) - 1) + 1."""
  k = jnp.asarray(step, jnp.float32)
  inner = k / total_steps * ((end_scales + 1) ** 2 - start_scales ** 2) + start_scales ** 2
  return (jnp.ceil(jnp.sqrt(inner) - 1.0) + 1.0).astype(jnp.int32)


def ct_target_ema(num_scales, start_scales: int, target_ema: float):
  """mu(k) = exp(s0 ln(mu0) / max(N(k) - 1, 1)), as both reference codebases compute it.

  The CM paper (Appendix C) writes exp(s0 ln(mu0) / N(k)); the code that trained the released
  models divides by N(k) - 1 (its N before the +1), clamped at 1: mu(0) = mu0^2 = 0.81 for CIFAR-10
  CT (mu0 = 0.9, s0 = 2, N(0) = 2) where the paper's formula gives 0.9.
  """
  levels = jnp.maximum(jnp.asarray(num_scales, jnp.float32) - 1.0, 1.0)
  return jnp.exp(start_scales * math.log(target_ema) / levels)


def ict_num_scales(step, total_steps: int, start_scales: int, end_scales: int):
  """iCT eq. (11): N(k) = min(s0 2^floor(k / K'), s1) + 1, K' = floor(K / (log2 floor(s1/s0) + 1))."""
  doubling_steps = math.floor(total_steps / (math.log2(math.floor(end_scales / start_scales)) + 1))
  doublings = jnp.asarray(step, jnp.int32) // max(doubling_steps, 1)
  # Clip the exponent so 2**doublings cannot overflow int32 on very long runs.
  scales = start_scales * 2 ** jnp.minimum(doublings, 30).astype(jnp.float32)
  return (jnp.minimum(scales, end_scales) + 1).astype(jnp.int32)


def max_num_scales(cons_config, total_steps: int) -> int:
  """The largest N any step of the run uses (sizes the index distribution's support)."""
  del total_steps  # Both curricula end at s1 + 1 whatever their length.
  if cons_config.scale_schedule == 'fixed':
    return cons_config.num_scales
  return cons_config.end_scales + 1


# N(k) by consistency.scale_schedule: fn(cons_config, step, total_steps).
SCALE_SCHEDULES = {
    'fixed': lambda c, step, total: jnp.asarray(c.num_scales, jnp.int32),
    'ct': lambda c, step, total: ct_num_scales(step, total, c.start_scales, c.end_scales),
    'ict': lambda c, step, total: ict_num_scales(step, total, c.start_scales, c.end_scales),
}
# mu(k) by consistency.target_ema_schedule: fn(cons_config, num_scales).
TARGET_EMA_SCHEDULES = {
    'fixed': lambda c, num_scales: jnp.asarray(c.target_ema, jnp.float32),
    'ct': lambda c, num_scales: ct_target_ema(num_scales, c.start_scales, c.target_ema),
}


def num_scales_at(cons_config, step, total_steps: int):
  schedule = choose(SCALE_SCHEDULES, cons_config.scale_schedule, 'consistency.scale_schedule')
  return schedule(cons_config, step, total_steps)


def target_ema_at(cons_config, num_scales):
  schedule = choose(TARGET_EMA_SCHEDULES, cons_config.target_ema_schedule,
                    'consistency.target_ema_schedule')
  return schedule(cons_config, num_scales)


# ----------------------------------------------------------------------------------------------------
# Noise-level index sampling and weighting.
# ----------------------------------------------------------------------------------------------------
def lognormal_index_logits(num_scales, max_scales: int, sigma_min, sigma_max, rho, p_mean, p_std):
  """iCT eq. (10): p(i) ∝ erf((ln s_i - P_mean)/(sqrt2 P_std)) - erf((ln s_{i+1} - P_mean)/(sqrt2 P_std)).

  Index i of the decreasing grid pairs sigma_i > sigma_{i+1}; entries i >= N - 1 have no pair and get
  probability 0. The support has the fixed size max_scales - 1 so N can change without recompiling.
  """
  idx = jnp.arange(max_scales - 1)
  sig_hi = karras.sigma_at(idx, num_scales, sigma_min, sigma_max, rho)
  sig_lo = karras.sigma_at(idx + 1, num_scales, sigma_min, sigma_max, rho)
  cdf = lambda s: erf((jnp.log(s) - p_mean) / (math.sqrt(2.0) * p_std))
  prob = jnp.clip(cdf(sig_hi) - cdf(sig_lo), 0.0, None)
  valid = idx < num_scales - 1
  return jnp.where(valid & (prob > 0), jnp.log(jnp.where(prob > 0, prob, 1.0)), -jnp.inf)


def _uniform_indices(rng, batch_size, cons_config, noise_config, num_scales, max_scales):
  del cons_config, noise_config, max_scales
  return jax.random.randint(rng, (batch_size,), 0, num_scales - 1)


def _lognormal_indices(rng, batch_size, cons_config, noise_config, num_scales, max_scales):
  logits = lognormal_index_logits(num_scales, max_scales, noise_config.sigma_min,
                                  noise_config.sigma_max, noise_config.rho, cons_config.p_mean,
                                  cons_config.p_std)
  return jax.random.categorical(rng, logits, shape=(batch_size,))


# Index sampling by consistency.noise_sampling ('lognormal': iCT's discretised log-normal).
NOISE_SAMPLINGS = {'uniform': _uniform_indices, 'lognormal': _lognormal_indices}


def sample_indices(rng, batch_size: int, cons_config, noise_config, num_scales, max_scales: int):
  """Index i in [0, N-2] of the pair (sigma_i, sigma_{i+1}) for each example."""
  sampler = choose(NOISE_SAMPLINGS, cons_config.noise_sampling, 'consistency.noise_sampling')
  return sampler(rng, batch_size, cons_config, noise_config, num_scales, max_scales)


# lambda(sigma_i) by consistency.weighting: fn(sigma_hi, sigma_lo). iCT Sec. 3.4: 1 / (sigma_{i+1} - sigma_i).
WEIGHTINGS = {
    'uniform': lambda sigma_hi, sigma_lo: jnp.ones_like(sigma_hi),
    'ict': lambda sigma_hi, sigma_lo: 1.0 / (sigma_hi - sigma_lo),
}


def loss_weight(weighting: str, sigma_hi: jax.Array, sigma_lo: jax.Array) -> jax.Array:
  return choose(WEIGHTINGS, weighting, 'consistency.weighting')(sigma_hi, sigma_lo)


# ----------------------------------------------------------------------------------------------------
# Distances d(x, y) -> [B].
# ----------------------------------------------------------------------------------------------------
def _flat(x):
  return x.reshape(x.shape[0], -1)


def l2_distance(x, y, params=None):
  """Mean squared error per example (the reference code's 'l2')."""
  del params
  return jnp.mean(_flat(x - y) ** 2, axis=1)


def l1_distance(x, y, params=None):
  del params
  return jnp.mean(jnp.abs(_flat(x - y)), axis=1)


def ict_huber_c(num_dims: int) -> float:
  """iCT Sec. 3.3: c = 0.00054 sqrt(d), d = pixels x channels (c = 0.03 on CIFAR-10)."""
  return 0.00054 * math.sqrt(num_dims)


def pseudo_huber_distance(x, y, c: float):
  """iCT eq. (6): sqrt(||x - y||^2 + c^2) - c, with the norm over the whole example."""
  return jnp.sqrt(jnp.sum(_flat(x - y) ** 2, axis=1) + c ** 2) - c


@dataclasses.dataclass(frozen=True)
class Distance:
  """A distance by name: fn(x, y, params) -> [B]; params is a frozen pytree (LPIPS weights) or None."""
  name: str
  fn: Callable[[jax.Array, jax.Array, Any], jax.Array]


def _pseudo_huber(cons_config, image_shape):
  c = cons_config.huber_c
  if c < 0:
    c = ict_huber_c(math.prod(image_shape))
  return lambda x, y, params: pseudo_huber_distance(x, y, c)


# The distances that need no weights, by consistency.distance: factory(cons_config, image_shape) -> fn.
DISTANCES = {
    'l2': lambda cons_config, image_shape: l2_distance,
    'l1': lambda cons_config, image_shape: l1_distance,
    'pseudo_huber': _pseudo_huber,
}


def make_distance(cons_config, image_shape, more: dict | None = None) -> Distance:
  """The distance of consistency.distance; `more` adds factories (the methods add LPIPS)."""
  factory = choose({**DISTANCES, **(more or {})}, cons_config.distance, 'consistency.distance')
  return Distance(cons_config.distance, factory(cons_config, image_shape))


# ----------------------------------------------------------------------------------------------------
# The losses.
# ----------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ConsistencyLoss:
  """CD (teacher given) or CT (teacher None) loss over a config; see `__call__`.

  `noise_config` holds the Karras grid (sigma_min, sigma_max, rho). Every named choice of
  `cons_config` is checked when the loss is built, not when it is traced.
  """
  cons_config: Any
  noise_config: Any
  total_steps: int
  distance: Distance

  def __post_init__(self):
    c = self.cons_config
    choose(SCALE_SCHEDULES, c.scale_schedule, 'consistency.scale_schedule')
    choose(TARGET_EMA_SCHEDULES, c.target_ema_schedule, 'consistency.target_ema_schedule')
    choose(NOISE_SAMPLINGS, c.noise_sampling, 'consistency.noise_sampling')
    choose(WEIGHTINGS, c.weighting, 'consistency.weighting')

  @property
  def max_scales(self) -> int:
    return max_num_scales(self.cons_config, self.total_steps)

  def schedule(self, step):
    """(N(k), mu(k)) at a training step: traced scalars, no recompiles as they change."""
    num_scales = num_scales_at(self.cons_config, step, self.total_steps)
    return num_scales, target_ema_at(self.cons_config, num_scales)

  def __call__(self, consistency_fn: ConsistencyFn, params, target_params, x0: jax.Array,
               rng: jax.Array, step, ode_step: OdeStep | None = None, distance_params=None):
    """CM Alg. 2 (ode_step given: one ODE step of the teacher) or Alg. 3 (ode_step None: CT).

    Returns (loss, aux); the target branch is under stop_gradient, and online and target calls use
    the same dropout key. `distance_params` are the distance's weights (LPIPS) or None.
    """
    cons, noise_config = self.cons_config, self.noise_config
    batch = x0.shape[0]
    idx_rng, noise_rng, dropout_rng = jax.random.split(rng, 3)
    num_scales, _ = self.schedule(step)
    idx = sample_indices(idx_rng, batch, cons, noise_config, num_scales, self.max_scales)
    grid = lambda i: karras.sigma_at(i, num_scales, noise_config.sigma_min, noise_config.sigma_max,
                                     noise_config.rho)
    sigma_hi, sigma_lo = grid(idx), grid(idx + 1)
    noise = jax.random.normal(noise_rng, x0.shape, x0.dtype)
    x_hi = x0 + karras.bcast(sigma_hi, x0) * noise
    if ode_step is None:
      # CT (Alg. 3): the Euler step with the unbiased score estimate (x_hi - x0) / sigma_hi^2 lands
      # exactly on x0 + sigma_lo z, the same noise.
      x_lo = x0 + karras.bcast(sigma_lo, x0) * noise
    else:
      x_lo = ode_step(x_hi, sigma_hi, sigma_lo)
    x_lo = jax.lax.stop_gradient(x_lo)
    online = consistency_fn(params, x_hi, sigma_hi, dropout_rng)
    target = jax.lax.stop_gradient(consistency_fn(target_params, x_lo, sigma_lo, dropout_rng))
    dist = self.distance.fn(online, target, distance_params)
    weight = loss_weight(cons.weighting, sigma_hi, sigma_lo)
    loss = jnp.mean(weight * dist)
    aux = {'num_scales': num_scales, 'mean_sigma': jnp.mean(sigma_hi),
           'distance': jnp.mean(dist)}
    return loss, aux


def update_target(target_params, params, mu):
  """theta- <- stop_grad(mu theta- + (1 - mu) theta) (CM Alg. 2/3, last line)."""
  return jax.tree.map(lambda t, p: jax.lax.stop_gradient(mu * t + (1.0 - mu) * p), target_params,
                      params)

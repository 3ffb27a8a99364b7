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
from cm_jax.errors import ConfigError

# f(params, x, sigma, rng) -> f_theta(x, sigma); rng drives dropout (shared by online and target calls).
ConsistencyFn = Callable[[Any, jax.Array, jax.Array, jax.Array], jax.Array]
# One step of the teacher's PF-ODE: (x, sigma_from, sigma_to) -> x at sigma_to.
OdeStep = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def teacher_ode_step(denoiser: karras.Denoiser, solver: str) -> OdeStep:
  """CD's teacher step (Alg. 2): Heun (the paper's choice for CD) or Euler with the teacher D."""
  step_fn = {'heun': karras.heun_step, 'euler': karras.euler_step}[solver]
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
  """CM paper, Appendix C: mu(k) = exp(s0 ln(mu0) / N(k))."""
  return jnp.exp(start_scales * math.log(target_ema) / jnp.asarray(num_scales, jnp.float32))


def ict_num_scales(step, total_steps: int, start_scales: int, end_scales: int):
  """iCT eq. (11): N(k) = min(s0 2^floor(k / K'), s1) + 1, K' = floor(K / (log2 floor(s1/s0) + 1))."""
  doubling_steps = math.floor(total_steps / (math.log2(math.floor(end_scales / start_scales)) + 1))
  doublings = jnp.asarray(step, jnp.int32) // max(doubling_steps, 1)
  # Clip the exponent so 2**doublings cannot overflow int32 on very long runs.
  scales = start_scales * 2 ** jnp.minimum(doublings, 30).astype(jnp.float32)
  return (jnp.minimum(scales, end_scales) + 1).astype(jnp.int32)


def max_num_scales(cons_config, total_steps: int) -> int:
  """The largest N any step of the run uses (sizes the index distribution's support)."""
  if cons_config.scale_schedule == 'fixed':
    return cons_config.num_scales
  return cons_config.end_scales + 1


def num_scales_at(cons_config, step, total_steps: int):
  schedule = cons_config.scale_schedule
  if schedule == 'fixed':
    return jnp.asarray(cons_config.num_scales, jnp.int32)
  if schedule == 'ct':
    return ct_num_scales(step, total_steps, cons_config.start_scales, cons_config.end_scales)
  if schedule == 'ict':
    return ict_num_scales(step, total_steps, cons_config.start_scales, cons_config.end_scales)
  raise ConfigError(f"consistency.scale_schedule={schedule!r}: use 'fixed', 'ct' or 'ict'.")


def target_ema_at(cons_config, num_scales):
  if cons_config.target_ema_schedule == 'fixed':
    return jnp.asarray(cons_config.target_ema, jnp.float32)
  if cons_config.target_ema_schedule == 'ct':
    return ct_target_ema(num_scales, cons_config.start_scales, cons_config.target_ema)
  raise ConfigError(f'consistency.target_ema_schedule={cons_config.target_ema_schedule!r}: '
                    "use 'fixed' or 'ct'.")


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


def sample_indices(rng, batch_size: int, cons_config, model_config, num_scales, max_scales: int):
  """Index i in [0, N-2] of the pair (sigma_i, sigma_{i+1}) for each example."""
  if cons_config.noise_sampling == 'uniform':
    return jax.random.randint(rng, (batch_size,), 0, num_scales - 1)
  if cons_config.noise_sampling == 'lognormal':
    logits = lognormal_index_logits(num_scales, max_scales, model_config.sigma_min,
                                    model_config.sigma_max, model_config.rho, cons_config.p_mean,
                                    cons_config.p_std)
    return jax.random.categorical(rng, logits, shape=(batch_size,))
  raise ConfigError(f'consistency.noise_sampling={cons_config.noise_sampling!r}: '
                    "use 'uniform' or 'lognormal'.")


def loss_weight(weighting: str, sigma_hi: jax.Array, sigma_lo: jax.Array) -> jax.Array:
  if weighting == 'uniform':
    return jnp.ones_like(sigma_hi)
  if weighting == 'ict':  # iCT Sec. 3.4: lambda(sigma_i) = 1 / (sigma_{i+1} - sigma_i).
    return 1.0 / (sigma_hi - sigma_lo)
  raise ConfigError(f"consistency.weighting={weighting!r}: use 'uniform' or 'ict'.")


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
  params: Any = None


DISTANCES = ('l2', 'l1', 'pseudo_huber', 'lpips')


def make_distance(cons_config, image_shape, load_lpips: Callable[[], Any] | None = None) -> Distance:
  """The registry of distances; `image_shape` is (H, W, C)."""
  name = cons_config.distance
  if name == 'l2':
    return Distance(name, l2_distance)
  if name == 'l1':
    return Distance(name, l1_distance)
  if name == 'pseudo_huber':
    c = cons_config.huber_c
    if c < 0:
      c = ict_huber_c(math.prod(image_shape))
    return Distance(name, lambda x, y, params: pseudo_huber_distance(x, y, c))
  if name == 'lpips':
    from cm_jax.evaluation import lpips  # Heavy; only for runs that ask for it.
    params = (load_lpips or lpips.load_lpips)()
    return Distance(name, lambda x, y, p: lpips.lpips_distance(p, x, y), params)
  raise ConfigError(f'consistency.distance={name!r} is unknown: use one of {", ".join(DISTANCES)}.')


# ----------------------------------------------------------------------------------------------------
# The losses.
# ----------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ConsistencyLoss:
  """CD (teacher given) or CT (teacher None) loss over a config; see `__call__`."""
  cons_config: Any
  model_config: Any
  total_steps: int
  distance: Distance

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
    the same dropout key.
    """
    cons, model = self.cons_config, self.model_config
    batch = x0.shape[0]
    idx_rng, noise_rng, dropout_rng = jax.random.split(rng, 3)
    num_scales, _ = self.schedule(step)
    idx = sample_indices(idx_rng, batch, cons, model, num_scales, self.max_scales)
    grid = lambda i: karras.sigma_at(i, num_scales, model.sigma_min, model.sigma_max, model.rho)
    sigma_hi, sigma_lo = grid(idx), grid(idx + 1)
    noise = jax.random.normal(noise_rng, x0.shape, x0.dtype)
    x_hi = x0 + karras._bcast(sigma_hi, x0) * noise
    if ode_step is None:
      # CT (Alg. 3): the Euler step with the unbiased score estimate (x_hi - x0) / sigma_hi^2 lands
      # exactly on x0 + sigma_lo z, the same noise.
      x_lo = x0 + karras._bcast(sigma_lo, x0) * noise
    else:
      x_lo = ode_step(x_hi, sigma_hi, sigma_lo)
    x_lo = jax.lax.stop_gradient(x_lo)
    online = consistency_fn(params, x_hi, sigma_hi, dropout_rng)
    target = jax.lax.stop_gradient(consistency_fn(target_params, x_lo, sigma_lo, dropout_rng))
    dist = self.distance.fn(online, target, self.distance.params if distance_params is None
                            else distance_params)
    weight = loss_weight(cons.weighting, sigma_hi, sigma_lo)
    loss = jnp.mean(weight * dist)
    aux = {'num_scales': num_scales, 'mean_sigma': jnp.mean(sigma_hi),
           'distance': jnp.mean(dist)}
    return loss, aux


def update_target(target_params, params, mu):
  """theta- <- stop_grad(mu theta- + (1 - mu) theta) (CM Alg. 2/3, last line)."""
  return jax.tree.map(lambda t, p: jax.lax.stop_gradient(mu * t + (1.0 - mu) * p), target_params,
                      params)

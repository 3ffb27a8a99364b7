"""TrigFlow and the continuous-time consistency loss of sCM (Lu & Song 2024, arXiv 2410.11081 v2).

TrigFlow (Sec. 3): x_t = cos(t) x0 + sin(t) z, z ~ N(0, sd^2 I), t in [0, pi/2]; the PF-ODE is
dx_t/dt = sd F(x_t / sd, c_noise(t)) (eq. 3) and the consistency function is
f(x_t, t) = cos(t) x_t - sin(t) sd F(x_t / sd, c_noise(t)) (eq. 5). An EDM noise level is
sigma = sd tan(t), with x_edm = x_t / cos(t) (App. B.2, eq. 30).

The sCM objective (Sec. 4.2, eq. 8, Alg. 1): with theta- = stopgrad(theta),
  g = -cos^2(t) (sd F_theta- - dx_t/dt) - r cos(t) sin(t) (x_t + sd dF_theta-/dt),
  g <- g / (||g|| + c),
  L = e^{w(t)} / D ||F_theta - F_theta- - g||^2 - w(t),
whose gradient in theta is the continuous-time consistency gradient (eq. 2 with the prior weighting
1 / (sd tan t) folded into g's cos(t)). dF_theta-/dt is one forward-mode JVP through the network.

Everything here is a pure function of arrays and callables, so the tests can run it with closed forms
(Gaussian data) as well as with networks. `F` callables take (x_t, t) with x_t *unscaled*; the
division by sd happens inside them (cm_jax.models.Preconditioned.trigflow).
"""

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp

from cm_jax.errors import choose

# F(x_t, t) -> the TrigFlow network output F(x_t / sd, c_noise(t)), for x_t [B, ...] and t [B].
VelocityFn = Callable[[jax.Array, jax.Array], jax.Array]
# f(x_t, t) -> the consistency function's estimate of x0.
ConsistencyFn = Callable[[jax.Array, jax.Array], jax.Array]


def bcast(coef: jax.Array, x: jax.Array) -> jax.Array:
  """A per-example coefficient [B] shaped to multiply x [B, ...]."""
  return coef.reshape(coef.shape + (1,) * (x.ndim - coef.ndim))


# ----------------------------------------------------------------------------------------------------
# TrigFlow and its relation to EDM's sigma.
# ----------------------------------------------------------------------------------------------------
def time_from_sigma(sigma: jax.Array, sigma_data: float) -> jax.Array:
  """t = arctan(sigma / sd) (App. B.2, eq. 30)."""
  return jnp.arctan(sigma / sigma_data)


def sigma_from_time(t: jax.Array, sigma_data: float) -> jax.Array:
  """sigma = sd tan(t), EDM's noise level of TrigFlow time t."""
  return sigma_data * jnp.tan(t)


def noisy(x0: jax.Array, z: jax.Array, t: jax.Array) -> jax.Array:
  """x_t = cos(t) x0 + sin(t) z (Sec. 3); z has std sd."""
  return bcast(jnp.cos(t), x0) * x0 + bcast(jnp.sin(t), x0) * z


def conditional_velocity(x0: jax.Array, z: jax.Array, t: jax.Array) -> jax.Array:
  """dx_t/dt = cos(t) z - sin(t) x0 of one (x0, z) pair: sCT's unbiased estimate of the PF-ODE."""
  return bcast(jnp.cos(t), x0) * z - bcast(jnp.sin(t), x0) * x0


def consistency(x_t: jax.Array, t: jax.Array, velocity: jax.Array, sigma_data: float) -> jax.Array:
  """f(x_t, t) = cos(t) x_t - sin(t) sd F (eq. 5): f(x, 0) = x whatever the network outputs."""
  return bcast(jnp.cos(t), x_t) * x_t - bcast(jnp.sin(t), x_t) * sigma_data * velocity


def velocity_from_denoiser(denoiser: Callable[[jax.Array, jax.Array], jax.Array], x_t: jax.Array,
                           t: jax.Array, sigma_data: float) -> jax.Array:
  """F(x_t / sd, t) of an EDM denoiser D(x, sigma) (App. B.2): the F whose f(x_t, t) is D.

  x_edm = x_t / cos(t) at sigma = sd tan(t), and cos(t) x_t - sin(t) sd F = D(x_edm, sigma) solved
  for F. Divides by sin(t): for an EDM-preconditioned network use Preconditioned.trigflow, which is
  the same F without the cancellation near t = 0.
  """
  denoised = denoiser(x_t / bcast(jnp.cos(t), x_t), sigma_from_time(t, sigma_data))
  return (bcast(jnp.cos(t), x_t) * x_t - denoised) / (sigma_data * bcast(jnp.sin(t), x_t))


# noise.time_conditioning: what the network's c_noise is a function of. 'log_sigma' is EDM's
# ln(sigma) / 4; 'trigflow' is TrigFlow's t itself (Sec. 4.1, the identity transformation: with
# ln(sd tan t) / 4, sin(t) dc_noise/dt = 1 / (4 cos t) grows without bound as t -> pi/2).
TIME_CONDITIONINGS = ('log_sigma', 'trigflow')


def c_noise_of_sigma(sigma: jax.Array, kind: str, sigma_data: float, scale: float = 1.0) -> jax.Array:
  """c_noise at EDM noise level sigma, times noise.noise_cond_scale."""
  choose(dict.fromkeys(TIME_CONDITIONINGS), kind, 'noise.time_conditioning')
  if kind == 'trigflow':
    return scale * time_from_sigma(sigma, sigma_data)
  return scale * 0.25 * jnp.log(sigma)


def c_noise_of_time(t: jax.Array, kind: str, sigma_data: float, scale: float = 1.0) -> jax.Array:
  """c_noise at TrigFlow time t (the same conditioning as `c_noise_of_sigma`, differentiable in t)."""
  choose(dict.fromkeys(TIME_CONDITIONINGS), kind, 'noise.time_conditioning')
  if kind == 'trigflow':
    return scale * t
  return scale * 0.25 * jnp.log(sigma_from_time(t, sigma_data))


def sample_times(rng: jax.Array, batch_size: int, p_mean: float, p_std: float, sigma_data: float,
                 sigma_min: float, sigma_max: float) -> jax.Array:
  """t = arctan(e^tau / sd), tau ~ N(p_mean, p_std^2) (Alg. 1), with e^tau clipped to
  [sigma_min, sigma_max]: t stays away from 0 and pi/2 (about 1e-4 of the draws are clipped at the
  CIFAR-10 settings)."""
  sigma = jnp.exp(p_mean + p_std * jax.random.normal(rng, (batch_size,)))
  return time_from_sigma(jnp.clip(sigma, sigma_min, sigma_max), sigma_data)


# ----------------------------------------------------------------------------------------------------
# The tangent and its stabilisers.
# ----------------------------------------------------------------------------------------------------
def warmup_ratio(step, warmup_steps: int) -> jax.Array:
  """r = min(1, step / H) of the tangent warm-up (Sec. 4.2); H = 0 turns the warm-up off (r = 1)."""
  if warmup_steps <= 0:
    return jnp.ones((), jnp.float32)
  return jnp.minimum(1.0, jnp.asarray(step, jnp.float32) / warmup_steps)


def velocity_and_tangent(velocity_fn: VelocityFn, x_t: jax.Array, t: jax.Array, dxdt: jax.Array
                         ) -> tuple[jax.Array, jax.Array]:
  """(F, cos(t) sin(t) dF/dt) along the trajectory, by one jax.jvp (Sec. 5.1, JVP rearrangement).

  The tangent of the input is (cos t sin t dx_t/dt, cos t sin t): the factor that g multiplies dF/dt
  by is put into the JVP's input so the intermediate tangents stay small near t = 0 and pi/2. (The
  paper feeds x_t / sd with tangent cos t sin t sd; F here takes x_t, which is the same product.)
  """
  cs = jnp.cos(t) * jnp.sin(t)
  return jax.jvp(velocity_fn, (x_t, t), (bcast(cs, dxdt) * dxdt, cs))


def tangent(velocity: jax.Array, velocity_tangent: jax.Array, x_t: jax.Array, dxdt: jax.Array,
            t: jax.Array, sigma_data: float, warmup: jax.Array) -> jax.Array:
  """g = -cos^2(t) (sd F - dx_t/dt) - r (cos t sin t x_t + sd cos t sin t dF/dt) (Alg. 1).

  g = cos(t) df/dt (eq. 6) at r = 1; `velocity_tangent` is cos t sin t dF/dt from
  `velocity_and_tangent`. At r = 0 only the first term remains: a velocity-matching (diffusion) loss.
  """
  c, s = jnp.cos(t), jnp.sin(t)
  first = -bcast(c * c, x_t) * (sigma_data * velocity - dxdt)
  second = -(bcast(c * s, x_t) * x_t + sigma_data * velocity_tangent)
  return first + warmup * second


def _per_example_norm(g: jax.Array) -> jax.Array:
  return jnp.sqrt(jnp.sum(g.reshape(g.shape[0], -1) ** 2, axis=1))


TANGENT_NORMS = {
    # g / (RMS(g) + c): NVlabs/FastGen's default (g_norm_spatial_invariance), c independent of size.
    'rms': lambda g, c: g / (bcast(_per_example_norm(g) / math.sqrt(g[0].size), g) + c),
    # g / (||g||_2 + c) over the whole example: the paper's text.
    'l2': lambda g, c: g / (bcast(_per_example_norm(g), g) + c),
    # clip(g, -1, 1): the paper's alternative (Sec. 4.2, Fig. 5a).
    'clip': lambda g, c: jnp.clip(g, -1.0, 1.0),
    'none': lambda g, c: g,
}


def normalise_tangent(g: jax.Array, kind: str, const: float) -> jax.Array:
  """Tangent normalisation (Sec. 4.2): scm.tangent_norm with c = scm.tangent_norm_const."""
  return choose(TANGENT_NORMS, kind, 'scm.tangent_norm')(g, const)


# ----------------------------------------------------------------------------------------------------
# The loss.
# ----------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ScmLoss:
  """The sCM loss over config.scm and config.noise (sigma_data, sigma_min, sigma_max); see __call__.

  Each stabiliser is a field: `warmup_steps` (0: off), `tangent_norm` ('rms', 'l2', 'clip', 'none')
  with `tangent_norm_const`, `prior_weighting` (an extra 1 / (sd tan t) on the loss, as FastGen; the
  paper has it only inside g) and the adaptive weighting (a `log_weight` function given to the call).
  """
  sigma_data: float
  sigma_min: float
  sigma_max: float
  p_mean: float
  p_std: float
  warmup_steps: int = 10_000
  tangent_norm: str = 'rms'
  tangent_norm_const: float = 0.1
  prior_weighting: bool = False

  def __post_init__(self):
    choose(TANGENT_NORMS, self.tangent_norm, 'scm.tangent_norm')

  @classmethod
  def from_config(cls, scm_config, noise_config) -> 'ScmLoss':
    s, n = scm_config, noise_config
    return cls(sigma_data=n.sigma_data, sigma_min=n.sigma_min, sigma_max=n.sigma_max,
               p_mean=s.p_mean, p_std=s.p_std, warmup_steps=s.tangent_warmup_steps,
               tangent_norm=s.tangent_norm, tangent_norm_const=s.tangent_norm_const,
               prior_weighting=s.prior_weighting)

  def __call__(self, velocity_fn: Callable, params, x0: jax.Array, rng: jax.Array, step,
               teacher_velocity: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
               log_weight: Callable[[jax.Array], jax.Array] | None = None,
               tangent_fn: VelocityFn | None = None) -> tuple[jax.Array, dict]:
    """sCD (`teacher_velocity` given: dx_t/dt = teacher_velocity(x_t, t)) or sCT (None: the
    conditional velocity of the pair) loss of `velocity_fn(params, x_t, t)` (Alg. 1): t from the
    log-normal proposal, z ~ N(0, sd^2 I), then `objective`. Returns (loss, aux)."""
    time_rng, noise_rng = jax.random.split(rng)
    t = sample_times(time_rng, x0.shape[0], self.p_mean, self.p_std, self.sigma_data,
                     self.sigma_min, self.sigma_max)
    z = self.sigma_data * jax.random.normal(noise_rng, x0.shape, x0.dtype)
    per_example, aux = self.objective(velocity_fn, params, x0, z, t, step, teacher_velocity,
                                      log_weight, tangent_fn)
    return jnp.mean(per_example), aux

  def objective(self, velocity_fn: Callable, params, x0: jax.Array, z: jax.Array, t: jax.Array, step,
                teacher_velocity: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
                log_weight: Callable[[jax.Array], jax.Array] | None = None,
                tangent_fn: VelocityFn | None = None) -> tuple[jax.Array, dict]:
    """The per-example sCM loss [B] at given x0, z (std sd) and t, and its aux.

    F_theta and the tangent come from one jax.jvp of velocity_fn(params, .), whose primal output
    carries the gradient and whose tangent is under stop_gradient: theta- = stopgrad(theta) with the
    same dropout key, and one network pass less than a separate forward and JVP. `tangent_fn(x_t, t)`,
    when given, computes the JVP instead (e.g. the network in float32 while training in bfloat16).
    `log_weight(t)` is the adaptive weighting w_phi(t) (None: w = 0, no adaptive weighting).
    """
    batch = x0.shape[0]
    sd = self.sigma_data
    x_t = noisy(x0, z, t)
    if teacher_velocity is None:
      dxdt = conditional_velocity(x0, z, t)
    else:
      dxdt = jax.lax.stop_gradient(teacher_velocity(x_t, t))
    velocity, velocity_tangent = velocity_and_tangent(lambda x, tt: velocity_fn(params, x, tt),
                                                      x_t, t, dxdt)
    if tangent_fn is not None:
      _, velocity_tangent = velocity_and_tangent(tangent_fn, x_t, t, dxdt)
    velocity_minus = jax.lax.stop_gradient(velocity)
    velocity_tangent = jax.lax.stop_gradient(velocity_tangent)

    warmup = warmup_ratio(step, self.warmup_steps)
    g = tangent(velocity_minus, velocity_tangent, x_t, dxdt, t, sd, warmup)
    g_rms = jnp.sqrt(jnp.mean(g.reshape(batch, -1) ** 2, axis=1))
    g = normalise_tangent(g, self.tangent_norm, self.tangent_norm_const)
    # e^w / D ||.||^2 is e^w times the mean over the D dimensions.
    mse = jnp.mean(((velocity - velocity_minus - g) ** 2).reshape(batch, -1), axis=1)
    weight = 1.0 / sigma_from_time(t, sd) if self.prior_weighting else jnp.ones_like(t)
    if log_weight is None:
      w = jnp.zeros_like(t)
      per_example = weight * mse
    else:
      w = log_weight(t).astype(jnp.float32)
      per_example = jnp.exp(w) * weight * mse - w
    aux = {'mean_t': jnp.mean(t), 'tangent_rms': jnp.mean(g_rms), 'warmup': warmup,
           'mse': jnp.mean(mse), 'log_weight': jnp.mean(w)}
    return per_example, aux


# ----------------------------------------------------------------------------------------------------
# Sampling.
# ----------------------------------------------------------------------------------------------------
def multistep_sample(consistency_fn: ConsistencyFn, rng: jax.Array, shape, times, sigma_data: float,
                     clip_denoised: bool = False) -> jax.Array:
  """1-step and multistep sampling in TrigFlow (CM Alg. 1; sCM Sec. 5.2, App. G.2).

  x = sd z at t_max = times[0]; x0 = f(x, t_max); then for each later t:
  x0 = f(cos(t) x0 + sin(t) sd z', t). `times` decrease (the paper's 2-step: t_max, 1.1) and may be
  a traced array; `clip_denoised` clamps every x0 to [-1, 1] before it is re-noised.
  """
  num = len(times)
  rngs = jax.random.split(rng, num)
  batch = shape[0]
  times = jnp.asarray(times, jnp.float32)

  def denoise(x, t):
    x0 = consistency_fn(x, jnp.full((batch,), t))
    return jnp.clip(x0, -1.0, 1.0) if clip_denoised else x0

  x0 = denoise(sigma_data * jax.random.normal(rngs[0], shape), times[0])
  for i in range(1, num):
    z = sigma_data * jax.random.normal(rngs[i], shape)
    x0 = denoise(jnp.cos(times[i]) * x0 + jnp.sin(times[i]) * z, times[i])
  return x0

"""Samplers: consistency-model one-step and multistep sampling (CM paper Alg. 1), EDM's ODE sampler, the
PF-ODE as a consistency function and as an encoder, and the greedy ternary search of time points.

Each sampler is a pure function of (a consistency function or a denoiser, an RNG key or inputs); the
methods offer them by name and `cm_jax.inference` wraps them in `jax.jit` with shardings. Usage:

  f = model.consistency_fn(params, labels)           # f(x, sigma[B]) -> x at sigma_min
  x = multistep_sample(f, key, (64, 8, 8, 1), [80.0, 0.66], sigma_min=0.002)  # 2 NFE
"""

import logging
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cm_jax import karras
from cm_jax.errors import ConfigError

ConsistencyFn = Callable[[jax.Array, jax.Array], jax.Array]  # f(x, sigma[B]) -> x0
# A sampler as the CLI and the training loop use it: fn(params, rng, labels, shape) -> images.
SampleFn = Callable[..., jax.Array]


def _is_traced(values) -> bool:
  return isinstance(values, jax.core.Tracer)


def check_time_points(sigmas: Sequence[float], sigma_min: float, what: str = 'time points'
                      ) -> list[float]:
  """The levels of Alg. 1 that cost a network evaluation: strictly decreasing, above sigma_min.

  Levels at sigma_min are dropped: noising to eps adds nothing and f(x, eps) = x.
  """
  sigmas = [float(s) for s in sigmas if float(s) > sigma_min * (1 + 1e-6)]
  if not sigmas:
    raise ConfigError(f'multistep sampling needs at least one time point above sigma_min={sigma_min}; '
                      f'got {what} that are all at or below it.')
  if any(a <= b for a, b in zip(sigmas, sigmas[1:])):
    raise ConfigError(f'multistep {what} must decrease strictly; got sigmas {sigmas}. Pass sigmas from '
                      'sigma_max down, or indices on the N-grid in increasing order (0 = sigma_max).')
  return sigmas


def consistency_steps(consistency_fn: ConsistencyFn, rngs: jax.Array, x: jax.Array, sigmas,
                      sigma_min: float, project: Callable[[jax.Array], jax.Array] | None = None,
                      clip_denoised: bool = False) -> jax.Array:
  """The loop of CM Alg. 1 (and of Alg. 4 with `project`) from x, a noisy input at level sigmas[0].

  x <- P(f(x, sigmas[0])); then for each later tau: x <- P(f(x + sqrt(tau^2 - eps^2) z, tau)), with z
  drawn from rngs[i] for the i-th later level. P is the editing projection of Alg. 4 (identity when
  None); `clip_denoised` clamps f's output to the image range [-1, 1] first, as the reference code's
  samplers do. `sigmas` may be a traced array (then no level is skipped).
  """
  batch = x.shape[0]

  def denoise(x_noisy, sigma):
    x0 = consistency_fn(x_noisy, jnp.full((batch,), sigma, x_noisy.dtype))
    if clip_denoised:
      x0 = jnp.clip(x0, -1.0, 1.0)
    return x0 if project is None else project(x0)

  x = denoise(x, sigmas[0])
  for i in range(1, len(sigmas)):
    z = jax.random.normal(rngs[i - 1], x.shape, x.dtype)
    # Alg. 1, line 5: the std that brings x_eps to x_tau exactly is sqrt(tau^2 - eps^2).
    x = denoise(x + jnp.sqrt(jnp.maximum(sigmas[i] ** 2 - sigma_min ** 2, 0.0)) * z, sigmas[i])
  return x


def multistep_sample(consistency_fn: ConsistencyFn, rng: jax.Array, shape, sigmas,
                     sigma_min: float, clip_denoised: bool = False) -> jax.Array:
  """CM paper Alg. 1: x = T z, x <- f(x, T); then for each tau: x <- f(x + sqrt(tau^2 - eps^2) z, tau).

  `sigmas` is the decreasing list [T, tau_1, ...]; levels at sigma_min are skipped, since noising to
  eps adds nothing and f(x, eps) = x. One network evaluation per remaining level. A traced array of
  sigmas (one compilation for many time points, as the ternary search wants) is used as it is.
  """
  if not _is_traced(sigmas):
    sigmas = check_time_points(sigmas, sigma_min)
  rngs = jax.random.split(rng, len(sigmas))
  x = sigmas[0] * jax.random.normal(rngs[0], shape)
  return consistency_steps(consistency_fn, rngs[1:], x, sigmas, sigma_min,
                           clip_denoised=clip_denoised)


def onestep_sample(consistency_fn: ConsistencyFn, rng: jax.Array, shape, sigma_max: float,
                   sigma_min: float) -> jax.Array:
  """One-step generation x = f(T z, T) (CM paper Alg. 1 with no intermediate time point)."""
  return multistep_sample(consistency_fn, rng, shape, [sigma_max], sigma_min)


def sigmas_from_indices(ts: Sequence[int], num_scales: int, noise_config) -> list[float]:
  """Time points given as indices on the N-grid (0 = sigma_max, N-1 = sigma_min) as sigmas."""
  for t in ts:
    if not 0 <= int(t) < num_scales:
      raise ConfigError(f'sampling.ts={tuple(ts)} has index {t} outside the N-grid [0, {num_scales - 1}] '
                        f'(N = {num_scales}); pass indices on that grid or sigmas via sampling.sigmas.')
  grid = np.asarray(karras.karras_sigmas(num_scales, noise_config.sigma_min, noise_config.sigma_max,
                                         noise_config.rho))
  return [float(grid[int(t)]) for t in ts]


def clipped(denoiser: karras.Denoiser) -> karras.Denoiser:
  """The denoiser with its output clamped to the image range [-1, 1] (the ImageNet-64 reference's
  Heun sampler clamps at every evaluation)."""
  return lambda x, sigma: jnp.clip(denoiser(x, sigma), -1.0, 1.0)


def edm_sample(denoiser: karras.Denoiser, rng: jax.Array, shape, num_steps: int, noise_config,
               solver: str = 'heun') -> jax.Array:
  """EDM's deterministic sampler over a Karras grid of `num_steps` levels (18 Heun steps = 35 NFE)."""
  sigmas = karras.karras_sigmas(num_steps, noise_config.sigma_min, noise_config.sigma_max,
                                noise_config.rho)
  return karras.ode_sample(denoiser, jax.random.normal(rng, shape), sigmas, solver)


# --------------------------------------------------------------------------------------------------
# The PF-ODE of an EDM denoiser as a consistency function, and as an encoder (data -> noise).
# --------------------------------------------------------------------------------------------------
def ode_consistency_fn(denoiser: karras.Denoiser, num_steps: int, sigma_min: float, rho: float,
                       solver: str = 'heun') -> ConsistencyFn:
  """f(x, sigma) = the PF-ODE solution at sigma_min, by `num_steps` levels of a Karras grid from sigma.

  The consistency function a consistency model learns (CM paper eq. 3), computed with the teacher: it
  lets every editor of `cm_jax.editing` run on an EDM run. Costs 2 num_steps - 2 NFE with Heun.
  """
  if num_steps < 2:
    raise ConfigError(f'sampling.num_steps={num_steps}: the ODE consistency function needs >= 2 levels.')
  step_fn = karras.solver(solver).step

  def consistency_fn(x, sigma):
    # A Karras grid from each example's sigma (as sigma_max) down to sigma_min: [num_steps, B].
    grid = karras.sigma_at(jnp.arange(num_steps)[:, None], num_steps, sigma_min, sigma[None, :], rho)

    def body(i, x):
      # A zero-length step (sigma already at sigma_min) leaves x as it is.
      return step_fn(denoiser, x, grid[i], grid[i + 1])
    return jax.lax.fori_loop(0, num_steps - 1, body, x)
  return consistency_fn


def ode_consistency_nfe(num_steps: int, solver: str = 'heun') -> int:
  """Network evaluations of one `ode_consistency_fn` call: num_steps - 1 steps, none to sigma = 0."""
  return (num_steps - 1) * karras.solver(solver).nfe_per_step


def ode_encode(denoiser: karras.Denoiser, images: jax.Array, num_steps: int, noise_config,
               solver: str = 'heun') -> jax.Array:
  """The initial noise z of clean `images`: the PF-ODE run from sigma_min up to T, divided by T.

  The inverse of one-step generation x = f(T z, T) up to the solver's error (a consistency model maps
  T z back to the ODE's end point), so images can be interpolated in noise space (CM paper, Sec. 6).
  """
  m = noise_config
  sigmas = karras.karras_sigmas(num_steps, m.sigma_min, m.sigma_max, m.rho)[::-1]  # Increasing.
  step_fn = karras.solver(solver).step
  batch = images.shape[0]

  def body(i, x):
    return step_fn(denoiser, x, jnp.full((batch,), sigmas[i]), jnp.full((batch,), sigmas[i + 1]))
  return jax.lax.fori_loop(0, num_steps - 1, body, images) / m.sigma_max


# --------------------------------------------------------------------------------------------------
# Greedy ternary search of intermediate time points (CM paper, Sec. 6 and its reference scripts).
# --------------------------------------------------------------------------------------------------
def ternary_search(score_fn: Callable[[tuple[int, ...]], float], before: Sequence[int],
                   after: Sequence[int], upper: int | None = None) -> int:
  """The index p strictly between before[-1] and after[0] minimising score_fn(before + (p,) + after).

  Ternary search over the integers, which assumes the score is unimodal in p (the paper's finding for
  FID); the last two or three candidates are compared directly. `score_fn` sees whole index tuples
  on the N-grid (0 = sigma_max) and should be memoised by the caller if evaluations are costly.
  `upper` caps p below after[0] - 1 (room for later points of a greedy search).
  """
  before, after = tuple(int(t) for t in before), tuple(int(t) for t in after)
  lo, hi = before[-1] + 1, after[0] - 1
  if upper is not None:
    hi = min(hi, int(upper))
  if lo > hi:
    raise ConfigError(f'No index lies strictly between {before[-1]} and {after[0]} on the N-grid: '
                      'use fewer search steps or a finer grid (consistency.num_scales).')
  score = lambda p: score_fn(before + (p,) + after)
  while hi - lo > 2:
    m1, m2 = lo + (hi - lo) // 3, hi - (hi - lo) // 3
    if score(m1) < score(m2):
      hi = m2 - 1  # For a unimodal score the minimum is left of m2.
    else:
      lo = m1 + 1
  return min(range(lo, hi + 1), key=score)


def greedy_time_search(score_fn: Callable[[tuple[int, ...]], float], num_scales: int,
                       num_steps: int) -> tuple[tuple[int, ...], dict[tuple[int, ...], float]]:
  """Greedy search of `num_steps`-step time points on an N-grid of `num_scales` levels (CM Sec. 6).

  Step 2's point is found by ternary search between 0 (T) and N-1 (eps); each later point between the
  previous one and N-1, the earlier ones held fixed. Returns (ts, every score evaluated); ts ends with
  N-1, which costs no network evaluation (see `multistep_sample`).
  """
  if num_steps < 2:
    raise ConfigError(f'sampling.search_steps={num_steps}: the search needs >= 2 steps (1 step has no '
                      'intermediate time point).')
  if num_steps > num_scales - 1:
    raise ConfigError(f'sampling.search_steps={num_steps} needs an N-grid of more than {num_steps} '
                      f'levels; this run has N = {num_scales}.')
  scores = {}

  def memo(ts):
    if ts not in scores:
      scores[ts] = float(score_fn(ts))
      logging.info('Time search: ts=%s scores %.5g.', ts, scores[ts])
    return scores[ts]

  ts = (0,)
  end = (num_scales - 1,)
  for k in range(num_steps - 1):
    later = num_steps - 2 - k  # Points still to place after this one, each on its own index.
    ts += (ternary_search(memo, ts, end, upper=num_scales - 2 - later),)
  return ts + end, scores

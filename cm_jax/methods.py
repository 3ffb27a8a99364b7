"""The method-specific hooks the generic training loop calls: EDM, consistency distillation, CT/iCT.

A method supplies the loss, any extra trained-state pytrees (the consistency target network) and
their update, and the samplers. The loop knows nothing else about it.
"""

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from cm_jax import consistency, karras, sampling
from cm_jax.errors import ConfigError
from cm_jax.models import Preconditioned

METHODS = ('edm', 'cd', 'ct')
SAMPLERS = ('heun', 'euler', 'onestep', 'multistep', 'teacher_heun')


@dataclasses.dataclass(frozen=True)
class Method:
  name: str
  config: Any
  model: Preconditioned
  cm_loss: consistency.ConsistencyLoss | None = None

  @property
  def is_consistency(self) -> bool:
    return self.name in ('cd', 'ct')

  def init_extra(self, params) -> dict:
    # The target network starts as a copy of the online one (CM Alg. 2/3: theta- <- theta).
    return {'target_params': params} if self.is_consistency else {}

  def frozen_keys(self) -> tuple[str, ...]:
    keys = ('teacher_params',) if self.name == 'cd' else ()
    if self.cm_loss is not None and self.cm_loss.distance.params is not None:
      keys += ('distance_params',)
    return keys

  def loss_fn(self, params, extra, frozen, batch, rng, step):
    labels = batch['label'] if self.config.model.num_classes > 0 else None
    x0 = batch['image']
    if self.name == 'edm':
      return edm_loss(self.model, self.config.edm, params, x0, labels, rng)
    consistency_fn = lambda p, x, sigma, key: self.model.consistency(p, x, sigma, labels, train=True,
                                                                     rng=key)
    ode_step = None
    if self.name == 'cd':
      ode_step = consistency.teacher_ode_step(
          self.model.denoiser_fn(frozen['teacher_params'], labels),
          self.config.consistency.teacher_solver)
    return self.cm_loss(consistency_fn, params, extra['target_params'], x0, rng, step, ode_step,
                        frozen.get('distance_params'))

  def update_extra(self, extra, params, step):
    if not self.is_consistency:
      return extra, {}
    _, mu = self.cm_loss.schedule(step)
    return {'target_params': consistency.update_target(extra['target_params'], params, mu)}, {
        'target_ema': mu}

  def default_sampler(self) -> str:
    return 'heun' if self.name == 'edm' else 'multistep'

  def sampler(self, name: str) -> tuple[Callable, int]:
    """(fn(params, rng, labels, shape) -> images, NFE) for a sampler name."""
    s, m = self.config.sampling, self.config.model
    if name in ('heun', 'euler', 'teacher_heun'):
      solver = 'euler' if name == 'euler' else 'heun'
      if self.is_consistency and name != 'teacher_heun':
        raise ConfigError(f"sampling.sampler='{name}' runs the EDM ODE and needs an EDM network; a "
                          f"{self.name} run samples with 'onestep' or 'multistep' "
                          "('teacher_heun' samples a CD run's teacher).")
      if name == 'teacher_heun' and self.name != 'cd':
        raise ConfigError("sampling.sampler='teacher_heun' needs a CD run (it samples the teacher).")
      fn = lambda params, rng, labels, shape: sampling.edm_sample(
          self.model.denoiser_fn(params, labels), rng, shape, s.num_steps, m, solver)
      return fn, karras.ode_nfe(s.num_steps, solver)
    if name in ('onestep', 'multistep'):
      if not self.is_consistency:
        raise ConfigError(f"sampling.sampler='{name}' needs a consistency model (method cd or ct); "
                          "an EDM run samples with 'heun' or 'euler'.")
      sigmas = [m.sigma_max] if name == 'onestep' else self.multistep_sigmas()
      fn = lambda params, rng, labels, shape: sampling.multistep_sample(
          self.model.consistency_fn(params, labels), rng, shape, sigmas, m.sigma_min)
      return fn, sum(1 for x in sigmas if x > m.sigma_min * (1 + 1e-6))
    raise ConfigError(f'sampling.sampler={name!r} is unknown: use one of {", ".join(SAMPLERS)}.')

  def multistep_sigmas(self) -> list[float]:
    s = self.config.sampling
    if len(s.sigmas):
      return [float(x) for x in s.sigmas]
    num_scales = consistency.max_num_scales(self.config.consistency, self.config.training.num_steps)
    return sampling.sigmas_from_indices(s.ts, num_scales, self.config.model)


def edm_loss(model: Preconditioned, edm_config, params, x0, labels, rng):
  """EDM training loss (EDM eq. 2 with Table 1's sigma distribution and weighting)."""
  sigma_rng, noise_rng, dropout_rng = jax.random.split(rng, 3)
  sigma = karras.edm_loss_sigmas(sigma_rng, x0.shape[0], edm_config.p_mean, edm_config.p_std)
  noisy = x0 + karras._bcast(sigma, x0) * jax.random.normal(noise_rng, x0.shape)
  denoised = model.denoise(params, noisy, sigma, labels, train=True, rng=dropout_rng)
  weight = karras.edm_loss_weight(sigma, model.model_config.sigma_data)
  per_example = jnp.mean(((denoised - x0) ** 2).reshape(x0.shape[0], -1), axis=1)
  return jnp.mean(weight * per_example), {'mean_sigma': jnp.mean(sigma)}


def build(config, model: Preconditioned, image_shape, load_lpips=None) -> Method:
  if config.method not in METHODS:
    raise ConfigError(f'method={config.method!r} is unknown: use one of {", ".join(METHODS)}.')
  cm_loss = None
  if config.method in ('cd', 'ct'):
    distance = consistency.make_distance(config.consistency, image_shape, load_lpips)
    cm_loss = consistency.ConsistencyLoss(config.consistency, config.model,
                                          config.training.num_steps, distance)
  return Method(config.method, config, model, cm_loss)

"""What consistency distillation and consistency training share: the consistency loss over the
Karras N-grid, the target network theta- and its EMA, and the 1-step / multistep samplers (CM paper
Alg. 1-3). `cd.py` and `ct.py` differ only in where the lower point of a pair comes from."""

import numpy as np

from cm_jax import consistency, errors, karras, sampling
from cm_jax.errors import ConfigError
from cm_jax.methods.base import OWN_PARAMS, Method, Sampler


def _lpips_distance(cons_config, image_shape):
  """LPIPS of images in [-1, 1] (f's outputs, unscaled: the LPIPS scaling layer expects that range,
  and piq's normalisation of (x + 1) / 2 is the same map), upsampled to 224 when smaller."""
  del image_shape
  from cm_jax.evaluation import lpips  # pylint: disable=g-import-not-at-top  # Heavy; only when asked.
  errors.choose(lpips.POOLINGS, cons_config.lpips_pooling, 'consistency.lpips_pooling')
  # Records written before the field existed computed LPIPS in float32.
  dtype = errors.choose(lpips.DTYPES, cons_config.get('lpips_dtype', 'float32'),
                        'consistency.lpips_dtype')
  return lambda x, y, params: lpips.lpips_distance(params, x, y, pooling=cons_config.lpips_pooling,
                                                   dtype=dtype)


# Beyond consistency.DISTANCES: the distances that need weights, a frozen input of the step.
WEIGHTED_DISTANCES = {'lpips': _lpips_distance}
DISTANCE_PARAMS = 'distance_params'


class ConsistencyModel(Method):
  """The shared part of CD and CT; a subclass says how x at the lower level is made (`ode_step`)."""
  default_sampler = 'multistep'
  encoder = None  # A consistency model has no PF-ODE of its own (CD encodes with its teacher's).

  def __init__(self, config, model, image_shape):
    super().__init__(config, model, image_shape)
    distance = consistency.make_distance(config.consistency, image_shape, WEIGHTED_DISTANCES)
    self.cm_loss = consistency.ConsistencyLoss(config.consistency, config.noise,
                                               config.training.num_steps, distance)

  @classmethod
  def check_config(cls, config) -> None:
    c = config.consistency
    if c.scale_schedule == 'fixed' and c.num_scales < 2:
      raise ConfigError(f'consistency.num_scales={c.num_scales} must be >= 2.')
    if c.scale_schedule != 'fixed' and not 1 <= c.start_scales <= c.end_scales:
      raise ConfigError(f'consistency.start_scales={c.start_scales} and end_scales={c.end_scales} '
                        'must satisfy 1 <= start_scales <= end_scales.')
    if c.target_ema_schedule == 'ct' and not 0.0 < c.target_ema < 1.0:
      raise ConfigError(f'consistency.target_ema={c.target_ema} must be in (0, 1) with the CT '
                        'schedule (mu0).')
    if not 0.0 <= c.target_ema < 1.0:
      raise ConfigError(f'consistency.target_ema={c.target_ema} must be in [0, 1).')

  # ---- Training. ----
  def frozen_inputs(self, resources):
    if self.config.consistency.distance in WEIGHTED_DISTANCES:
      return {DISTANCE_PARAMS: resources.lpips_params}
    return {}

  def schedule_needs_num_steps(self) -> bool:
    return self.config.consistency.scale_schedule != 'fixed'

  def init_extra(self, params) -> dict:
    # The target network starts as a copy of the online one (CM Alg. 2/3: theta- <- theta).
    return {'target_params': params}

  def ode_step(self, frozen: dict, labels) -> consistency.OdeStep | None:
    """From x at the upper level to the lower one: None for CT's shared noise (Alg. 3)."""
    raise NotImplementedError

  def loss(self, params, extra, frozen, batch, rng, step):
    labels = self.labels_of(batch['label'])
    consistency_fn = lambda p, x, sigma, key: self.model.consistency(p, x, sigma, labels, train=True,
                                                                     rng=key)
    return self.cm_loss(consistency_fn, params, extra['target_params'], batch['image'], rng, step,
                        self.ode_step(frozen, labels), frozen.get(DISTANCE_PARAMS))

  def update_extra(self, extra, params, step):
    _, mu = self.cm_loss.schedule(step)
    return ({'target_params': consistency.update_target(extra['target_params'], params, mu)},
            {'target_ema': mu})

  # ---- Inference. ----
  def samplers(self):
    n = self.config.noise
    multistep = lambda: self.multistep_sigmas()
    return {'onestep': lambda: self.multistep_sampler([n.sigma_max]),
            'multistep': lambda: self.multistep_sampler(multistep(), {'sigmas': multistep()})}

  def multistep_sampler(self, sigmas, info: dict | None = None) -> Sampler:
    """CM Alg. 1 over `sigmas`; one network evaluation per level above sigma_min."""
    sigmas = sampling.check_time_points(sigmas, self.config.noise.sigma_min)
    return Sampler(self.multistep_fn(sigmas), len(sigmas), OWN_PARAMS, info or {})

  def multistep_fn(self, sigmas):
    sigma_min, clip = self.config.noise.sigma_min, self.config.sampling.clip_denoised
    return lambda params, rng, labels, shape: sampling.multistep_sample(
        self.model.consistency_fn(params, labels), rng, shape, sigmas, sigma_min, clip)

  def multistep_sigmas(self) -> list[float]:
    """sampling.sigmas, else sampling.ts as indices on the run's final N-grid."""
    s = self.config.sampling
    if len(s.sigmas):
      return [float(x) for x in s.sigmas]
    return sampling.sigmas_from_indices(s.ts, self.num_scales(), self.config.noise)

  def num_scales(self) -> int:
    """N of the run's final grid (the grid of its time points)."""
    return consistency.max_num_scales(self.config.consistency, self.config.training.num_steps)

  def time_grid(self) -> np.ndarray:
    n = self.config.noise
    return np.asarray(karras.karras_sigmas(self.num_scales(), n.sigma_min, n.sigma_max, n.rho),
                      np.float32)

  def edit_consistency_fn(self, params, labels):
    return self.model.consistency_fn(params, labels)

  def edit_nfe_per_step(self) -> int:
    return 1

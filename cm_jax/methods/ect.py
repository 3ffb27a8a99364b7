"""Easy Consistency Tuning (ECT; Geng et al. 2024, "Consistency Models Made Easy", arXiv 2406.14548).

A consistency model tuned from a pretrained diffusion model with a continuous-time consistency loss
whose step t - r shrinks in stages. Every constant follows locuslab/ect: `training/loss.py`
(`ECMLoss`) and `training/ct_training_loop.py` on its main branch (CIFAR-10), and the same files on its
`imgnet` branch (ImageNet 64, EDM weighting and c > 0). Per step, for each example:

  t ~ LogNormal(P_mean, P_std^2);  r = max(0, t (1 - q^-(stage+1) n(t))),  n(t) = 1 + k sigmoid(-b t)
  x_t = x0 + t e,  x_r = x0 + r e   (one noise draw e for both)
  loss = w(t, r) (sqrt(||f(x_t, t) - sg[f(x_r, r)]||^2 + c^2) - c),  sg[f(x_r, 0)] := x0

with both calls of f under the same dropout key, the target from the online weights (no target
network), and the stage advancing every `ect.stage_images` images. No teacher is called: the teacher
run only provides the starting weights.

The maths are the pure functions below; `ECT` wires them into the Method protocol.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from cm_jax import consistency, karras
from cm_jax.errors import ConfigError, choose
from cm_jax.methods.base import InitialWeights
from cm_jax.methods.consistency_model import ConsistencyModel


# --------------------------------------------------------------------------------------------------
# The stage schedule and the mapping t -> r.
# --------------------------------------------------------------------------------------------------
def steps_per_stage(stage_images: int, batch_size: int) -> int:
  """Training steps per stage: the stage length in images over the global batch, at least 1."""
  return max(round(stage_images / batch_size), 1)


def stage_at(step, stage_steps: int) -> jax.Array:
  """The stage of a 0-based training step: floor(max(step - 1, 0) / stage_steps).

  The reference's first tick is a single iteration and it checks for a new stage after each tick, so
  its stage s starts at iteration s * stage_steps + 1, not s * stage_steps.
  """
  return jnp.maximum(jnp.asarray(step, jnp.int32) - 1, 0) // stage_steps


def shrink_factor(stage, q: float) -> jax.Array:
  """q^-(stage + 1): t - r is this fraction of n(t) t (ECMLoss's `decay`)."""
  return jnp.power(jnp.float32(q), -(jnp.asarray(stage, jnp.float32) + 1.0))


# n(t) by ect.mapping: 'sigmoid' is ECT's default (1 + k sigmoid(-b t): larger steps at small t),
# 'constant' its constant-ratio variant (r = t (1 - q^-(stage+1))).
MAPPINGS = {
    'sigmoid': lambda t, k, b: 1.0 + k * jax.nn.sigmoid(-b * t),
    'constant': lambda t, k, b: jnp.ones_like(t),
}


def r_of_t(t: jax.Array, stage, q: float, mapping: str = 'sigmoid', k: float = 8.0,
           b: float = 1.0) -> jax.Array:
  """ECT's mapping: r = max(0, t (1 - q^-(stage+1) n(t))) (ECMLoss.t_to_r_sigmoid / _const)."""
  n_t = choose(MAPPINGS, mapping, 'ect.mapping')(t, k, b)
  return jnp.maximum(t * (1.0 - shrink_factor(stage, q) * n_t), 0.0)


# --------------------------------------------------------------------------------------------------
# Weighting and distance.
# --------------------------------------------------------------------------------------------------
# w(t, r) by ect.weighting: 'inverse_gap' 1 / (t - r) (main branch, CIFAR-10), 'edm' EDM's
# lambda(t) = (t^2 + sd^2) / (t sd)^2 = 1/t^2 + 1/sd^2 (imgnet branch's 'snrpk').
WEIGHTINGS = {
    'inverse_gap': lambda t, r, sigma_data: 1.0 / (t - r),
    'edm': lambda t, r, sigma_data: karras.edm_loss_weight(t, sigma_data),
}


def loss_weight(weighting: str, t: jax.Array, r: jax.Array, sigma_data: float) -> jax.Array:
  return choose(WEIGHTINGS, weighting, 'ect.weighting')(t, r, sigma_data)


def distance(x: jax.Array, y: jax.Array, c: float) -> jax.Array:
  """sqrt(||x - y||^2 + c^2) - c per example, the norm over all its values (c = 0: the L2 norm).

  At c = 0 the gradient at x = y would be 0/0; it is taken as 0 there (the limit along any line
  is bounded, and such an example has nothing left to learn).
  """
  squared = jnp.sum((x - y).reshape(x.shape[0], -1) ** 2, axis=1) + c ** 2
  positive = squared > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, squared, 1.0)), 0.0) - c


# --------------------------------------------------------------------------------------------------
# The loss.
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ECTLoss:
  """ECT's loss over config.ect (see the module docstring); `stage_steps` from `steps_per_stage`."""
  ect_config: Any
  sigma_data: float
  stage_steps: int

  def __post_init__(self):
    choose(MAPPINGS, self.ect_config.mapping, 'ect.mapping')
    choose(WEIGHTINGS, self.ect_config.weighting, 'ect.weighting')

  def pair(self, t: jax.Array, step) -> tuple[jax.Array, jax.Array]:
    """(stage, r) at a training step for the levels t: traced, so stages never recompile."""
    e = self.ect_config
    stage = stage_at(step, self.stage_steps)
    return stage, r_of_t(t, stage, e.q, e.mapping, e.k, e.b)

  def __call__(self, consistency_fn: consistency.ConsistencyFn, params, x0: jax.Array,
               rng: jax.Array, step, ode_step: consistency.OdeStep | None = None
               ) -> tuple[jax.Array, dict]:
    """The batch mean of the weighted distance, and metrics.

    `consistency_fn(params, x, sigma, rng)` is f with dropout driven by `rng` (both calls get the
    same key). With `ode_step` None, x_r shares x_t's noise (ECT); given one, x_r = ode_step(x_t, t, r)
    (distillation; the tests use the exact ODE step of Gaussian data). Where r = 0 the target is x_r
    itself (x0 with shared noise): f's boundary condition f(x, 0) = x.
    """
    e = self.ect_config
    batch = x0.shape[0]
    t_rng, noise_rng, dropout_rng = jax.random.split(rng, 3)
    t = jnp.exp(e.p_mean + e.p_std * jax.random.normal(t_rng, (batch,), jnp.float32))
    stage, r = self.pair(t, step)
    noise = jax.random.normal(noise_rng, x0.shape, x0.dtype)
    x_t = x0 + karras.bcast(t, x0) * noise
    if ode_step is None:
      x_r = x0 + karras.bcast(r, x0) * noise
    else:
      x_r = ode_step(x_t, t, r)
    x_r = jax.lax.stop_gradient(x_r)
    online = consistency_fn(params, x_t, t, dropout_rng)
    has_r = r > 0
    # The network never sees sigma = 0 (ln 0 in c_noise): those rows are evaluated at t and dropped.
    f_r = consistency_fn(params, x_r, jnp.where(has_r, r, t), dropout_rng)
    target = jax.lax.stop_gradient(jnp.where(karras.bcast(has_r, x0), f_r, x_r))
    dist = distance(online, target, e.huber_c)
    weight = loss_weight(e.weighting, t, r, self.sigma_data)
    loss = jnp.mean(weight * dist)
    aux = {'ect_stage': stage, 'ect_shrink': shrink_factor(stage, e.q), 'mean_sigma': jnp.mean(t),
           'r_zero_fraction': jnp.mean(1.0 - has_r.astype(jnp.float32)),
           'distance': jnp.mean(dist)}
    return loss, aux


# --------------------------------------------------------------------------------------------------
# The method.
# --------------------------------------------------------------------------------------------------
class ECT(ConsistencyModel):
  """ECT: a consistency model (1-step and multistep samplers of CM Alg. 1) tuned from an EDM run.

  The network, and every EMA copy, starts from the teacher run's EMA copy teacher.ema_index
  (teacher.workdir, or <workdir>/teacher trained from teacher.config), as ECT's `--transfer` loads
  the pickle's EMA into both. The step trains the EDM parametrisation D(x, t) (ECMPrecond in train
  mode: f(x, 0) = x, c_noise = ln(t) / 4 as the teacher's); the samplers use the consistency
  function with the boundary at noise.sigma_min (ECMPrecond in eval mode; the reference's CIFAR-10
  sigma_min is 0.003), which differs from D by a relative sigma_min / t in c_out: 0.2% at t = 0.821.
  """
  name = 'ect'

  def __init__(self, config, model, image_shape):
    super().__init__(config, model, image_shape)
    self.ect_loss = ECTLoss(config.ect, config.noise.sigma_data,
                            steps_per_stage(config.ect.stage_images, config.training.batch_size))

  @classmethod
  def check_config(cls, config) -> None:
    super().check_config(config)
    e = config.ect
    if not config.teacher.config and not config.teacher.workdir:
      raise ConfigError('An ect run starts from an EDM run\'s weights: set teacher.config (the EDM '
                        'config file) and/or teacher.workdir (a finished EDM run).')
    if config.teacher.student_init != 'ema':
      raise ConfigError(f'teacher.student_init={config.teacher.student_init!r}: an ect run starts '
                        'every copy from the teacher\'s EMA (ECT\'s --transfer); leave it at \'ema\'.')
    if not e.q > 1.0:
      raise ConfigError(f'ect.q={e.q} must be > 1: t - r shrinks by q at every stage.')
    if e.p_std <= 0 or e.huber_c < 0 or e.b < 0 or e.k < 0:
      raise ConfigError(f'ect.p_std={e.p_std} must be > 0, and ect.huber_c={e.huber_c}, ect.k={e.k} '
                        f'and ect.b={e.b} >= 0.')
    if e.stage_images < config.training.batch_size:
      raise ConfigError(f'ect.stage_images={e.stage_images} is below one batch '
                        f'({config.training.batch_size} images): a stage lasts at least one step.')

  # ---- Training. ----
  def uses_teacher(self) -> bool:
    return True

  def schedule_needs_num_steps(self) -> bool:
    return False  # Stages count images, not a fraction of training.num_steps.

  def frozen_inputs(self, resources):
    del resources
    return {}  # Neither a teacher nor LPIPS weights: the step calls only the online network.

  def initial_weights(self, resources):
    return InitialWeights(resources.teacher_params())

  def init_extra(self, params) -> dict:
    del params
    return {}  # No target network: the target is the online network under stop-gradient.

  def loss(self, params, extra, frozen, batch, rng, step):
    del extra, frozen
    labels = self.labels_of(batch['label'])
    # Training runs EDM's D (ECMPrecond in train mode), whose boundary is at sigma = 0.
    denoiser = lambda p, x, sigma, key: self.model.denoise(p, x, sigma, labels, train=True, rng=key)
    return self.ect_loss(denoiser, params, batch['image'], rng, step)

  def update_extra(self, extra, params, step):
    del params, step
    return extra, {}

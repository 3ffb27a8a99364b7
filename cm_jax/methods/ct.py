"""Consistency training (CM paper Alg. 3) and its improved form iCT (Song & Dhariwal 2023): no
teacher; both points of a pair share one noise draw. iCT's changes are switches of config.consistency
(distance, weighting, noise_sampling, scale_schedule, target_ema)."""

from cm_jax.methods.base import InitialWeights
from cm_jax.methods.consistency_model import ConsistencyModel


class CT(ConsistencyModel):
  """With a teacher run set (teacher.workdir or teacher.config), the network starts from its EMA
  weights, as openai/consistency_models' ImageNet-64 and LSUN CT launches do; no other use of it."""
  name = 'ct'

  def uses_teacher(self) -> bool:
    return bool(self.config.teacher.workdir or self.config.teacher.config)

  def initial_weights(self, resources):
    return InitialWeights(resources.teacher_params()) if self.uses_teacher() else None

  def ode_step(self, frozen, labels):
    del frozen, labels
    return None  # x_lo = x0 + sigma_lo z with the noise of x_hi: the unbiased Euler step (Alg. 3).

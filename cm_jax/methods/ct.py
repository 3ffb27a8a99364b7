"""Consistency training (CM paper Alg. 3) and its improved form iCT (Song & Dhariwal 2023): no
teacher; both points of a pair share one noise draw. iCT's changes are switches of config.consistency
(distance, weighting, noise_sampling, scale_schedule, target_ema)."""

from cm_jax.methods.consistency_model import ConsistencyModel


class CT(ConsistencyModel):
  name = 'ct'

  def ode_step(self, frozen, labels):
    del frozen, labels
    return None  # x_lo = x0 + sigma_lo z with the noise of x_hi: the unbiased Euler step (Alg. 3).

"""EDM diffusion training (Karras et al. 2022): the teacher of distillation, sampled by its PF-ODE."""

import jax
import jax.numpy as jnp

from cm_jax import karras
from cm_jax.methods.base import OWN_PARAMS, Method


class EDM(Method):
  name = 'edm'
  default_sampler = 'heun'

  def loss(self, params, extra, frozen, batch, rng, step):
    """EDM training loss (EDM eq. 2 with Table 1's sigma distribution and weighting)."""
    del extra, frozen, step
    edm = self.config.edm
    x0, labels = batch['image'], self.labels_of(batch['label'])
    sigma_rng, noise_rng, dropout_rng = jax.random.split(rng, 3)
    sigma = karras.edm_loss_sigmas(sigma_rng, x0.shape[0], edm.p_mean, edm.p_std)
    noisy = x0 + karras.bcast(sigma, x0) * jax.random.normal(noise_rng, x0.shape)
    denoised = self.model.denoise(params, noisy, sigma, labels, train=True, rng=dropout_rng)
    weight = karras.edm_loss_weight(sigma, self.config.noise.sigma_data)
    per_example = jnp.mean(((denoised - x0) ** 2).reshape(x0.shape[0], -1), axis=1)
    return jnp.mean(weight * per_example), {'mean_sigma': jnp.mean(sigma)}

  def samplers(self):
    return {name: lambda name=name: self.ode_sampler(OWN_PARAMS, name) for name in karras.SOLVERS}

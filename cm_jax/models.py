"""Preconditioned wrappers that turn a network `apply` into an EDM denoiser or a consistency function.

The network sees only (c_in x, c_noise, labels); the noise schedule lives here and in `karras`.
Online, target, EMA and teacher weights are separate pytrees run through the same `apply`.
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax

from cm_jax import karras


@dataclasses.dataclass(frozen=True)
class Preconditioned:
  """A network with the preconditioning of `noise` (config.noise: sigma_data, sigma_min,
  noise_cond_scale); `num_classes` > 0 for a class-conditional network."""
  network: nn.Module
  noise: Any
  num_classes: int = 0

  def _network_fn(self, params, labels, train: bool, rng):
    rngs = {'dropout': rng} if (train and rng is not None) else {}

    def fn(x_in, c_noise):
      return self.network.apply({'params': params}, x_in, c_noise, labels, train=train, rngs=rngs)
    return fn

  def denoise(self, params, x: jax.Array, sigma: jax.Array, labels=None, train: bool = False,
              rng=None) -> jax.Array:
    """EDM denoiser D(x, sigma) = c_skip x + c_out F(c_in x, c_noise) (EDM eq. 7)."""
    m = self.noise
    return karras.precondition(self._network_fn(params, labels, train, rng), x, sigma,
                               karras.edm_scalings(sigma, m.sigma_data), m.noise_cond_scale)

  def consistency(self, params, x: jax.Array, sigma: jax.Array, labels=None, train: bool = False,
                  rng=None) -> jax.Array:
    """Consistency function f(x, t) with f(x, eps) = x built in (CM paper eq. 5, Appendix C)."""
    m = self.noise
    return karras.precondition(self._network_fn(params, labels, train, rng), x, sigma,
                               karras.consistency_scalings(sigma, m.sigma_data, m.sigma_min),
                               m.noise_cond_scale)

  def denoiser_fn(self, params, labels=None) -> karras.Denoiser:
    """D(x, sigma) in eval mode, as the samplers and the CD teacher step want it."""
    return lambda x, sigma: self.denoise(params, x, sigma, labels)

  def consistency_fn(self, params, labels=None):
    """f(x, sigma) in eval mode, for the samplers."""
    return lambda x, sigma: self.consistency(params, x, sigma, labels)

  def init(self, rng: jax.Array, image_shape, batch_size: int = 1):
    """Initial network params for images of (H, W, C)."""
    x = jax.numpy.zeros((batch_size,) + tuple(image_shape), jax.numpy.float32)
    noise_cond = jax.numpy.zeros((batch_size,), jax.numpy.float32)
    labels = (jax.numpy.zeros((batch_size,), jax.numpy.int32)
              if self.num_classes > 0 else None)
    param_rng, dropout_rng = jax.random.split(rng)
    variables = self.network.init({'params': param_rng, 'dropout': dropout_rng}, x, noise_cond,
                                  labels, train=False)
    return variables['params']

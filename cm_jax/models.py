"""Preconditioned wrappers that turn a network `apply` into an EDM denoiser, a consistency function or
TrigFlow's F (sCM).

The network sees only (c_in x, c_noise, labels); the noise schedule lives here, in `karras` and in
`trigflow`. Online, target, EMA and teacher weights are separate pytrees run through the same `apply`.

One network, two readings: EDM's D(x, sigma) = c_skip x + c_out net(c_in x, c_noise) and TrigFlow's
f(x_t, t) = cos(t) x_t - sin(t) sd F(x_t / sd, c_noise) are the same function at sigma = sd tan(t),
x_t = cos(t) x, with F = -net: EDM's c_in x is x_t / sd, c_skip = cos^2 t and c_out = sd sin t. So an
EDM-trained network is a TrigFlow model as it is (sCM App. B.2), and noise.time_conditioning only
says whether c_noise is EDM's ln(sigma) / 4 or TrigFlow's t.
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax

from cm_jax import karras, trigflow


@dataclasses.dataclass(frozen=True)
class Preconditioned:
  """A network with the preconditioning of `noise` (config.noise: sigma_data, sigma_min,
  noise_cond_scale, time_conditioning); `num_classes` > 0 for a class-conditional network."""
  network: nn.Module
  noise: Any
  num_classes: int = 0

  def _network_fn(self, params, labels, train: bool, rng):
    rngs = {'dropout': rng} if (train and rng is not None) else {}

    def fn(x_in, c_noise):
      return self.network.apply({'params': params}, x_in, c_noise, labels, train=train, rngs=rngs)
    return fn

  @property
  def time_conditioning(self) -> str:
    # Configs saved before the field existed conditioned on ln(sigma) / 4.
    return self.noise.get('time_conditioning', 'log_sigma')

  def c_noise(self, sigma: jax.Array) -> jax.Array:
    """The network's noise conditioning at EDM level sigma (noise.time_conditioning)."""
    m = self.noise
    return trigflow.c_noise_of_sigma(sigma, self.time_conditioning, m.sigma_data, m.noise_cond_scale)

  def denoise(self, params, x: jax.Array, sigma: jax.Array, labels=None, train: bool = False,
              rng=None) -> jax.Array:
    """EDM denoiser D(x, sigma) = c_skip x + c_out F(c_in x, c_noise) (EDM eq. 7)."""
    m = self.noise
    return karras.precondition(self._network_fn(params, labels, train, rng), x, sigma,
                               karras.edm_scalings(sigma, m.sigma_data), m.noise_cond_scale,
                               self.c_noise(sigma))

  def consistency(self, params, x: jax.Array, sigma: jax.Array, labels=None, train: bool = False,
                  rng=None) -> jax.Array:
    """Consistency function f(x, t) with f(x, eps) = x built in (CM paper eq. 5, Appendix C)."""
    m = self.noise
    return karras.precondition(self._network_fn(params, labels, train, rng), x, sigma,
                               karras.consistency_scalings(sigma, m.sigma_data, m.sigma_min),
                               m.noise_cond_scale, self.c_noise(sigma))

  def trigflow(self, params, x_t: jax.Array, t: jax.Array, labels=None, train: bool = False,
               rng=None) -> jax.Array:
    """TrigFlow's F(x_t / sd, c_noise(t)) (sCM eq. 3) of x_t at time t [B]: minus the network's output
    (the sign of EDM's F), differentiable in x_t and t (jax.jvp). Float32 (at least) whatever the
    network computes in, as `karras.precondition`."""
    m = self.noise
    c_noise = trigflow.c_noise_of_time(t, self.time_conditioning, m.sigma_data, m.noise_cond_scale)
    out = self._network_fn(params, labels, train, rng)(x_t / m.sigma_data, c_noise)
    return -out.astype(jax.numpy.promote_types(x_t.dtype, jax.numpy.float32))

  def trigflow_consistency(self, params, x_t: jax.Array, t: jax.Array, labels=None) -> jax.Array:
    """f(x_t, t) = cos(t) x_t - sin(t) sd F (sCM eq. 5), in eval mode."""
    return trigflow.consistency(x_t, t, self.trigflow(params, x_t, t, labels), self.noise.sigma_data)

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

"""sCM's adaptive weighting w_phi(t) (Lu & Song 2024, Sec. 4.2 and App. D, after EDM2).

A network of the time alone, trained with the consistency model to minimise
e^{w(t)} / D ||F_theta - F_theta- - g||^2 - w(t): at its optimum e^{-w(t)} is the expected squared
error at t, so every time contributes gradients of the same size. The paper leaves its architecture
open; this is EDM2's (Karras et al. 2024, `logvar_linear`): one linear layer on fixed random Fourier
features (bandwidth 1) of c = ln(sigma) / 4, sigma = sigma_data tan(t), whatever the main network is
conditioned on. EDM's ln(sigma) / 4 spreads the times the log-normal proposal draws over a range of
about [-1.5, 1.1], where features of bandwidth 1 resolve them; TrigFlow's t would crowd the small
noise levels near 0.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from cm_jax.networks import layers


class AdaptiveWeight(nn.Module):
  """w_phi(t) [B] of TrigFlow times t [B]; starts at exactly 0 (a zero-initialised linear layer)."""

  sigma_data: float = 0.5
  features: int = 128

  @nn.compact
  def __call__(self, t: jax.Array) -> jax.Array:
    c = 0.25 * jnp.log(self.sigma_data * jnp.tan(t.astype(jnp.float32)))
    # Random frequencies W ~ N(0, 1) kept fixed (their gradient is stopped), as EDM2's MPFourier.
    features = layers.GaussianFourierProjection(embedding_size=self.features // 2, scale=1.0)(c)
    out = nn.Dense(1, kernel_init=nn.initializers.zeros, bias_init=nn.initializers.zeros,
                   param_dtype=jnp.float32)(features)
    return out[:, 0]

"""Adding a method takes one class: a toy method, registered in this file alone, trains through the
public entry point (resuming its own extra state) and samples with its own sampler."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cm_jax import methods
from cm_jax.errors import ConfigError
from cm_jax.modes import train as train_mode
from tests import tiny

SIGMA = 1.0


@methods.register
class FixedLevelDenoiser(methods.Method):
  """Denoising at one noise level (sigma = 1) through the EDM preconditioning; its sampler denoises
  noise of that level once. It also counts its updates in an extra trained pytree."""
  name = 'toy_fixed_level'
  default_sampler = 'denoise_once'

  def init_extra(self, params):
    return {'updates': jnp.zeros((), jnp.int32)}

  def loss(self, params, extra, frozen, batch, rng, step):
    x0 = batch['image']
    noise_rng, dropout_rng = jax.random.split(rng)
    sigma = jnp.full((x0.shape[0],), SIGMA)
    noisy = x0 + SIGMA * jax.random.normal(noise_rng, x0.shape)
    denoised = self.model.denoise(params, noisy, sigma, self.labels_of(batch['label']), train=True,
                                  rng=dropout_rng)
    loss = jnp.mean((denoised - x0) ** 2)
    return loss, {'toy_mse': loss}

  def update_extra(self, extra, params, step):
    return {'updates': extra['updates'] + 1}, {}

  def samplers(self):
    def denoise_once(params, rng, labels, shape):
      sigma = jnp.full((shape[0],), SIGMA)
      return self.model.denoise(params, SIGMA * jax.random.normal(rng, shape), sigma, labels)
    return {'denoise_once': lambda: methods.Sampler(denoise_once, nfe=1)}


def test_a_method_in_one_class_trains_resumes_and_samples(tmp_path, digits_data_dir):
  config = tiny.edm_config(digits_data_dir, steps=3)
  config.method, config.training.final_samplers = 'toy_fixed_level', ('',)
  config.training.lr_decay = 'constant'  # So that the run may be extended (a cosine one may not).
  workdir = str(tmp_path / 'toy')
  out = train_mode.run(config, workdir)
  assert out.step == 3 and [s for s, _ in out.losses] == [0, 1, 2]
  assert np.isfinite([loss for _, loss in out.losses]).all()
  assert int(out.state.extra['updates']) == 3
  result = out.samples['denoise_once']
  assert result['nfe'] == 1 and 0 < result['digits_fd'] < 1e4
  assert os.path.exists(os.path.join(workdir, 'samples', 'denoise_once_nfe1', 'samples_16x8x8x1.npz'))
  # The extra pytree is checkpointed with the rest: a longer relaunch continues the count.
  config.training.num_steps = 5
  resumed = tiny.train(config, workdir)
  assert [s for s, _ in resumed.losses] == [3, 4] and int(resumed.state.extra['updates']) == 5


def test_an_unknown_method_lists_the_registered_ones(tmp_path, digits_data_dir):
  config = tiny.edm_config(digits_data_dir)
  config.method = 'toy_unknown'
  with pytest.raises(ConfigError, match="method='toy_unknown' is not one of 'edm', 'cd', 'ct'.*"
                                        "'toy_fixed_level'"):
    tiny.train(config, str(tmp_path))

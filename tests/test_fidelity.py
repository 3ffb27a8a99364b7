"""The paper-scale configs and the numbers they produce, pinned to values read off the reference code.

openai/consistency_models_cifar10 (CIFAR-10, "C" below) and openai/consistency_models (ImageNet-64 and
LSUN, "P"); each test names the reference's behaviour it pins.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cm_jax import data, karras, methods, sampling
from configs import (cifar10_cd, cifar10_ct, cifar10_edm, cifar10_ict, digits_ict, imagenet64_cd,
                     imagenet64_ct, imagenet64_edm, imagenet64_ict, lsun_bedroom256_cd,
                     lsun_bedroom256_ct, lsun_bedroom256_edm)


# --------------------------------------------------------------------------------------------------
# The noise embedding (issue: iCT's Fourier scale 0.02 applies to c_noise = ln(sigma) / 4).
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('module, scale, fourier', [
    (cifar10_edm, 1.0, 16.0), (cifar10_cd, 1.0, 16.0), (cifar10_ct, 1.0, 16.0),
    (cifar10_ict, 1.0, 0.02), (digits_ict, 1.0, 0.02),
    (imagenet64_edm, 1000.0, None), (imagenet64_cd, 1000.0, None), (imagenet64_ict, 1000.0, None),
    (imagenet64_ct, 1000.0, None)])
def test_noise_conditioning_is_the_references(module, scale, fourier):
  config = module.get_config()
  sigma = jnp.array([80.0, 1.0, 0.002])
  c_noise = np.asarray(karras.noise_conditioning(sigma, config.noise.noise_cond_scale))
  # C: cond_t = 0.25 * log(t) into the Fourier features; P: 1000 * 0.25 * log(sigma) into ADM.
  np.testing.assert_allclose(c_noise, scale * 0.25 * np.log([80.0, 1.0, 0.002]), rtol=1e-6)
  assert c_noise[0] == pytest.approx(scale * 1.0955, rel=1e-4)
  if fourier is not None:
    assert config.model.embedding_type == 'fourier' and config.model.fourier_scale == fourier


# --------------------------------------------------------------------------------------------------
# Samplers: clamping before re-noising (both references), and in P's Heun sampler.
# --------------------------------------------------------------------------------------------------
def test_multistep_sampling_clamps_each_output_before_renoising():
  eps, sigmas = 0.002, [80.0, 0.5]
  f = lambda x, sigma: 2.0 * x  # Leaves [-1, 1] at once.
  key, shape = jax.random.PRNGKey(0), (64, 4, 4, 1)
  rngs = jax.random.split(key, 2)
  z0 = jax.random.normal(rngs[0], shape)
  z1 = jax.random.normal(rngs[1], shape)  # multistep_sample's split: one key per level.
  first = np.clip(2.0 * 80.0 * np.asarray(z0), -1, 1)
  expected = np.clip(2.0 * (first + math.sqrt(0.5 ** 2 - eps ** 2) * np.asarray(z1)), -1, 1)
  got = sampling.multistep_sample(f, key, shape, sigmas, eps, clip_denoised=True)
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-6)
  unclamped = sampling.multistep_sample(f, key, shape, sigmas, eps, clip_denoised=False)
  assert np.abs(np.asarray(unclamped)).max() > 10  # The switch is what clamps.


@pytest.mark.parametrize('module, clip, ode_clip', [
    (cifar10_cd, True, False), (cifar10_edm, True, False), (imagenet64_edm, True, True),
    (imagenet64_cd, True, True), (lsun_bedroom256_edm, True, True), (lsun_bedroom256_cd, True, True)])
def test_sampler_clamps_per_config(module, clip, ode_clip):
  config = module.get_config()
  assert (config.sampling.clip_denoised, config.sampling.ode_clip_denoised) == (clip, ode_clip)


class _GaussianModel:
  """A stand-in for Preconditioned: the exact denoiser of N(3, 0.5^2) data, outside [-1, 1]."""

  def denoiser_fn(self, params, labels):
    del params, labels
    return lambda x, sigma: 3.0 + karras.bcast(0.25 / (0.25 + sigma ** 2), x) * (x - 3.0)


@pytest.mark.parametrize('ode_clip', [False, True])
def test_heun_sampler_clamps_the_denoiser_when_asked(ode_clip):
  config = imagenet64_edm.get_config()
  config.sampling.ode_clip_denoised, config.sampling.num_steps = ode_clip, 8
  method = methods.get('edm')(config, _GaussianModel(), (4, 4, 1))
  images = np.asarray(method.sampler('heun').fn(None, jax.random.PRNGKey(0), None, (256, 4, 4, 1)))
  if ode_clip:  # Every D(x, sigma) is 1 at most, and the last Euler step lands on D.
    assert images.max() <= 1.0 + 1e-6
  else:
    assert images.mean() == pytest.approx(3.0, abs=0.1)


def test_consistency_samplers_read_the_clamp_switch(monkeypatch):
  seen = []
  original = sampling.multistep_sample
  monkeypatch.setattr(sampling, 'multistep_sample',
                      lambda *args, **kwargs: seen.append(args[-1]) or original(*args, **kwargs))
  for clip in (True, False):
    config = cifar10_cd.get_config('l2')
    config.sampling.clip_denoised = clip
    method = methods.get('cd')(config, _ConsistencyStandIn(), (4, 4, 1))
    method.sampler('multistep').fn(None, jax.random.PRNGKey(0), None, (2, 4, 4, 1))
  assert seen == [True, False]


class _ConsistencyStandIn:
  def consistency_fn(self, params, labels):
    del params, labels
    return lambda x, sigma: x


# --------------------------------------------------------------------------------------------------
# Training recipes.
# --------------------------------------------------------------------------------------------------
def test_optimizers_and_learning_rates_are_the_released_runs():
  assert imagenet64_edm.get_config().training.optimizer == 'radam'  # P's TrainLoop: RAdam.
  assert cifar10_ct.get_config().training.lr == 2e-4  # C's cifar10_ve_ct_adaptive.py.
  assert cifar10_cd.get_config().training.lr == 4e-4


@pytest.mark.parametrize('module', [imagenet64_cd, imagenet64_ict, imagenet64_ct, imagenet64_edm])
def test_imagenet_runs_sample_the_0_9999432_ema(module):
  config = module.get_config()
  assert config.training.ema_decays[config.sampling.ema_index] == 0.9999432189950708


def test_lpips_pooling_per_reference():
  assert cifar10_cd.get_config().consistency.lpips_pooling == 'max'  # C: flaxmodels' VGG.
  assert cifar10_ct.get_config().consistency.lpips_pooling == 'max'
  assert imagenet64_cd.get_config().consistency.lpips_pooling == 'avg'  # P: replace_pooling=True.
  assert imagenet64_ct.get_config().consistency.lpips_pooling == 'avg'
  assert lsun_bedroom256_cd.get_config().consistency.lpips_pooling == 'avg'
  assert lsun_bedroom256_ct.get_config('cat').consistency.lpips_pooling == 'avg'


def test_student_init_per_reference():
  assert cifar10_cd.get_config().teacher.student_init == 'online_and_ema'  # C: params <- params.
  assert imagenet64_cd.get_config().teacher.student_init == 'ema'  # P: one teacher file.


def test_imagenet64_ct_is_the_launch_script_run():
  config = imagenet64_ct.get_config()
  c = config.consistency
  assert (c.scale_schedule, c.start_scales, c.end_scales) == ('ct', 2, 200)
  assert (c.target_ema_schedule, c.target_ema, c.distance) == ('ct', 0.95, 'lpips')
  assert (config.training.batch_size, config.training.lr, config.training.num_steps) == (
      2048, 1e-4, 800_000)
  assert tuple(config.sampling.ts) == (0, 106, 200) and config.model.dropout == 0.0
  # It starts from the EDM teacher's weights (P's --teacher_model_path).
  method = methods.get('ct')(config, _ConsistencyStandIn(), (64, 64, 3))
  assert method.uses_teacher()
  loaded = []
  class Resources:
    def teacher_params(self, online=False):
      loaded.append(online)
      return {'w': 1.0}
  assert method.initial_weights(Resources()).params == {'w': 1.0} and loaded == [False]
  assert methods.get('ct')(cifar10_ict.get_config(), _ConsistencyStandIn(), (32, 32, 3)
                           ).initial_weights(Resources()) is None  # iCT runs from scratch.
  lsun = methods.get('ct')(lsun_bedroom256_ct.get_config(), _ConsistencyStandIn(), (256, 256, 3))
  assert lsun.uses_teacher()  # LSUN CT starts from its EDM teacher too (the launch script).


# --------------------------------------------------------------------------------------------------
# Samples as uint8: both references truncate (x + 1) * 127.5.
# --------------------------------------------------------------------------------------------------
def test_quantisation_truncates_as_the_references():
  x = np.array([0.0, 0.99, -0.999, 1.0, 1.5, -2.0, 0.5], np.float32)
  # P: ((x + 1) * 127.5).clamp(0, 255).to(uint8); rounding would give 128 and 254 for 0.0 and 0.99.
  np.testing.assert_array_equal(data.to_uint8(x), [127, 253, 0, 255, 255, 0, 191])
  levels = np.arange(256, dtype=np.uint8)  # Every stored image comes back exactly.
  np.testing.assert_array_equal(data.to_uint8(data.to_float(levels)), levels)

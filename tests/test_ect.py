"""Easy Consistency Tuning (cm_jax/methods/ect.py): its mapping, stages, weighting and distance at
known values, its loss on Gaussian data (where the consistency function is exact), the configs'
constants against locuslab/ect, and a tiny run from a teacher's weights."""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cm_jax import checkpointing, convert, experiment
from cm_jax.errors import ConfigError
from cm_jax.methods import ect
from cm_jax.modes import train as train_mode
from configs import cifar10_ect, default, digits_ect, imagenet64_ect
from tests import gaussian, tiny

FIXTURES = os.path.join(os.path.dirname(__file__), 'fixtures', 'convert')


# --------------------------------------------------------------------------------------------------
# r(t), the stages, the weighting and the distance at known values.
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('q, stage, t, r', [
    (2.0, 0, 1.0, 0.0),  # Stage 0 maps every t <= ln 7 to r = 0.
    (2.0, 0, 3.0, 0.93088952),  # 3 (1 - (1 + 8 sigmoid(-3)) / 2).
    (2.0, 1, 1.0, 0.21211716),
    (2.0, 2, 0.5, 0.24872967),
    (2.0, 3, 80.0, 75.0),  # n(80) = 1 to float precision: r = 80 (1 - 1/16).
    (4.0, 0, 2.0, 1.02318831),  # ImageNet's q = 4.
    (256.0, 0, 0.1, 0.09812493),  # The one-hour run's q = 256.
])
def test_r_of_t_at_known_values(q, stage, t, r):
  got = ect.r_of_t(jnp.float32(t), stage, q)
  assert float(got) == pytest.approx(r, rel=1e-6, abs=1e-7)


def test_r_is_zero_up_to_the_closed_form_thresholds_and_the_constant_variant():
  # n(t) = 2 at t = ln 7 and n(t) = 4 at t = ln(5/3): r reaches 0 exactly there at stages 0 and 1.
  for stage, threshold in ((0, math.log(7.0)), (1, math.log(5.0 / 3.0))):
    t = jnp.asarray([threshold * 0.5, threshold * 0.999, threshold * 1.01], jnp.float32)
    r = np.asarray(ect.r_of_t(t, stage, 2.0))
    assert r[0] == 0.0 and r[1] == 0.0 and r[2] > 0.0
  assert float(ect.r_of_t(jnp.float32(1e-3), 2, 2.0)) > 0.0  # From stage 2 on, r > 0 for every t.
  t = jnp.asarray([0.01, 1.0, 80.0], jnp.float32)
  np.testing.assert_allclose(ect.r_of_t(t, 2, 2.0, mapping='constant'), np.asarray(t) * 7 / 8,
                             rtol=1e-6)
  with pytest.raises(ConfigError, match="ect.mapping='tdist' is not one of 'sigmoid', 'constant'"):
    ect.r_of_t(t, 0, 2.0, mapping='tdist')


def test_stages_advance_every_stage_images_as_the_reference_counts_them():
  steps = ect.steps_per_stage(3_200_000, 128)  # run_ecm.sh: 250 ticks x 12.8 kimg at batch 128.
  assert steps == 25_000
  stage = lambda step: int(ect.stage_at(step, steps))
  # The reference's first tick is one iteration: stage s starts at iteration s * 25000 + 1.
  assert [stage(s) for s in (0, 1, 25_000, 25_001, 50_000, 50_001, 199_999)] == [0, 0, 0, 1, 1, 2, 7]
  assert float(ect.shrink_factor(7, 2.0)) == 1 / 256  # The run's last stage (Sec. "1/256").
  assert ect.steps_per_stage(100, 128) == 1


def test_weightings_at_known_values():
  t, r = jnp.asarray([2.0, 0.5, 1.0]), jnp.asarray([0.5, 0.0, 0.75])
  np.testing.assert_allclose(ect.loss_weight('inverse_gap', t, r, 0.5), [1 / 1.5, 2.0, 4.0],
                             rtol=1e-6)
  # EDM's lambda(t) = (t^2 + sd^2) / (t sd)^2 = 1/t^2 + 1/sd^2: 4.25, 8, 5 (independent of r).
  np.testing.assert_allclose(ect.loss_weight('edm', t, r, 0.5), [4.25, 8.0, 5.0], rtol=1e-6)
  with pytest.raises(ConfigError, match='ect.weighting'):
    ect.loss_weight('snr', t, r, 0.5)


def test_distance_at_c_zero_and_above():
  x = jnp.asarray([[3.0, 4.0], [1.0, 1.0]])
  y = jnp.asarray([[0.0, 0.0], [1.0, 1.0]])
  np.testing.assert_allclose(ect.distance(x, y, 0.0), [5.0, 0.0], atol=1e-7)  # The L2 norm.
  np.testing.assert_allclose(ect.distance(x, y, 0.5), [math.sqrt(25.25) - 0.5, 0.0], rtol=1e-6,
                             atol=1e-7)
  # At c = 0 the gradient is the unit direction, and 0 (not NaN) where x = y.
  grad = jax.grad(lambda x: jnp.sum(ect.distance(x, y, 0.0)))(x)
  np.testing.assert_allclose(grad, [[0.6, 0.8], [0.0, 0.0]], atol=1e-7)


# --------------------------------------------------------------------------------------------------
# The loss on Gaussian data x0 ~ N(MU, S0^2) per value: f(x, t) = the exact PF-ODE map to 0.
# --------------------------------------------------------------------------------------------------
MU, S0 = 0.2, 0.5
SHAPE = (4, 4, 1)


def ect_config(**overrides):
  config = default.get_config().ect
  config.update(overrides)
  return config


def exact_f(params, x, sigma, rng):
  """The exact consistency function with boundary at 0 (ECT trains EDM's D, whose f(x, 0) = x),
  scaled and offset by params that are 0 at the optimum."""
  del rng
  f = gaussian.ode_solution(x, sigma, jnp.zeros_like(sigma), MU, S0)
  return f * (1.0 + params['scale']) + params['offset']


ZERO = {'scale': jnp.float32(0.0), 'offset': jnp.float32(0.0)}


def data(n, seed=0):
  return MU + S0 * jax.random.normal(jax.random.PRNGKey(seed), (n,) + SHAPE)


def draws(rng, n, config):
  """The loss's own t and noise draws, recomputed from its key."""
  t_rng, noise_rng, _ = jax.random.split(rng, 3)
  t = np.exp(config.p_mean + config.p_std * np.asarray(jax.random.normal(t_rng, (n,)), np.float64))
  return t, np.asarray(jax.random.normal(noise_rng, (n,) + SHAPE), np.float64)


@pytest.mark.parametrize('stage', [0, 1, 3])
def test_loss_of_the_exact_consistency_function_is_zero_and_r_zero_targets_x(stage):
  """With x_r the exact ODE solution from x_t (distillation with an exact teacher), the exact f has
  zero loss, also where r = 0 (the target is x_r itself there). A constant offset cancels where
  r > 0 and costs exactly 0.1 sqrt(d) w(t) where r = 0: the r = 0 rows use x_r, not f(x_r, r)."""
  config = ect_config()
  loss_fn = ect.ECTLoss(config, 0.5, stage_steps=1)
  step = stage + 1  # stage_at(step, 1) = step - 1.
  exact_step = lambda x, t, r: gaussian.ode_solution(x, t, r, MU, S0)
  x0, rng = data(512), jax.random.PRNGKey(1)
  loss, aux = loss_fn(exact_f, ZERO, x0, rng, step, exact_step)
  assert int(aux['ect_stage']) == stage
  assert float(loss) < 1e-5  # The L2 norm of float32 round-off (the squared loss is ~1e-12).
  offset = {'scale': jnp.float32(0.0), 'offset': jnp.float32(0.1)}
  loss, aux = loss_fn(exact_f, offset, x0, rng, step, exact_step)
  t, _ = draws(rng, 512, config)
  r = np.asarray(ect.r_of_t(jnp.asarray(t, jnp.float32), stage, 2.0))
  zero = r == 0
  assert float(aux['r_zero_fraction']) == pytest.approx(zero.mean())
  if stage == 3:
    assert not zero.any()
  else:
    assert zero.mean() > 0.3  # Most t ~ LogNormal(-1.1, 2) fall under ln 7 (stage 0) or 0.51.
  expected = np.mean(np.where(zero, 0.1 * math.sqrt(16) / t, 0.0))  # w = 1/(t - 0) there.
  assert float(loss) == pytest.approx(expected, rel=1e-4, abs=1e-5)


@pytest.mark.parametrize('weighting, c', [('inverse_gap', 0.0), ('edm', 0.06)])
def test_shared_noise_loss_at_a_known_value(weighting, c):
  """ECT proper (x_r = x0 + r e): recomputed in float64 numpy from the same draws."""
  config = ect_config(weighting=weighting, huber_c=c, q=4.0)
  loss_fn = ect.ECTLoss(config, 0.5, stage_steps=10)
  params = {'scale': jnp.float32(0.3), 'offset': jnp.float32(-0.2)}
  x0, rng, step = data(8), jax.random.PRNGKey(7), 21  # Stage (21 - 1) // 10 = 2.
  loss, aux = loss_fn(exact_f, params, x0, rng, step)
  assert int(aux['ect_stage']) == 2
  t, z = draws(rng, 8, config)
  n = 1 + 8 / (1 + np.exp(t))
  r = np.maximum(t * (1 - 4.0 ** -3 * n), 0.0)
  b = lambda v: v[:, None, None, None]
  x = np.asarray(x0, np.float64)
  f = lambda y, s: (MU + S0 / np.sqrt(S0 ** 2 + b(s) ** 2) * (y - MU)) * 1.3 - 0.2
  x_r = x + b(r) * z
  target = np.where(b(r) > 0, f(x_r, np.where(r > 0, r, 1.0)), x_r)
  diff = (f(x + b(t) * z, t) - target).reshape(8, -1)
  dist = np.sqrt((diff ** 2).sum(axis=1) + c ** 2) - c
  weight = 1 / (t - r) if weighting == 'inverse_gap' else (t ** 2 + 0.25) / (0.25 * t ** 2)
  assert float(loss) == pytest.approx(np.mean(weight * dist), rel=2e-4)
  assert float(aux['mean_sigma']) == pytest.approx(t.mean(), rel=1e-5)


def test_both_calls_share_the_dropout_key_and_the_target_has_no_gradient():
  seen = []

  def spy(params, x, sigma, rng):
    seen.append(rng)
    return exact_f(params, x, sigma, rng)

  loss_fn = ect.ECTLoss(ect_config(), 0.5, stage_steps=1)
  params = {'scale': jnp.float32(0.1), 'offset': jnp.float32(0.1)}
  grads = jax.grad(lambda p: loss_fn(spy, p, data(8), jax.random.PRNGKey(0), 5)[0])(params)
  assert len(seen) == 2 and np.array_equal(np.asarray(seen[0]), np.asarray(seen[1]))
  # Stage 4: r > 0 everywhere, so a constant offset of f cancels between the two calls. Its gradient
  # is not zero only because the target is under stop-gradient (through both it would be exactly 0).
  assert all(np.isfinite(float(g)) and float(g) != 0.0 for g in jax.tree.leaves(grads))


# --------------------------------------------------------------------------------------------------
# Configs: the reference's constants, and what a user can get wrong.
# --------------------------------------------------------------------------------------------------
def test_cifar10_ect_is_run_ecm_sh():
  config = cifar10_ect.get_config()
  e, t = config.ect, config.training
  assert config.method == 'ect' and config.teacher.config == 'configs/cifar10_edm.py'
  assert (e.p_mean, e.p_std, e.q, e.k, e.b, e.huber_c) == (-1.1, 2.0, 2.0, 8.0, 1.0, 0.0)
  assert (e.mapping, e.weighting) == ('sigmoid', 'inverse_gap')
  assert ect.steps_per_stage(e.stage_images, t.batch_size) == 25_000  # --double=250 --tick=12.8.
  assert (t.batch_size, t.num_steps, t.optimizer, t.lr, t.b1, t.b2) == (
      128, 200_000, 'radam', 1e-4, 0.9, 0.999)
  assert (t.grad_clip, t.lr_decay, tuple(t.ema_decays)) == (0.0, 'constant', (0.9999,))
  assert config.model.dropout == 0.2 and not config.data.random_flip
  assert tuple(config.sampling.sigmas) == (80.0, 0.821) and not config.sampling.clip_denoised


def test_imagenet64_ect_is_run_imgnet_ecm_sh_on_adm():
  config = imagenet64_ect.get_config()
  e, t = config.ect, config.training
  assert config.method == 'ect' and config.model.name == 'adm' and config.model.num_classes == 1000
  assert (e.p_mean, e.p_std, e.q, e.huber_c, e.weighting) == (-0.8, 1.6, 4.0, 0.06, 'edm')
  assert ect.steps_per_stage(e.stage_images, t.batch_size) == 25_000  # --double 500 --tick 6.4.
  assert (t.batch_size, t.num_steps) == (128, 100_000)
  assert tuple(config.sampling.sigmas) == (80.0, 1.526)


def test_digits_ect_builds_and_user_errors_name_the_field():
  config = digits_ect.get_config()
  exp = experiment.build(config, '')
  assert exp.method.name == 'ect' and exp.method.uses_teacher()
  assert exp.method.sampler('multistep').nfe == 2 and exp.method.sampler('onestep').nfe == 1
  assert exp.abstract_state.extra == {}  # No target network.
  for field, value, message in (('q', 1.0, 'ect.q=1.0 must be > 1'),
                                ('mapping', 'tdist', "ect.mapping='tdist' is not one of"),
                                ('weighting', 'snr', "ect.weighting='snr' is not one of"),
                                ('stage_images', 64, 'ect.stage_images=64 is below one batch'),
                                ('huber_c', -1.0, 'ect.huber_c=-1.0')):
    bad = digits_ect.get_config()
    bad.ect[field] = value
    with pytest.raises(ConfigError, match=message):
      experiment.build(bad, '')
  bad = digits_ect.get_config()
  bad.teacher.student_init = 'online_and_ema'
  with pytest.raises(ConfigError, match="teacher.student_init='online_and_ema'"):
    experiment.build(bad, '')
  bad = digits_ect.get_config()
  bad.teacher.config = ''
  with pytest.raises(ConfigError, match='starts from an EDM run'):
    experiment.build(bad, '')


# --------------------------------------------------------------------------------------------------
# A tiny run: starts from the teacher's EMA, no teacher or target in the step, 1- and 2-step samples.
# --------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_ect_starts_from_the_teacher_and_samples(tmp_path, digits_data_dir):
  """The teacher is the converted EDM fixture of tests/test_convert.py (a digits NCSN++ with two
  levels and attention at 4x4, tests/tiny.py's network when the fixture was written): no teacher
  training, and ECT from a converted EDM checkpoint, as the issue asks."""
  def fixture_arch(config):
    config.model.ch_mult, config.model.attn_resolutions = (1, 2), (4,)
    return config
  teacher_dir = str(tmp_path / 'teacher')
  convert.convert(fixture_arch(tiny.edm_config(digits_data_dir)),
                  os.path.join(FIXTURES, 'edm_ncsnpp_tiny.pkl'), teacher_dir, log=lambda line: None)
  config = fixture_arch(tiny.shrink(digits_ect.get_config(), digits_data_dir, steps=2))
  config.teacher.workdir, config.teacher.train_if_missing = teacher_dir, False
  config.ect.stage_images = config.training.batch_size  # A stage per step: stages 0 and 1.

  ckpt = checkpointing.Checkpointer(os.path.join(teacher_dir, 'checkpoints'), read_only=True)
  exp = experiment.build(config, str(tmp_path / 'ect'))
  abstract = checkpointing.with_shardings(exp.abstract_state, exp.state_shardings)
  teacher_ema = ckpt.restore_items(ckpt.latest_step(), {'ema_params': abstract.ema_params}
                                   )['ema_params'][0]
  ckpt.close()
  start = exp.method.initial_weights(exp.resources)  # Every copy from the teacher's EMA.
  same = lambda a, b: all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  assert start.ema is None and same(start.params, teacher_ema)

  out = train_mode.run(config, str(tmp_path / 'ect'))
  assert out.frozen == {} and out.state.extra == {}
  assert np.isfinite([loss for _, loss in out.losses]).all() and len(out.losses) == 2
  assert not same(out.state.params, teacher_ema)
  assert {name: r['nfe'] for name, r in out.samples.items()} == {'onestep': 1, 'multistep': 2}

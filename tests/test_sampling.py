"""Samplers against closed forms of Gaussian data, the time-point search, and sharding invariance."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from cm_jax import edit_tasks, editing, inference, karras, sampling
from cm_jax.modes import sample as sample_mode
from cm_jax.errors import ConfigError
from tests import gaussian

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MU, S0, EPS, T, RHO = 0.3, 0.5, 0.002, 80.0, 7.0
NOISE = ml_collections.ConfigDict(dict(sigma_min=EPS, sigma_max=T, rho=RHO))
SHAPE = (8192, 4, 4, 1)  # 131k values: the standard error of a mean is 0.0014, of a std 0.001.


def exact_f():
  return gaussian.consistency_function(MU, S0, EPS)


# --------------------------------------------------------------------------------------------------
# CM Alg. 1.
# --------------------------------------------------------------------------------------------------
def test_alg1_with_one_time_point_is_onestep_sampling():
  # A nonlinear stand-in for a network: the equality must not depend on f being the exact one.
  f = lambda x, sigma: jnp.tanh(x / karras.bcast(sigma, x)) + 0.1 * x
  key = jax.random.PRNGKey(3)
  shape = (16, 8, 8, 1)
  onestep = sampling.onestep_sample(f, key, shape, T, EPS)
  np.testing.assert_array_equal(sampling.multistep_sample(f, key, shape, [T], EPS), onestep)
  # A trailing eps costs nothing and changes nothing (f(x, eps) = x, noise std sqrt(eps^2 - eps^2)).
  np.testing.assert_array_equal(sampling.multistep_sample(f, key, shape, [T, EPS], EPS), onestep)
  # And it is f(T z, T) with z from the first split of the key.
  z = jax.random.normal(jax.random.split(key, 1)[0], shape)
  np.testing.assert_allclose(onestep, f(T * z, jnp.full((16,), T)), atol=1e-6)


@pytest.mark.parametrize('sigmas', [
    [T],
    [T, 0.5],
    sampling.sigmas_from_indices((0, 11, 17), 18, NOISE),  # The paper's CIFAR-10 2-step points.
    [T, 5.0, 1.0, 0.2, 0.05],
])
def test_consistency_samplers_give_the_gaussian_exactly(sigmas):
  x = np.asarray(sampling.multistep_sample(exact_f(), jax.random.PRNGKey(0), SHAPE, sigmas, EPS))
  # f maps to the ODE's end at eps: N(MU, S0^2 + EPS^2). The one bias is x_T = T z instead of
  # N(MU, S0^2 + T^2) at the first step: MU * S0 / T = 0.002 on the mean, smaller later.
  assert x.mean() == pytest.approx(MU, abs=0.007)
  assert x.std() == pytest.approx(np.sqrt(S0 ** 2 + EPS ** 2), rel=0.01)
  skew = np.mean(((x - x.mean()) / x.std()) ** 3)
  kurt = np.mean(((x - x.mean()) / x.std()) ** 4)
  assert abs(skew) < 0.03 and kurt == pytest.approx(3.0, abs=0.06)


def test_later_steps_forget_the_first_steps_bias():
  # With a consistency function that is exact below sigma = 1 but biased above it, Alg. 1's later
  # steps (x_tau = x + sqrt(tau^2 - eps^2) z is exactly N(MU, S0^2 + tau^2) only if x is exact) shrink
  # the bias by sqrt(S0^2 + eps^2) / sqrt(S0^2 + tau^2) per step.
  f = exact_f()
  biased = lambda x, sigma: f(x, sigma) + jnp.where(karras.bcast(sigma, x) > 1.0, 0.5, 0.0)
  one = np.asarray(sampling.multistep_sample(biased, jax.random.PRNGKey(1), SHAPE, [T], EPS))
  two = np.asarray(sampling.multistep_sample(biased, jax.random.PRNGKey(1), SHAPE, [T, 0.3], EPS))
  assert one.mean() == pytest.approx(MU + 0.5, abs=0.01)
  shrink = np.sqrt(S0 ** 2 + EPS ** 2) / np.sqrt(S0 ** 2 + 0.3 ** 2)
  assert two.mean() - MU == pytest.approx(0.5 * shrink, abs=0.01)


@pytest.mark.parametrize('solver,levels,tol', [('heun', 80, 0.01), ('euler', 400, 0.03)])
def test_edm_samplers_solve_the_pf_ode_of_gaussian_data(solver, levels, tol):
  key = jax.random.PRNGKey(2)
  x = sampling.edm_sample(gaussian.denoiser(MU, S0), key, SHAPE, levels, NOISE, solver)
  exact = gaussian.ode_solution(T * jax.random.normal(key, SHAPE), T, 0.0, MU, S0)
  # Per sample against the exact ODE map of the same noise, so sampling error plays no part.
  assert float(jnp.max(jnp.abs(x - exact))) < tol
  assert float(x.std()) == pytest.approx(S0, rel=2 * tol)


def test_heun_converges_at_second_order():
  key = jax.random.PRNGKey(4)
  shape = (256, 2, 2, 1)
  exact = gaussian.ode_solution(T * jax.random.normal(key, shape), T, 0.0, MU, S0)
  errors = [float(jnp.max(jnp.abs(sampling.edm_sample(gaussian.denoiser(MU, S0), key, shape, n, NOISE)
                                  - exact))) for n in (40, 80)]
  assert errors[0] / errors[1] > 3.0  # 4 for a second-order method.


def test_ode_consistency_function_and_encoder_match_the_closed_forms():
  denoiser = gaussian.denoiser(MU, S0)
  f = sampling.ode_consistency_fn(denoiser, 60, EPS, RHO)
  x = 3.0 * jax.random.normal(jax.random.PRNGKey(5), (64, 4, 4, 1)) + 1.0
  for sigma in (3.0, 80.0):
    s = jnp.full((64,), sigma)
    np.testing.assert_allclose(f(x, s), exact_f()(x, s), atol=3e-3)
  np.testing.assert_array_equal(f(x, jnp.full((64,), EPS)), x)  # f(x, eps) = x.
  # Encoding then one-step generation gives the image back (the ODE there and back).
  images = MU + S0 * jax.random.normal(jax.random.PRNGKey(6), (64, 4, 4, 1))
  z = sampling.ode_encode(denoiser, images, 80, NOISE)
  np.testing.assert_allclose(exact_f()(T * z, jnp.full((64,), T)), images, atol=6e-3)
  assert float(z.std()) == pytest.approx(np.sqrt(S0 ** 2 + T ** 2) / T, rel=0.05)


def test_time_points_are_checked():
  f = exact_f()
  key = jax.random.PRNGKey(0)
  with pytest.raises(ConfigError, match='decrease strictly'):
    sampling.multistep_sample(f, key, (2, 4, 4, 1), [T, 1.0, 2.0], EPS)
  with pytest.raises(ConfigError, match='above sigma_min'):
    sampling.multistep_sample(f, key, (2, 4, 4, 1), [EPS], EPS)
  with pytest.raises(ConfigError, match='outside the N-grid'):
    sampling.sigmas_from_indices((0, 18), 18, NOISE)
  sigmas = sampling.sigmas_from_indices((0, 11, 17), 18, NOISE)
  assert sigmas[0] == pytest.approx(T, rel=1e-5) and sigmas[-1] == pytest.approx(EPS, rel=1e-4)
  assert sigmas[1] == pytest.approx(float(karras.sigma_at(11, 18, EPS, T, RHO)), rel=1e-6)


def test_traced_sigmas_give_the_same_samples():
  f = exact_f()
  key = jax.random.PRNGKey(7)
  sigmas = [T, 2.0, 0.4]
  traced = jax.jit(lambda s: sampling.multistep_sample(f, key, (8, 4, 4, 1), s, EPS))(jnp.asarray(sigmas))
  np.testing.assert_allclose(traced, sampling.multistep_sample(f, key, (8, 4, 4, 1), sigmas, EPS),
                             atol=1e-6)


# --------------------------------------------------------------------------------------------------
# Greedy ternary search (CM paper, Sec. 6).
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('best', [1, 2, 7, 15, 16])
def test_ternary_search_finds_the_minimum_of_a_unimodal_score(best):
  calls = []

  def score(ts):
    calls.append(ts)
    return abs(ts[1] - best) ** 1.5
  assert sampling.ternary_search(score, (0,), (17,)) == best
  assert len(set(calls)) <= 12  # Fewer than the 16 candidates (memoised callers pay once each).
  assert all(len(ts) == 3 and ts[0] == 0 and ts[2] == 17 for ts in calls)


def test_greedy_search_places_points_one_at_a_time():
  targets = {1: 5, 2: 12}  # Score each new point by its distance to a target.

  def score(ts):
    return sum((t - targets[i]) ** 2 for i, t in enumerate(ts[1:-1], start=1))
  ts, scores = sampling.greedy_time_search(score, 18, 3)
  assert ts == (0, 5, 12, 17)
  assert all(k[-1] == 17 for k in scores)
  # The first point leaves room for the later ones: with N = 5, 3 steps need indices 1 and 2 or 3.
  ts, _ = sampling.greedy_time_search(lambda ts: -ts[1], 5, 3)
  assert ts == (0, 2, 3, 4)
  with pytest.raises(ConfigError, match='>= 2 steps'):
    sampling.greedy_time_search(score, 18, 1)
  with pytest.raises(ConfigError, match='more than 5 levels'):
    sampling.greedy_time_search(score, 5, 5)


# --------------------------------------------------------------------------------------------------
# Sharding: the same seed gives the same samples and edits on 1 and 8 devices.
# --------------------------------------------------------------------------------------------------
_DEVICES_SCRIPT = textwrap.dedent("""
    import sys
    import jax
    import numpy as np
    from tests import test_sampling
    assert jax.device_count() == int(sys.argv[2]), jax.devices()
    np.savez(sys.argv[1], **test_sampling.sharded_outputs(sys.argv[3], jax.devices()))
""")


def _tiny_network_and_params(params_path: str):
  from cm_jax.models import Preconditioned
  from cm_jax.networks import get_network
  from configs import default
  config = default.get_config().model
  config.update(nf=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), num_classes=10)
  model = Preconditioned(get_network(config, 8, 1), default.get_config().noise, num_classes=10)
  abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), (8, 8, 1)))
  leaves, treedef = jax.tree.flatten(abstract)
  if not os.path.exists(params_path):
    # Random weights far from init (init_scale 0 makes residual branches start at 0).
    rng = np.random.default_rng(0)
    np.savez(params_path, *[0.3 * rng.standard_normal(a.shape).astype(np.float32) for a in leaves])
  with np.load(params_path) as saved:
    params = jax.tree.unflatten(treedef, [saved[f'arr_{i}'] for i in range(len(leaves))])
  return model, config, params


def sharded_outputs(params_path: str, devices) -> dict[str, np.ndarray]:
  """Class-conditional 2-step samples and inpaintings on a mesh of `devices` (batch 6 of 10)."""
  from cm_jax import sharding
  model, config, params = _tiny_network_and_params(params_path)
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1)), devices)
  sigmas = [T, 0.6]
  fn = lambda p, rng, labels, shape: sampling.multistep_sample(model.consistency_fn(p, labels), rng,
                                                               shape, sigmas, EPS)
  sampler = inference.ShardedSampler(fn, mesh, (8, 8, 1), batch_size=6, num_classes=10)
  images, labels = sampler(params, 10, seed=5)
  reference = np.linspace(-1, 1, 10 * 64, dtype=np.float32).reshape(10, 8, 8, 1)
  mask = editing.named_mask('lower_half', 8)

  def edit(p, key, batch):
    f = model.consistency_fn(p, batch['label'])
    return editing.inpaint(f, key, batch['image'], mask, sigmas, EPS, clip_denoised=True)
  edits = inference.run_batched(edit, params, {'image': reference, 'label': labels}, 6, 3, mesh)[0]
  return {'images': images, 'labels': labels, 'edits': edits}


def test_same_seed_same_samples_and_edits_on_1_and_8_devices(tmp_path):
  params_path = str(tmp_path / 'params.npz')
  one = sharded_outputs(params_path, jax.devices()[:1])
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu',
             XLA_FLAGS='--xla_force_host_platform_device_count=8')
  out = str(tmp_path / 'eight.npz')
  proc = subprocess.run([sys.executable, '-c', _DEVICES_SCRIPT, out, '8', params_path], env=env,
                        cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with np.load(out) as eight:
    # Batches of 6 are padded to 8 rows on 8 devices and not at all on 1: the random bits agree.
    np.testing.assert_array_equal(eight['labels'], one['labels'])
    # uint8 samples: equal up to float summation order inside the network (at most 1 level, rarely).
    diff = np.abs(eight['images'].astype(int) - one['images'].astype(int))
    assert diff.max() <= 1 and diff.mean() < 0.01
    np.testing.assert_allclose(eight['edits'], one['edits'], atol=1e-4)
  assert one['images'].shape == (10, 8, 8, 1) and one['images'].std() > 10  # Not a constant image.
  assert len(set(one['labels'].tolist())) > 1


_TWO_PROCESS_SCRIPT = textwrap.dedent("""
    import sys
    import jax
    process, port, out, params_path = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    jax.distributed.initialize(f'localhost:{port}', 2, process)
    import numpy as np
    from tests import test_sampling
    assert jax.process_count() == 2 and jax.device_count() == 4, jax.devices()
    outputs = test_sampling.sharded_outputs(params_path, jax.devices())
    if process == 0:
      np.savez(out, **outputs)
""")


@pytest.mark.slow
def test_same_seed_same_samples_and_edits_on_2_processes(tmp_path):
  """2 JAX processes x 2 CPU devices: every process gets the whole result, the 1-device one."""
  import socket
  params_path = str(tmp_path / 'params.npz')
  one = sharded_outputs(params_path, jax.devices()[:1])
  with socket.socket() as probe:
    probe.bind(('localhost', 0))
    port = probe.getsockname()[1]
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu',
             XLA_FLAGS='--xla_force_host_platform_device_count=2')
  out = str(tmp_path / 'two.npz')
  workers = [subprocess.Popen([sys.executable, '-c', _TWO_PROCESS_SCRIPT, str(i), str(port), out,
                               params_path], env=env, cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
  for worker in workers:
    output, _ = worker.communicate(timeout=400)
    assert worker.returncode == 0, output[-3000:]
  with np.load(out) as two:
    np.testing.assert_array_equal(two['labels'], one['labels'])
    assert np.abs(two['images'].astype(int) - one['images'].astype(int)).max() <= 1
    np.testing.assert_allclose(two['edits'], one['edits'], atol=1e-4)


# --------------------------------------------------------------------------------------------------
# --mode=sample end to end on a tiny trained run.
# --------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_sample_mode_end_to_end(tmp_path, digits_data_dir):
  from tests import tiny
  workdir = str(tmp_path / 'edm')
  config = tiny.edm_config(digits_data_dir, steps=2)
  config.sampling.num_samples, config.sampling.batch_size = 20, 8
  tiny.train(config, workdir)
  result = sample_mode.run(config, workdir)
  assert result['sampler'] == 'heun' and result['nfe'] == 5 and 'digits_fd' in result
  assert result['npz'] == os.path.join(workdir, 'samples', 'heun_nfe5', 'samples_20x8x8x1.npz')
  assert os.path.exists(os.path.join(workdir, 'samples', 'heun_nfe5', 'grid.png'))
  with np.load(result['npz']) as npz:
    images = npz['arr_0']
    assert images.dtype == np.uint8 and images.shape == (20, 8, 8, 1) and 'arr_1' not in npz
  # The training loop's sampler gives the same samples for the same seed and batch.
  restored = inference.restore(config, workdir)
  expected, _ = inference.sample_images(restored.exp, restored.params, 'heun',
                                        restored.exp.method.sampler('heun'), 20,
                                        config.sampling.seed, 8)
  np.testing.assert_array_equal(images, expected)
  config.sampling.sampler = 'onestep'
  with pytest.raises(ConfigError, match="sampling.sampler has 'onestep', which is not a sampler of edm runs: use one of 'heun', 'euler'"):
    sample_mode.run(config, workdir)
  config.sampling.sampler, config.sampling.search_steps = '', 2
  with pytest.raises(ConfigError, match='search_steps=2 searches consistency-model time points'):
    sample_mode.run(config, workdir)


@pytest.mark.slow
def test_time_search_on_a_network_compiles_once(digits_data_dir):
  from cm_jax import experiment
  from cm_jax.evaluators.time_search import TimeSearchEvaluator
  from tests import tiny
  config = tiny.cd_config(digits_data_dir, '/nonexistent', steps=2)
  # Unclamped, the brightness score below is unimodal in the index, as ternary search assumes.
  config.sampling.clip_denoised = False
  exp = experiment.build(config, '/tmp/unused')
  params = exp.model.init(jax.random.PRNGKey(0), exp.image_shape)
  params = jax.tree.map(lambda p: p + 0.2 * jnp.ones_like(p), params)
  scored = []

  def score(images):  # Lower when samples are brighter: some index wins, and every call is counted.
    scored.append(images.shape)
    return -float(images.mean())
  with counting_traces() as traces:
    ts, scores = TimeSearchEvaluator(exp, score).run(params, 2, 12, seed=0, batch_size=6)
  assert ts[0] == 0 and ts[-1] == 17 and 0 < ts[1] < 17 and len(ts) == 3
  assert scores[ts] == min(scores.values()) and len(scores) == len(scored) <= 12
  assert all(shape == (12, 8, 8, 1) for shape in scored)
  assert traces() == 1  # One compilation serves every candidate: the sigmas are an argument.


def counting_traces():
  """Counts traces of `sampling.multistep_sample` (one per compilation of the search's sampler)."""
  import contextlib
  count = [0]
  original = sampling.multistep_sample

  def counting(*args, **kwargs):
    count[0] += 1
    return original(*args, **kwargs)

  @contextlib.contextmanager
  def patch():
    sampling.multistep_sample = counting
    try:
      yield lambda: count[0]
    finally:
      sampling.multistep_sample = original
  return patch()

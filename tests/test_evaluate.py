"""`--mode=eval` (cm_jax.evaluate): checks before any work, the digits path, and CIFAR-10 end to end.

The CIFAR-10 test trains a tiny NCSN++ for 2 steps on `tfds.testing.mock_data`, then samples and scores
it with a random-weight Inception (offline; the numbers mean nothing, their plumbing is what is tested).
"""
import hashlib

import json
import os
import socket
import subprocess
import sys
import textwrap
from unittest import mock

import numpy as np
import pytest
import tensorflow_datasets as tfds

from cm_jax import data, inference, outputs
from cm_jax.evaluators import image_metrics
from cm_jax.modes import eval as eval_mode
from cm_jax.errors import ConfigError, WorkdirError
from cm_jax.evaluation import inception, metrics
from configs import cifar10_edm, default
from tests import tiny

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_cifar10_config(tmp_path, inception_path: str):
  """CIFAR-10 shapes (32x32x3) with a network small enough to train and sample in seconds: one level
  without attention, as tests/tiny.py (eval reads the network's output only, whatever its depth)."""
  config = cifar10_edm.get_config()
  config.data.data_dir = str(tmp_path / 'tfds')
  config.data.random_flip = False
  m = config.model
  m.nf, m.ch_mult, m.num_res_blocks, m.attn_resolutions, m.dropout = 16, (1,), 1, (), 0.0
  m.dtype = 'float32'  # The config's bfloat16 is for accelerators; a CPU emulates it.
  t = config.training
  t.batch_size, t.num_steps, t.warmup_steps = 2, 2, 0
  t.log_every, t.checkpoint_every, t.sample_every = 1, 2, 0
  config.sampling.num_steps = 2  # Heun: 3 NFE.
  config.sampling.batch_size = 16
  e = config.eval
  e.num_samples, e.inception_path, e.inception_batch_size = 16, inception_path, 10
  return config


@pytest.fixture(scope='module')
def random_inception_path(tmp_path_factory) -> str:
  path = tmp_path_factory.mktemp('inception') / 'random_inception.npz'
  inception.save_variables(inception.random_inception_variables(0), path)
  return str(path)


@pytest.fixture
def no_sampling(monkeypatch):
  """Fails the test if anything is sampled."""
  monkeypatch.setattr(inference, 'sample_images', mock.Mock(side_effect=AssertionError('sampled')))


# --------------------------------------------------------------------------------------------------
# Errors a user can cause, raised before anything is sampled.
# --------------------------------------------------------------------------------------------------
def test_missing_inception_weights_raise_before_sampling(tmp_path, no_sampling):
  config = tiny_cifar10_config(tmp_path, str(tmp_path / 'absent.npz'))
  # The workdir has no checkpoint either: the weights are reported first, with the fix.
  with pytest.raises(inception.PretrainedWeightsNotFoundError, match='convert'):
    eval_mode.run(config, str(tmp_path / 'run'))


@pytest.mark.parametrize('arrays, match', [
    ({'arr_0': np.zeros((4, 32, 32, 3), np.float32)}, 'dtype float32'),
    ({'arr_0': np.zeros((4, 8, 8, 1), np.uint8)}, r'\[N, 32, 32, 3\]'),
    ({'images': np.zeros((4, 32, 32, 3), np.uint8)}, 'no arr_0'),
    ({'arr_0': np.zeros((1, 32, 32, 3), np.uint8)}, 'at least 2 samples'),
    ({'arr_0': np.zeros((3, 32, 32, 3), np.uint8)}, 'eval.pr_k=3'),
])
def test_bad_samples_npz_is_refused_first(tmp_path, no_sampling, arrays, match):
  path = tmp_path / 'samples.npz'
  np.savez(path, **arrays)
  config = tiny_cifar10_config(tmp_path, str(tmp_path / 'absent.npz'))
  with pytest.raises(ConfigError, match=match):
    eval_mode.run(config, str(tmp_path / 'run'), str(path))


def test_missing_npz_and_bad_settings(tmp_path, no_sampling):
  config = tiny_cifar10_config(tmp_path, str(tmp_path / 'absent.npz'))
  with pytest.raises(ConfigError, match='does not exist'):
    eval_mode.run(config, str(tmp_path / 'run'), str(tmp_path / 'nothing.npz'))
  config.eval.num_samples = 1
  with pytest.raises(ConfigError, match='at least 2'):
    eval_mode.run(config, str(tmp_path / 'run'))
  config.eval.num_samples = 16
  config.eval.is_splits = 0
  with pytest.raises(ConfigError, match='is_splits'):
    eval_mode.run(config, str(tmp_path / 'run'))


def test_reference_stats_key_names_everything_that_changes_them(tmp_path):
  config = tiny_cifar10_config(tmp_path, '')
  base = image_metrics.reference_stats_path(config, '/run', 'ab' * 32)
  assert base.startswith('/run/stats/')
  variants = [image_metrics.reference_stats_path(config, '/run', 'cd' * 32)]
  for section, key, value in [('eval', 'ref_split', 'test'), ('data', 'image_size', 64),
                              ('eval', 'max_ref_images', 0), ('data', 'name', 'lsun/bedroom')]:
    changed = tiny_cifar10_config(tmp_path, '')
    changed[section][key] = value
    variants.append(image_metrics.reference_stats_path(changed, '/run', 'ab' * 32))
  assert len({base, *variants}) == len(variants) + 1
  assert '/' not in os.path.basename(variants[-1])
  config.eval.stats_dir = '/shared/stats'
  assert image_metrics.reference_stats_path(config, '/run', 'ab' * 32).startswith('/shared/stats/')


def test_result_name_of_an_npz():
  assert eval_mode.name_of_npz('/w/samples/multistep_nfe2/samples_10x8x8x1.npz') == (
      'multistep_nfe2', 'multistep', 2)
  assert eval_mode.name_of_npz('/x/samples_10x8x8x1.npz') == ('samples_10x8x8x1', None, None)


def test_workdir_of_another_model_is_refused_before_sampling(tmp_path, digits_data_dir, no_sampling):
  config = default.get_config()
  config.data.data_dir = digits_data_dir
  saved = default.get_config()
  saved.model.nf = 64
  workdir = tmp_path / 'run'
  workdir.mkdir()
  flat = json.loads(saved.to_json_best_effort())
  del flat['model']['conv_size']  # A field added after the run: its default stands.
  (workdir / 'config.json').write_text(json.dumps(flat))
  with pytest.raises(WorkdirError, match=r'model.nf: 64 in the workdir, 32 now\)'):
    eval_mode.run(config, str(workdir))


# --------------------------------------------------------------------------------------------------
# Digits: the digits metric on an npz of real test digits.
# --------------------------------------------------------------------------------------------------
def test_digits_npz_gets_the_digits_metric(tmp_path, digits_data_dir):
  config = default.get_config()
  config.data.data_dir = digits_data_dir
  images, _ = data.load_split(config.data, 'test', process_index=0, process_count=1)
  npz = outputs.write_samples(str(tmp_path / 'run' / 'samples' / 'onestep_nfe1'), images, None)
  results = eval_mode.run(config, str(tmp_path / 'run'), npz)
  result = results['onestep_nfe1']
  assert (result['sampler'], result['nfe'], result['num_samples']) == ('onestep', 1, len(images))
  scores = result['metrics']
  assert set(scores) == {'digits_fd', 'digits_confidence', 'digits_classes', 'digits_class_entropy'}
  # Real held-out digits: all classes, near-uniform, close to the train statistics.
  assert scores['digits_classes'] == 10
  assert scores['digits_class_entropy'] > 2.2
  assert 0 <= scores['digits_fd'] < 5.0
  with open(tmp_path / 'run' / 'eval' / 'onestep_nfe1.json') as f:
    assert json.load(f)['metrics'] == scores
  with open(tmp_path / 'run' / 'metrics.json') as f:
    assert json.load(f)['eval/onestep_nfe1']['metrics'] == scores


# --------------------------------------------------------------------------------------------------
# CIFAR-10 end to end, on mock data with a random Inception.
# --------------------------------------------------------------------------------------------------
def _memoised(frechet_distance):
  """frechet_distance computed once per distinct input (the bytes of its four arrays).

  Scoring the written npz gives the sampled statistics again; scipy's sqrtm of a 2048x2048 product
  costs 45-65 CPU seconds on 2 cores, so equal inputs share it. Inputs that differ in a single bit
  are computed anew, and then (almost surely) give another value, which the test would catch."""
  values = {}

  def memoised(mu1, sigma1, mu2, sigma2):
    key = hashlib.sha256(b''.join(np.ascontiguousarray(a, np.float64).tobytes()
                                  for a in (mu1, sigma1, mu2, sigma2))).hexdigest()
    if key not in values:
      values[key] = frechet_distance(mu1, sigma1, mu2, sigma2)
    return values[key]
  return memoised


def _frechet_distance_by_eigh(mu1, sigma1, mu2, sigma2):
  """The same value as metrics.frechet_distance for covariances, by the route test_metrics checks it
  against: Tr sqrt(S1 S2) = Tr sqrt(S1^1/2 S2 S1^1/2), two symmetric eigendecompositions (a few
  seconds at 2048 dimensions, where scipy's general sqrtm takes a minute)."""
  w, v = np.linalg.eigh(np.asarray(sigma1, np.float64))
  root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
  tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh(root1 @ sigma2 @ root1), 0, None)).sum()
  diff = np.asarray(mu1, np.float64) - mu2
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


@pytest.mark.slow
def test_cifar10_eval_end_to_end(tmp_path, random_inception_path, monkeypatch):
  config = tiny_cifar10_config(tmp_path, random_inception_path)
  # Inception at 75x75 (the smallest input its valid convolutions and pools take) instead of 299x299:
  # the same layers, variables and 2048 pool features at 1/16 of the FLOPs. What is tested is how
  # eval feeds and reads the network; test_inception checks the network itself at 299x299.
  monkeypatch.setattr(inception, 'INCEPTION_SIZE', 75)
  # One real FID of the sampled images (scipy's sqrtm on the few-sample, full-dimension statistics the
  # pipeline produces); their re-score from the npz must equal it, so it is looked up, not recomputed.
  monkeypatch.setattr(metrics, 'frechet_distance', _memoised(metrics.frechet_distance))
  workdir = str(tmp_path / 'run')
  load_split = mock.Mock(wraps=data.load_split)
  with tfds.testing.mock_data(num_examples=20), \
      mock.patch.object(tfds.core.DatasetBuilder, 'is_prepared', return_value=True), \
      mock.patch.object(data, 'load_split', load_split):
    assert tiny.train(config, workdir).step == 2

    first = eval_mode.run(config, workdir)
    assert list(first) == ['heun_nfe3']
    result = first['heun_nfe3']
    assert (result['sampler'], result['nfe'], result['num_samples'], result['step']) == (
        'heun', 3, 16, 2)
    with np.load(result['samples_npz']) as arrays:
      samples = arrays['arr_0']
    assert samples.shape == (16, 32, 32, 3) and samples.dtype == np.uint8
    scores = result['metrics']
    assert set(scores) == {'fid', 'inception_score', 'inception_score_std', 'precision', 'recall'}
    assert all(np.isfinite(v) for v in scores.values()), scores
    # Samples of a 2-step model against real images: far apart, whatever the (random) Inception.
    assert scores['fid'] > 1.0 and scores['inception_score'] >= 1.0
    assert 0 <= scores['precision'] <= 1 and 0 <= scores['recall'] <= 1
    # The reference images themselves score as a perfect generator: FID 0, precision = recall = 1.
    real, _ = data.load_split(config.data, 'train', process_index=0, process_count=1)
    real_npz = outputs.write_samples(str(tmp_path / 'real'), real, None)
    with mock.patch.object(metrics, 'frechet_distance', _frechet_distance_by_eigh):
      perfect = eval_mode.run(config, workdir, real_npz)['samples_20x32x32x3']['metrics']
    assert perfect['fid'] == pytest.approx(0.0, abs=1e-3)
    assert (perfect['precision'], perfect['recall']) == (1.0, 1.0)

    # The reference statistics: the 20 mock train images, cached under <workdir>/stats.
    stats_path = result['reference_stats']
    assert os.path.dirname(stats_path) == os.path.join(workdir, 'stats')
    with np.load(stats_path) as stats:
      assert stats['features'].shape == (20, 2048)
      assert stats['mu'].shape == (2048,) and stats['sigma'].shape == (2048, 2048)
    reads = load_split.call_count
    mtime = os.path.getmtime(stats_path)
    with np.load(stats_path) as stats:
      np.testing.assert_allclose(stats['mu'], stats['features'].mean(axis=0), rtol=1e-5, atol=1e-6)

    # The written npz scores the same as sampling did, from the cached statistics.
    second = eval_mode.run(config, workdir, result['samples_npz'])
  assert load_split.call_count == reads  # Nothing read again.
  assert os.path.getmtime(stats_path) == mtime
  assert list(second) == ['heun_nfe3']
  assert second['heun_nfe3']['metrics'] == scores

  with open(os.path.join(workdir, 'eval', 'heun_nfe3.json')) as f:
    assert json.load(f)['metrics'] == scores
  with open(os.path.join(workdir, 'metrics.json')) as f:
    assert json.load(f)['eval/heun_nfe3']['metrics'] == scores
  assert any(name.startswith('events.out.tfevents') for name in os.listdir(os.path.join(workdir, 'eval')))


# --------------------------------------------------------------------------------------------------
# Two processes: features split over processes and gathered back in order.
# --------------------------------------------------------------------------------------------------
def pixel_features(variables, pixels):
  """A stand-in for Inception: the pixels themselves (fast, and any misordering shows)."""
  del variables
  flat = pixels.reshape(pixels.shape[0], -1)
  return {'pool': flat, 'logits': flat[:, :10], 'logits_unbiased': flat[:, :10]}


_TWO_PROCESS_WORKER = textwrap.dedent("""
    import sys
    import jax
    import numpy as np
    process_id, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    jax.distributed.initialize(f'localhost:{port}', num_processes=2, process_id=process_id,
                               initialization_timeout=60)
    from cm_jax.evaluators import image_metrics
    from configs import default
    from tests.test_evaluate import pixel_features
    assert (jax.process_count(), jax.device_count()) == (2, 4)
    config = default.get_config()  # data_dir '' reads $TFDS_DATA_DIR.
    config.eval.max_ref_images = 500
    samples = np.random.default_rng(0).integers(0, 256, (11, 8, 8, 1), dtype=np.uint8)
    fake = (pixel_features, {})
    features = image_metrics.sample_features(fake, samples, 4)
    reference, total = image_metrics._reference_features(config, fake)
    # Computed once (process 0 writes), then read back by both processes.
    computed = [image_metrics.reference_stats(config, sys.argv[4], fake, '0' * 64)['computed']
                for _ in range(2)]
    assert computed == [True, False], computed
    np.savez(out, samples=features['pool'], reference=reference, total=total)
""")


@pytest.mark.slow
def test_two_processes_gather_features_in_order(tmp_path, digits_data_dir):
  """2 JAX processes x 2 CPU devices give the features one process computes, in the same order."""
  data_dir = digits_data_dir
  config = default.get_config()
  config.data.data_dir = data_dir
  config.eval.max_ref_images = 500
  with socket.socket() as probe:
    probe.bind(('localhost', 0))
    port = probe.getsockname()[1]
  env = dict(os.environ, TFDS_DATA_DIR=data_dir, PYTHONPATH=REPO_ROOT, JAX_PLATFORMS='cpu',
             XLA_FLAGS='--xla_force_host_platform_device_count=2')
  workers = [subprocess.Popen(
      [sys.executable, '-c', _TWO_PROCESS_WORKER, str(i), str(port), str(tmp_path / f'{i}.npz'),
       str(tmp_path / 'run')],
      env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
  for worker in workers:
    output, _ = worker.communicate(timeout=150)
    assert worker.returncode == 0, output[-3000:]

  fake = (pixel_features, {})
  samples = np.random.default_rng(0).integers(0, 256, (11, 8, 8, 1), dtype=np.uint8)
  expected_samples = np.repeat(samples.astype(np.float32), 3, axis=-1).reshape(11, -1)
  expected_reference, total = image_metrics._reference_features(config, fake)
  assert expected_reference.shape == (500, 192) and total > 500  # A subset of the split.
  for i in range(2):
    with np.load(tmp_path / f'{i}.npz') as got:
      np.testing.assert_array_equal(got['samples'], expected_samples)
      np.testing.assert_array_equal(got['reference'], expected_reference)
      assert int(got['total']) == total


def test_a_reference_batch_gives_its_own_statistics(tmp_path):
  """eval.ref_batch (the ADM evaluator's VIRTUAL_imagenet64_labeled.npz format): FID against the
  file's mu and sigma, precision/recall against features of its images; cached by the file's hash."""
  config = default.get_config()
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (30, 8, 8, 1), dtype=np.uint8)
  mu, root = rng.normal(size=192), rng.normal(size=(192, 192))
  path = tmp_path / 'VIRTUAL_digits.npz'
  np.savez(path, arr_0=images, mu=mu, sigma=root @ root.T)
  config.eval.ref_batch = str(path)
  fake = (pixel_features, {})
  first = image_metrics.reference_stats(config, str(tmp_path / 'run'), fake, '0' * 64)
  np.testing.assert_array_equal(first['mu'], mu)
  np.testing.assert_array_equal(first['sigma'], root @ root.T)
  np.testing.assert_array_equal(first['features'],
                                np.repeat(images.astype(np.float32), 3, axis=-1).reshape(30, -1))
  assert first['computed'] and 'refbatch-' in os.path.basename(first['path'])
  again = image_metrics.reference_stats(config, str(tmp_path / 'run'), fake, '0' * 64)
  assert not again['computed']
  np.savez(path, arr_0=images, mu=mu + 1, sigma=root @ root.T)  # Another file: recomputed.
  other = image_metrics.reference_stats(config, str(tmp_path / 'run'), fake, '0' * 64)
  assert other['computed'] and other['path'] != first['path']
  np.savez(path, arr_0=images)
  with pytest.raises(ConfigError, match=r"lacks \['mu', 'sigma'\]"):
    image_metrics.reference_stats(config, str(tmp_path / 'run2'), fake, '0' * 64)
  config.data.name = 'cifar10'  # Only image datasets read it (the digits metric has its own).
  config.eval.ref_batch = str(tmp_path / 'missing.npz')
  with pytest.raises(ConfigError, match='eval.ref_batch=.*does not exist'):
    image_metrics.check_eval_config(config)

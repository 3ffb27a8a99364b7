"""The digits metric: an accurate, reproducible, cached classifier, and a metric that can fail."""

import os

import numpy as np
import pytest

from cm_jax import errors
from cm_jax.evaluation import digits_metric
from configs import default


@pytest.fixture(scope='module')
def data_config(tmp_path_factory):
  config = default.get_config().data
  config.data_dir = str(tmp_path_factory.mktemp('tfds'))  # The embedded dataset is built here.
  return config


@pytest.fixture(scope='module')
def cache_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('cm_jax_cache'))


@pytest.fixture(scope='module')
def metric(data_config, cache_dir):
  return digits_metric.DigitsMetric(data_config, cache_dir)


@pytest.fixture(scope='module')
def train_split(data_config):
  return digits_metric.load_whole_split(data_config, data_config.split)


@pytest.fixture(scope='module')
def test_split(data_config):
  return digits_metric.load_whole_split(data_config, data_config.eval_split)


def _variables_equal(a, b) -> bool:
  flat_a = digits_metric.traverse_util.flatten_dict(a)
  flat_b = digits_metric.traverse_util.flatten_dict(b)
  return flat_a.keys() == flat_b.keys() and all(np.array_equal(flat_a[k], flat_b[k]) for k in flat_a)


class TestClassifier:

  def test_trained_into_the_cache(self, metric, cache_dir):
    assert metric.trained
    assert os.path.dirname(metric.cache_path) == cache_dir and os.path.exists(metric.cache_path)
    assert not [name for name in os.listdir(cache_dir) if name.endswith('.tmp')]

  def test_test_accuracy_above_95_percent(self, metric, test_split):
    images, labels = test_split
    _, logits = metric.features_and_logits(images)
    accuracy = np.mean(logits.argmax(axis=1) == labels)
    assert accuracy > 0.95
    assert metric.test_accuracy == pytest.approx(accuracy)

  def test_training_is_reproducible(self, metric, train_split):
    retrained = digits_metric.train_classifier(*train_split)
    assert _variables_equal(retrained, metric.variables)

  def test_cache_is_reused(self, metric, data_config, cache_dir, test_split, monkeypatch):
    def fail(*args, **kwargs):
      raise AssertionError('the classifier was retrained despite the cache')

    monkeypatch.setattr(digits_metric, 'train_classifier', fail)
    mtime = os.path.getmtime(metric.cache_path)
    reloaded = digits_metric.DigitsMetric(data_config, cache_dir)
    assert not reloaded.trained and os.path.getmtime(metric.cache_path) == mtime
    assert _variables_equal(reloaded.variables, metric.variables)
    np.testing.assert_array_equal(reloaded.train_sigma, metric.train_sigma)
    assert reloaded(test_split[0]) == metric(test_split[0])

  def test_damaged_cache_is_rebuilt(self, metric, data_config, tmp_path, monkeypatch):
    calls = []

    def reuse_trained(*args, **kwargs):  # Stands in for training, which the first metric already did.
      calls.append(1)
      return metric.variables

    monkeypatch.setattr(digits_metric, 'train_classifier', reuse_trained)
    path = digits_metric.cache_path(data_config, str(tmp_path))
    with open(path, 'wb') as f:
      f.write(b'not an npz')
    rebuilt = digits_metric.DigitsMetric(data_config, str(tmp_path))
    assert rebuilt.trained and calls == [1]
    np.testing.assert_allclose(rebuilt.train_mu, metric.train_mu, rtol=1e-6)
    assert not digits_metric.DigitsMetric(data_config, str(tmp_path)).trained  # A valid file now.

  def test_cache_name_tracks_recipe_and_version(self, data_config, cache_dir):
    path = digits_metric.cache_path(data_config, cache_dir)
    assert digits_metric.CACHE_VERSION in os.path.basename(path)
    assert path == digits_metric.cache_path(data_config, cache_dir, digits_metric.ClassifierRecipe())
    assert path != digits_metric.cache_path(data_config, cache_dir, digits_metric.ClassifierRecipe(seed=1))
    assert path != digits_metric.cache_path(data_config, cache_dir,
                                            digits_metric.ClassifierRecipe(num_steps=499))


class TestMetric:

  def test_real_test_split_scores_well(self, metric, test_split):
    result = metric(test_split[0])
    assert set(result) == {'digits_fd', 'digits_confidence', 'digits_classes', 'digits_class_entropy'}
    assert 0 < result['digits_fd'] < 10
    assert result['digits_classes'] == 10
    assert result['digits_class_entropy'] > 2.25  # ln 10 = 2.303.
    assert result['digits_confidence'] > 0.95

  def test_float_and_uint8_inputs_agree(self, metric, test_split):
    images = test_split[0]
    as_float = images.astype(np.float32) / 127.5 - 1.0
    for key, value in metric(images).items():
      assert metric(as_float)[key] == pytest.approx(value, rel=1e-6)

  def test_train_split_against_its_own_stats_is_zero(self, metric, train_split):
    assert metric(train_split[0])['digits_fd'] == pytest.approx(0.0, abs=1e-3)

  def test_pure_noise_fails(self, metric):
    noise = np.random.default_rng(0).uniform(-1, 1, size=(500, 8, 8, 1)).astype(np.float32)
    result = metric(noise)
    assert result['digits_fd'] > 100
    assert result['digits_confidence'] < 0.9

  def test_one_repeated_image_fails(self, metric, train_split):
    result = metric(np.repeat(train_split[0][:1], 500, axis=0))
    assert result['digits_fd'] > 100
    assert result['digits_classes'] == 1 and result['digits_class_entropy'] == 0.0

  def test_one_class_fails(self, metric, train_split):
    images, labels = train_split
    result = metric(images[labels == 3])
    assert result['digits_fd'] > 100
    assert result['digits_classes'] == 1 and result['digits_class_entropy'] < 0.1

  def test_corruptions_rank_in_order(self, data_config, cache_dir, metric):
    del metric  # Only to train the classifier first.
    reference = digits_metric.real_vs_real_reference(data_config, cache_dir, noise_stds=(0.2, 0.5),
                                                     blur_sigmas=(1.0,))
    fds = [r['digits_fd'] for r in reference.values()]
    names = list(reference)
    assert 'perfect generator' in names[0] and 'uniform noise' in names[-1]
    # Test split < noise 0.2 < noise 0.5 < blur 1 px < class 0 only.
    assert fds[0] < fds[3] < fds[4] < fds[5] < fds[6]
    assert 'digits_fd' in digits_metric.format_table(reference).splitlines()[0]


class TestInputChecks:

  @pytest.mark.parametrize('shape', [(4, 8, 8), (4, 8, 8, 3), (4, 16, 16, 1)])
  def test_wrong_shape(self, metric, shape):
    with pytest.raises(ValueError, match=r'\[N, 8, 8, 1\]'):
      metric(np.zeros(shape, np.uint8))

  def test_integer_dtype_other_than_uint8(self, metric):
    with pytest.raises(ValueError, match='uint8'):
      metric(np.zeros((4, 8, 8, 1), np.int64))

  def test_float_images_in_0_255(self, metric):
    with pytest.raises(ValueError, match=r'\[-1, 1\]'):
      metric(np.full((4, 8, 8, 1), 200.0, np.float32))

  def test_single_image(self, metric):
    with pytest.raises(ValueError, match='at least 2'):
      metric(np.zeros((1, 8, 8, 1), np.uint8))

  def test_other_dataset(self, data_config):
    config = data_config.copy_and_resolve_references()
    config.name = 'cifar10'
    with pytest.raises(errors.ConfigError, match='sklearn_digits'):
      digits_metric.DigitsMetric(config)

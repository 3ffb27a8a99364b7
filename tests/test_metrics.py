"""Closed-form checks of the metric maths in cm_jax.evaluation.metrics."""

import numpy as np
import pytest
from scipy.spatial import distance

from cm_jax.evaluation import metrics


def _random_covariance(rng: np.random.Generator, dim: int) -> np.ndarray:
  a = rng.normal(size=(dim, 2 * dim))
  return a @ a.T / (2 * dim) + 0.1 * np.eye(dim)


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
  eigvals, eigvecs = np.linalg.eigh(matrix)
  return (eigvecs * np.sqrt(np.clip(eigvals, 0, None))) @ eigvecs.T


class TestFeatureStats:

  def test_matches_unbiased_covariance(self):
    rng = np.random.default_rng(0)
    features = rng.normal(size=(50, 4)).astype(np.float32)
    mu, sigma = metrics.feature_stats(features)
    centred = features.astype(np.float64) - features.mean(axis=0, dtype=np.float64)
    np.testing.assert_allclose(mu, features.mean(axis=0, dtype=np.float64), rtol=1e-12)
    np.testing.assert_allclose(sigma, centred.T @ centred / 49, rtol=1e-10)
    assert mu.dtype == np.float64 and sigma.dtype == np.float64

  def test_one_dimensional_features_give_a_1x1_covariance(self):
    _, sigma = metrics.feature_stats(np.array([[0.0], [2.0]]))
    assert sigma.shape == (1, 1) and sigma[0, 0] == pytest.approx(2.0)


class TestFrechetDistance:

  def test_diagonal_covariances_closed_form(self):
    rng = np.random.default_rng(1)
    a, b = rng.uniform(0.1, 3.0, size=8), rng.uniform(0.1, 3.0, size=8)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    expected = np.sum((mu1 - mu2)**2) + np.sum((np.sqrt(a) - np.sqrt(b))**2)
    assert metrics.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)

  def test_one_dimensional_gaussians(self):
    # W2^2 between N(m1, s1^2) and N(m2, s2^2) is (m1 - m2)^2 + (s1 - s2)^2.
    fd = metrics.frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([-2.0]), np.array([[9.0]]))
    assert fd == pytest.approx(3.0**2 + (2.0 - 3.0)**2, rel=1e-12)

  def test_zero_for_identical_stats_and_symmetric(self):
    rng = np.random.default_rng(2)
    mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
    sigma1, sigma2 = _random_covariance(rng, 16), _random_covariance(rng, 16)
    assert metrics.frechet_distance(mu1, sigma1, mu1, sigma1) == pytest.approx(0.0, abs=1e-8)
    assert metrics.frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(
        metrics.frechet_distance(mu2, sigma2, mu1, sigma1), rel=1e-9)

  def test_matches_eigendecomposition(self):
    # Tr sqrt(S1 S2) = Tr sqrt(S1^1/2 S2 S1^1/2), a symmetric PSD matrix: an independent route via eigh.
    rng = np.random.default_rng(3)
    for dim in (3, 32):
      mu1, mu2 = rng.normal(size=dim), rng.normal(size=dim)
      sigma1, sigma2 = _random_covariance(rng, dim), _random_covariance(rng, dim)
      root1 = _psd_sqrt(sigma1)
      tr_covmean = np.sum(np.sqrt(np.clip(np.linalg.eigvalsh(root1 @ sigma2 @ root1), 0, None)))
      expected = np.sum((mu1 - mu2)**2) + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean
      assert metrics.frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, abs=1e-6)

  def test_singular_covariances_from_few_samples(self):
    # Fewer samples than dimensions (rank-deficient covariances): the value of the formula, with the
    # trace of sqrt(S1 S2) from the eigenvalues of S1^1/2 S2 S1^1/2 (real, >= 0 up to rounding).
    rng = np.random.default_rng(4)
    mu1, sigma1 = metrics.feature_stats(rng.normal(size=(5, 20)))
    mu2, sigma2 = metrics.feature_stats(rng.normal(size=(5, 20)) + 1.0)
    root1 = _psd_sqrt(sigma1)
    tr_covmean = np.sum(np.sqrt(np.clip(np.linalg.eigvalsh(root1 @ sigma2 @ root1), 0, None)))
    expected = np.sum((mu1 - mu2)**2) + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean
    assert metrics.frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-6)

  def test_shape_mismatch_raises(self):
    with pytest.raises(ValueError, match='Covariances'):
      metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(2))


class TestInceptionScore:

  def test_uniform_predictions_score_one(self):
    mean, std = metrics.inception_score(np.full((100, 10), 0.1))
    assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)

  def test_constant_logits_score_one(self):
    mean, _ = metrics.inception_score(np.tile(np.array([[3.0, -1.0, 0.5]]), (40, 1)), num_splits=4)
    assert mean == pytest.approx(1.0, abs=1e-12)

  @pytest.mark.parametrize('num_classes', [2, 7, 10])
  def test_even_one_hot_predictions_score_num_classes(self, num_classes):
    # Every split of 10 holds each class equally often.
    labels = np.tile(np.arange(num_classes), 10 * 3)
    mean, std = metrics.inception_score(np.eye(num_classes)[labels], num_splits=10)
    assert mean == pytest.approx(num_classes, rel=1e-12) and std == pytest.approx(0.0, abs=1e-9)

  def test_confident_logits_approach_num_classes(self):
    labels = np.tile(np.arange(5), 20)
    mean, _ = metrics.inception_score(50.0 * np.eye(5)[labels], num_splits=2)
    assert mean == pytest.approx(5.0, rel=1e-6)


class TestPrecisionRecall:

  def test_identical_sets(self):
    features = np.random.default_rng(5).normal(size=(300, 16))
    result = metrics.precision_recall(features, features, k=3, batch_size=128)
    assert result == {'precision': 1.0, 'recall': 1.0}

  def test_far_apart_clusters(self):
    rng = np.random.default_rng(6)
    real = rng.normal(size=(200, 8))
    fake = rng.normal(size=(150, 8)) + 100.0
    assert metrics.precision_recall(real, fake, k=3, batch_size=64) == {'precision': 0.0, 'recall': 0.0}

  def test_hand_worked_1d_example(self):
    # k=1 radii. Real [0, 1, 2, 3, 10]: 1, 1, 1, 1, 7. Fake [4.5, 20, -0.5, 17.5]: 5, 2.5, 5, 2.5.
    # Precision: 4.5 (5.5 from 10 <= 7) and -0.5 (0.5 from 0 <= 1) are inside; 20, 17.5 are not -> 2/4.
    # Recall: 0, 1, 2, 3 are within 5 of -0.5 or 4.5; 10 is 5.5 from 4.5 and 7.5 from 17.5 -> 4/5.
    real = np.array([[0.0], [1.0], [2.0], [3.0], [10.0]])
    fake = np.array([[4.5], [20.0], [-0.5], [17.5]])
    for batch_size in (2, 3, 1024):  # Chunking and padding must not change the answer.
      result = metrics.precision_recall(real, fake, k=1, batch_size=batch_size)
      assert result['precision'] == pytest.approx(0.5)
      assert result['recall'] == pytest.approx(0.8)

  def test_hand_worked_k2(self):
    # k=2 radii of real [0, 1, 3]: 3, 2, 3. Fake [6.5, -2.5, 5]: 6.5 out (3.5 from 3), -2.5 in (2.5 <= 3),
    # 5 in (2 from 3) -> 2/3. Fake radii: 6.5 -> 9, -2.5 -> 9, 5 -> 7.5: every real point is inside -> 1.
    real = np.array([[0.0], [1.0], [3.0]])
    fake = np.array([[6.5], [-2.5], [5.0]])
    result = metrics.precision_recall(real, fake, k=2, batch_size=2)
    assert result == {'precision': pytest.approx(2 / 3), 'recall': 1.0}

  def test_matches_brute_force(self):
    rng = np.random.default_rng(8)
    real, fake = rng.normal(size=(120, 5)), rng.normal(size=(90, 5)) * 1.3 + 0.2

    def brute_force_inside(queries, centres):
      radii = np.sort(distance.cdist(centres, centres), axis=1)[:, 3]  # Column 0 is the point itself.
      return np.mean(np.any(distance.cdist(queries, centres) <= radii[None, :], axis=1))

    result = metrics.precision_recall(real, fake, k=3, batch_size=32)
    assert result['precision'] == pytest.approx(brute_force_inside(fake, real))
    assert result['recall'] == pytest.approx(brute_force_inside(real, fake))

  def test_dropped_mode_keeps_precision_and_halves_recall(self):
    rng = np.random.default_rng(7)
    offset = np.array([20.0, 0.0, 0.0, 0.0])
    real = np.concatenate([rng.normal(size=(300, 4)), rng.normal(size=(300, 4)) + offset])
    fake = rng.normal(size=(300, 4))  # Fresh samples of the first mode only.
    result = metrics.precision_recall(real, fake, k=3)
    assert result['precision'] > 0.8
    assert 0.3 < result['recall'] <= 0.5

  def test_too_few_points_raise(self):
    with pytest.raises(ValueError, match='k=3'):
      metrics.precision_recall(np.zeros((3, 2)), np.zeros((10, 2)), k=3)

"""scikit-learn's bundled handwritten digits as a TFDS dataset, built locally.

1,797 real 8x8 grey images (UCI optical recognition of handwritten digits, the copy that ships inside
scikit-learn) with labels 0..9. Pixels are counts 0..16 in the original; here they are scaled to uint8
0..255 as round(v * 255 / 16). Nothing is downloaded: `_split_generators` reads the arrays from the
installed scikit-learn package, so the dataset builds offline on first use and is reused afterwards:

  import cm_jax.datasets  # Registers 'sklearn_digits'.
  builder = tfds.builder('sklearn_digits', data_dir=...)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(try_download_gcs=False),
      file_format='array_record')
"""

from typing import Iterator

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

# Fraction of each class held out for 'test'.
TEST_FRACTION = 0.2
# The split is a seeded permutation drawn with the legacy `RandomState`, whose stream NumPy keeps
# frozen across releases (NEP 19), so the train/test membership never changes with the NumPy version.
_SPLIT_SEED = 20230301


def load_scaled_digits() -> tuple[np.ndarray, np.ndarray]:
  """Returns scikit-learn's digits as (uint8 [1797, 8, 8, 1] in 0..255, int64 [1797] labels)."""
  from sklearn import datasets as sk_datasets  # pylint: disable=g-import-not-at-top

  digits = sk_datasets.load_digits()
  # Values are integer counts 0..16; round(v * 255 / 16) maps them onto the full uint8 range.
  images = np.round(digits.images.astype(np.float64) * 255.0 / 16.0)
  images = images.astype(np.uint8)[..., None]
  return images, digits.target.astype(np.int64)


def split_indices(labels: np.ndarray) -> dict[str, np.ndarray]:
  """A fixed stratified train/test split: {'train': indices, 'test': indices}, each sorted.

  Each class contributes round(TEST_FRACTION * count) examples to 'test', chosen by one seeded
  permutation of the whole dataset, so both splits hold every label in its original proportion.
  """
  order = np.random.RandomState(_SPLIT_SEED).permutation(len(labels))
  test = []
  for label in np.unique(labels):
    members = order[labels[order] == label]  # This class, in permuted order.
    test.append(members[:int(round(TEST_FRACTION * len(members)))])
  is_test = np.zeros(len(labels), bool)
  is_test[np.concatenate(test)] = True
  return {'train': np.flatnonzero(~is_test), 'test': np.flatnonzero(is_test)}


class SklearnDigits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn's 8x8 handwritten digits (real data, embedded, no network)."""

  # 1.1.0 is written as ArrayRecord files (random access for the input pipeline); its records are
  # those of 1.0.0 (TFRecord files), in the same order. A data_dir holding only 1.0.0 gets 1.1.0
  # built beside it on first use.
  VERSION = tfds.core.Version('1.1.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release: stratified 80/20 train/test split.',
                   '1.1.0': 'ArrayRecord files; the same examples in the same order.'}
  # TFDS 4.9.10 resolves `code_path` of a builder that lives in a package through
  # `importlib_resources`, which it only declares for Python < 3.9, so `download_and_prepare`
  # fails with ModuleNotFoundError (tensorflow/datasets#11212). The plain file path is what TFDS
  # falls back to anyway.
  code_path = epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=(
            'The handwritten digits bundled with scikit-learn (sklearn.datasets.load_digits): '
            '1,797 8x8 grey images from the UCI optical recognition of handwritten digits data, '
            'pixel counts 0..16 scaled to 0..255. `index` is the row in load_digits().'),
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(8, 8, 1), dtype=np.uint8),
            'label': tfds.features.ClassLabel(num_classes=10),
            'index': tfds.features.Scalar(dtype=np.int32),
        }),
        supervised_keys=('image', 'label'),
        homepage='https://archive.ics.uci.edu/dataset/80/optical+recognition+of+handwritten+digits',
        citation=(
            '@misc{alpaydin1998optdigits, author={Alpaydin, E. and Kaynak, C.}, '
            'title={Optical Recognition of Handwritten Digits}, year={1998}, '
            'howpublished={UCI Machine Learning Repository}}'),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # The data ships with scikit-learn: nothing to download.
    images, labels = load_scaled_digits()
    return {
        name: self._generate_examples(images, labels, indices)
        for name, indices in split_indices(labels).items()
    }

  def _generate_examples(self, images: np.ndarray, labels: np.ndarray,
                         indices: np.ndarray) -> Iterator[tuple[int, dict]]:
    for index in indices:
      yield int(index), {
          'image': images[index],
          'label': int(labels[index]),
          'index': int(index),
      }

"""The input pipeline: TFDS splits held in host memory as uint8, batches as global jax.Arrays.

The order of examples is a pure function of (seed, step): epoch e visits the split in the order of a
permutation drawn from `np.random.default_rng([seed, e])`, and the global batch at `step` is the slice
[step * B, (step + 1) * B) of the concatenated epochs. Every process holds the whole split and builds only
the rows of the global batch that its devices hold, so the global batch neither depends on the number of
processes or devices nor on where a run was resumed.

Nothing is ever downloaded implicitly: the embedded 'sklearn_digits' dataset is built locally on first
use, and any other TFDS dataset must already be prepared in `data.data_dir`.
"""

import math
import time
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from cm_jax import datasets as cm_datasets
from cm_jax.errors import ConfigError, DatasetNotFoundError

# Tags the flip stream's seed so it never coincides with an epoch permutation's seed.
_FLIP_STREAM = 0x666C6970  # 'flip'
# Examples per tf.data batch while a split is read into memory.
_READ_BATCH = 4096


def to_float(images_uint8: np.ndarray) -> np.ndarray:
  """uint8 [0, 255] -> float32 [-1, 1] (the models' image range)."""
  return np.asarray(images_uint8, np.float32) / 127.5 - 1.0


# Added before truncating in `to_uint8`: float32's error in (to_float(u) + 1) * 127.5 is below 4e-6,
# so every uint8 image comes back exactly, while a generated value is moved up a level only within
# 1e-4 of the next one (one pixel value in 10,000).
_TRUNCATION_SLACK = 1e-4


def to_uint8(images: np.ndarray) -> np.ndarray:
  """Float images in [-1, 1] -> uint8 [0, 255] as both reference codebases write samples:
  (x + 1) * 127.5 in float32, clipped, then truncated (not rounded), so FIDs compare like for like.
  """
  images = np.asarray(images, np.float32)
  return np.clip((images + 1.0) * np.float32(127.5) + _TRUNCATION_SLACK, 0, 255).astype(np.uint8)


def _hide_gpus_from_tf() -> None:
  # TF only reads files here; left alone it would reserve GPU memory that JAX needs.
  try:
    tf.config.set_visible_devices([], 'GPU')
  except RuntimeError:  # TF already initialised its devices: nothing left to do.
    pass


def _data_dir(data_config: ml_collections.ConfigDict) -> str | None:
  return data_config.data_dir or None  # '' means the TFDS default.


def _prepare_instructions(name: str, data_dir: str) -> str:
  return (
      f'cm_jax never downloads datasets itself. To prepare {name!r}:\n'
      f'  1. On a machine with network access run\n'
      f'       python -c "import tensorflow_datasets as tfds; '
      f"tfds.builder('{name}', data_dir='/path/to/tfds').download_and_prepare()\"\n"
      f'     (TFDS 4.9.10 needs `pip install importlib_resources` for this; datasets with manual '
      f'downloads, e.g. imagenet2012, first need their files in /path/to/tfds/downloads/manual).\n'
      f'  2. Copy the folder /path/to/tfds/{name.split("/")[0]} to {data_dir}/ on this machine '
      f'(or onto a shared filesystem).\n'
      f'  3. Run with --config.data.data_dir={data_dir} (or set TFDS_DATA_DIR).')


def _embedded(name: str) -> bool:
  return name.split(':')[0] in cm_datasets.EMBEDDED_DATASETS


def _builder(data_config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
  """The TFDS builder of `data.name`; raises DatasetNotFoundError if TFDS cannot find it."""
  name, data_dir = data_config.name, _data_dir(data_config)
  try:
    # try_gcs=False: never read the public bucket gs://tfds-data instead of data_dir.
    return tfds.builder(name, data_dir=data_dir, try_gcs=False)
  except tfds.core.DatasetNotFoundError as e:
    root = data_dir or str(tfds.core.constants.DATA_DIR)
    raise DatasetNotFoundError(
        f'TFDS has no builder named data.name={name!r} and no prepared copy of it under '
        f'{root}. Check the spelling (e.g. sklearn_digits, cifar10, downsampled_imagenet/64x64, '
        f'lsun/bedroom); for a dataset TFDS does know: ' + _prepare_instructions(name, root)
    ) from e


def _check_image_feature(builder: tfds.core.DatasetBuilder,
                         data_config: ml_collections.ConfigDict) -> bool:
  """Checks the dataset's images against the config; returns whether they need crop + resize."""
  features = builder.info.features
  if 'image' not in features:
    raise ConfigError(
        f'Dataset {data_config.name!r} has no "image" feature (it has {sorted(features)}); '
        f'cm_jax trains on image datasets.')
  height, width, channels = features['image'].shape
  size, num_channels = data_config.image_size, data_config.num_channels
  if height is not None and width is not None and height != width:
    raise ConfigError(f'Dataset {data_config.name!r} has {height}x{width} images; cm_jax supports '
                      f'square images only (or images of varying size, which it center-crops).')
  fixes = []  # Every mismatch at once, so one edit of the command line fixes them all.
  if height is not None and height != size:
    fixes.append(f'--config.data.image_size={height}')
  if channels is not None and channels != num_channels:
    fixes.append(f'--config.data.num_channels={channels}')
  if fixes:
    shape = 'x'.join('?' if d is None else str(d) for d in (height, width, channels))
    raise ConfigError(
        f'Dataset {data_config.name!r} has {shape} images but the config says data.image_size='
        f'{size}, data.num_channels={num_channels}: set {" ".join(fixes)}.')
  # Images of varying size (e.g. LSUN) are center-cropped and resized to data.image_size.
  return height is None or width is None


def _prepare_embedded(builder: tfds.core.DatasetBuilder,
                      data_config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
  """Builds an embedded dataset into its data_dir (offline, a few seconds)."""
  logging.info('Building the embedded dataset %s into %s.', builder.name, builder.data_dir)
  # try_download_gcs=False: build locally rather than look for a prepared copy on GCS.
  download_config = tfds.download.DownloadConfig(try_download_gcs=False)
  try:
    builder.download_and_prepare(download_config=download_config)
  except Exception:  # pylint: disable=broad-except
    # Processes sharing a data_dir may race; only the last rename fails, and the data is there.
    if not _builder(data_config).is_prepared():
      raise
  return _builder(data_config)  # A fresh builder reads the generated split metadata.


def _center_crop_resize(image: tf.Tensor, size: int) -> tf.Tensor:
  """Largest central square, resized to size x size (antialiased bicubic), as uint8."""
  shape = tf.shape(image)
  side = tf.minimum(shape[0], shape[1])
  image = tf.image.crop_to_bounding_box(image, (shape[0] - side) // 2, (shape[1] - side) // 2,
                                        side, side)

  def resize():
    resized = tf.image.resize(image, [size, size], method='bicubic', antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(resized), 0.0, 255.0), tf.uint8)

  return tf.cond(side == size, lambda: image, resize)


def _read_numpy(dataset: tf.data.Dataset, num_examples: int | None,
                shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
  """Reads (image, label) pairs into numpy, preallocated when the count is known."""
  batches = tfds.as_numpy(dataset.batch(_READ_BATCH).prefetch(2))
  if num_examples is None:  # Count unknown (e.g. under tfds.testing.mock_data): concatenate.
    parts = list(batches)
    if not parts:
      return np.zeros((0, *shape), np.uint8), np.zeros((0,), np.int32)
    return (np.concatenate([p[0] for p in parts]).astype(np.uint8),
            np.concatenate([p[1] for p in parts]).astype(np.int32))
  # Filling a preallocated array avoids holding the split twice (ImageNet-64 is 15 GB as uint8).
  images = np.empty((num_examples, *shape), np.uint8)
  labels = np.empty((num_examples,), np.int32)
  count = 0
  for batch_images, batch_labels in batches:
    images[count:count + len(batch_images)] = batch_images
    labels[count:count + len(batch_labels)] = batch_labels
    count += len(batch_images)
  if count != num_examples:
    raise RuntimeError(f'Read {count} examples where the split metadata says {num_examples}.')
  return images, labels


def prepared_builder(data_config: ml_collections.ConfigDict) -> tuple[tfds.core.DatasetBuilder, bool]:
  """(the dataset's builder, whether its images need crop + resize), checked against the config
  before any data is read; the embedded dataset is built here on first use."""
  _hide_gpus_from_tf()
  name = data_config.name
  builder = _builder(data_config)
  crop_resize = _check_image_feature(builder, data_config)
  if not builder.is_prepared():
    if not _embedded(name):
      raise DatasetNotFoundError(
          f'Dataset {name!r} is not prepared in {builder.data_dir_root} (no '
          f'{builder.data_dir}). ' + _prepare_instructions(name, str(builder.data_dir_root)))
    builder = _prepare_embedded(builder, data_config)
  return builder, crop_resize


def _num_examples(builder: tfds.core.DatasetBuilder, name: str, split: str, sub_split: str) -> int | None:
  if not builder.info.splits:  # Empty only for mocked metadata (tfds.testing.mock_data).
    return None
  try:
    return builder.info.splits[sub_split].num_examples
  except (KeyError, ValueError) as e:
    raise ConfigError(
        f'Dataset {name!r} has no split {split!r}: it has {sorted(builder.info.splits)} '
        f'(slices such as "train[:90%]" work too).') from e


def load_split(
    data_config: ml_collections.ConfigDict,
    split: str,
    process_index: int | None = None,
    process_count: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """Reads this process's shard of a TFDS split into memory.

  Args:
    data_config: the config's `data` section (name, data_dir, image_size, num_channels).
    split: a TFDS split, e.g. 'train', 'test' or 'train[:90%]'.
    process_index: which shard to read; defaults to `jax.process_index()`.
    process_count: into how many shards to cut the split (`tfds.even_splits`, the first shards
      one example longer when it does not divide); defaults to `jax.process_count()`. Pass 0 and 1
      (index and count) for the whole split.

  Returns:
    (images, labels): uint8 [n, image_size, image_size, num_channels] and int32 [n]. Datasets
    without a 'label' feature give labels of 0.

  Raises:
    DatasetNotFoundError: the dataset is not prepared in data.data_dir (the message says how to
      prepare it). Only the embedded 'sklearn_digits' is built here, locally.
    ConfigError: the dataset's images do not match data.image_size / data.num_channels, or the
      split does not exist.
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} is not in [0, {process_count}).')
  name = data_config.name
  builder, crop_resize = prepared_builder(data_config)
  sub_split = split
  if process_count > 1:
    sub_split = tfds.even_splits(split, n=process_count)[process_index]
  num_examples = _num_examples(builder, name, split, sub_split)

  size, channels = data_config.image_size, data_config.num_channels
  has_labels = 'label' in builder.info.features

  def select(example: dict[str, Any]) -> tuple[tf.Tensor, tf.Tensor]:
    image = example['image']
    if crop_resize:
      image = _center_crop_resize(image, size)
    image = tf.ensure_shape(image, (size, size, channels))
    label = tf.cast(example['label'], tf.int32) if has_labels else tf.constant(0, tf.int32)
    return image, label

  start = time.time()
  # shuffle_files=False and TFDS's ordering guard make the order the same on every process.
  dataset = builder.as_dataset(split=sub_split, shuffle_files=False)
  dataset = dataset.map(select, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  images, labels = _read_numpy(dataset, num_examples, (size, size, channels))
  logging.info('Read %d examples of %s[%s] in %.1fs (%.1f MB).', len(images), name, sub_split,
               time.time() - start, images.nbytes / 1e6)
  return images, labels


def _batch_axes(sharding: jax.sharding.NamedSharding) -> tuple[str, ...]:
  """Mesh axes that shard axis 0 of the batch."""
  spec = sharding.spec
  axes = spec[0] if len(spec) else None
  if axes is None:
    return ()
  return (axes,) if isinstance(axes, str) else tuple(axes)


def _addressable_rows(sharding: jax.sharding.NamedSharding,
                      global_shape: tuple[int, ...]) -> np.ndarray:
  """Global batch rows held by this process's devices, in the order JAX expects local data."""
  rows = set()
  for index in sharding.addressable_devices_indices_map(global_shape).values():
    rows.update(range(*index[0].indices(global_shape[0])))
  return np.array(sorted(rows), np.int64)


def _uint8_to_float(images: jax.Array) -> jax.Array:
  # XLA turns the division into a multiply by 1/127.5, which lands 255 one ulp above 1: clip.
  return jnp.clip(images.astype(jnp.float32) / 127.5 - 1.0, -1.0, 1.0)


def _check_global_batch(global_batch_size: int, sharding: jax.sharding.NamedSharding,
                        process_count: int) -> None:
  batch_axes = _batch_axes(sharding)
  num_shards = math.prod(sharding.mesh.shape[axis] for axis in batch_axes)
  multiple = math.lcm(process_count, num_shards)
  if global_batch_size <= 0 or global_batch_size % multiple:
    mesh_shape = dict(sharding.mesh.shape)
    lower = max(multiple, global_batch_size // multiple * multiple)
    raise ConfigError(
        f'The global batch size {global_batch_size} must divide by the {process_count} '
        f'processes and by the {num_shards} batch shards of the mesh {mesh_shape} (axes '
        f'{batch_axes}): use a multiple of {multiple}, e.g. --config.training.batch_size='
        f'{lower} or {lower + multiple}.')


class InputPipeline:
  """Deterministic global batches of a split, resumable at any step.

  Every process reads the whole split into host memory once (uint8); a step only indexes into it.

  Attributes:
    num_examples: examples in the split (one epoch).
    has_labels: whether the dataset has labels (otherwise they are all 0).
    process_index, process_count: this process, possibly simulated (see `__init__`).
  """

  def __init__(
      self,
      data_config: ml_collections.ConfigDict,
      global_batch_size: int,
      seed: int,
      sharding: jax.sharding.NamedSharding,
      split: str = 'train',
      *,
      process_index: int | None = None,
      process_count: int | None = None,
      arrays: tuple[np.ndarray, np.ndarray] | None = None,
  ):
    """Checks the batch against processes and mesh, then loads the split.

    Args:
      data_config: the config's `data` section.
      global_batch_size: examples per step over all processes and devices.
      seed: non-negative; the order and the flips are pure functions of (seed, step).
      sharding: how a batch is laid out; axis 0 is sharded over the mesh axes of `sharding.spec[0]`.
      split: the TFDS split to read.
      process_index, process_count: override `jax.process_index()`/`jax.process_count()` to
        simulate one of several processes in tests; a simulated process holds the rows
        [process_index * B / P, (process_index + 1) * B / P) and only offers `local_batch`.
      arrays: (uint8 images NHWC, labels) to use instead of reading `split` (tests, tools).

    Raises:
      ConfigError: the batch does not divide over the processes or the mesh's batch shards, or the
        data does not match data.image_size / num_channels (see `load_split`).
      DatasetNotFoundError: see `load_split`.
    """
    self.process_index = jax.process_index() if process_index is None else process_index
    self.process_count = jax.process_count() if process_count is None else process_count
    self._simulated = (self.process_index, self.process_count) != (jax.process_index(),
                                                                   jax.process_count())
    if not 0 <= self.process_index < self.process_count:
      raise ValueError(f'process_index={self.process_index} not in [0, {self.process_count}).')
    if not isinstance(seed, (int, np.integer)) or seed < 0:
      raise ConfigError(f'The data seed must be a non-negative integer, got {seed!r}.')

    _check_global_batch(global_batch_size, sharding, self.process_count)

    self._data_config = data_config
    self.global_batch_size = global_batch_size
    self.seed = int(seed)
    self._image_sharding = sharding
    self._label_sharding = jax.sharding.NamedSharding(
        sharding.mesh, jax.sharding.PartitionSpec(*sharding.spec[:1]))
    size, channels = data_config.image_size, data_config.num_channels
    self._image_shape = (global_batch_size, size, size, channels)
    # Converting on device after the transfer moves 4x fewer bytes than float32 from the host.
    self._to_float = jax.jit(_uint8_to_float, out_shardings=sharding)

    self._rows = self._local_rows(sharding)
    self._images, labels = self._read(data_config, split, arrays)
    self._labels = np.asarray(labels, np.int32)
    self.num_examples = len(self._images)
    self._permutations: dict[int, np.ndarray] = {}
    # Enough cached epochs for a batch spanning several of them, plus the next one.
    self._max_cached = -(-global_batch_size // self.num_examples) + 2

  def _local_rows(self, sharding: jax.sharding.NamedSharding) -> np.ndarray:
    """Rows of the global batch this (possibly simulated) process provides."""
    if self._simulated:
      per_process = self.global_batch_size // self.process_count
      return np.arange(self.process_index * per_process, (self.process_index + 1) * per_process)
    return _addressable_rows(sharding, self._image_shape)

  def _read(self, data_config, split: str, arrays) -> tuple[np.ndarray, np.ndarray]:
    """The whole split (or the given arrays), checked; sets has_labels."""
    if arrays is None:
      # Each process needs the whole split: the global permutation may pick any example.
      self.has_labels = 'label' in _builder(data_config).info.features
      images, labels = load_split(data_config, split, process_index=0, process_count=1)
    else:
      self.has_labels = True
      images, labels = arrays
      if tuple(images.shape[1:]) != self._image_shape[1:] or images.dtype != np.uint8:
        raise ConfigError(
            f'The given images are {images.dtype} {tuple(images.shape[1:])}, not uint8 '
            f'{self._image_shape[1:]} as data.image_size / data.num_channels say.')
    if len(images) == 0:
      raise ConfigError(f'Split {split!r} of {data_config.name!r} is empty.')
    return images, labels

  def _permutation(self, epoch: int) -> np.ndarray:
    if epoch not in self._permutations:
      if len(self._permutations) >= self._max_cached:
        del self._permutations[min(self._permutations)]
      rng = np.random.default_rng([self.seed, epoch])
      self._permutations[epoch] = rng.permutation(self.num_examples)
    return self._permutations[epoch]

  def local_indices(self, step: int) -> np.ndarray:
    """Indices into the split of this process's rows of the global batch at `step`."""
    positions = step * self.global_batch_size + self._rows
    epochs, offsets = np.divmod(positions, self.num_examples)
    first, last = int(epochs[0]), int(epochs[-1])
    if first == last:
      return self._permutation(first)[offsets]
    indices = np.empty_like(positions)
    for epoch in range(first, last + 1):  # The batch crosses an epoch boundary.
      in_epoch = epochs == epoch
      indices[in_epoch] = self._permutation(epoch)[offsets[in_epoch]]
    return indices

  def local_batch(self, step: int) -> dict[str, np.ndarray]:
    """This process's rows of the global batch at `step` on the host: uint8 images, int32 labels."""
    if step < 0:
      raise ValueError(f'step must be >= 0, got {step}.')
    indices = self.local_indices(step)
    images = self._images[indices]
    if self._data_config.random_flip:
      # Drawn for the whole global batch, so row r's flip is the same whoever materialises it.
      rng = np.random.default_rng([self.seed, step, _FLIP_STREAM])
      flip = rng.random(self.global_batch_size)[self._rows] < 0.5
      images[flip] = images[flip, :, ::-1]
    return {'image': images, 'label': self._labels[indices]}

  def get_batch(self, step: int) -> dict[str, jax.Array]:
    """The global batch at `step`: 'image' float32 [B, H, W, C] in [-1, 1], 'label' int32 [B]."""
    if self._simulated:
      raise RuntimeError('A simulated process (process_index/process_count overridden) only '
                         'offers local_batch(); get_batch needs the real process layout.')
    batch = self.local_batch(step)
    images = jax.make_array_from_process_local_data(self._image_sharding, batch['image'],
                                                     self._image_shape)
    labels = jax.make_array_from_process_local_data(self._label_sharding, batch['label'],
                                                    self._image_shape[:1])
    return {'image': self._to_float(images), 'label': labels}

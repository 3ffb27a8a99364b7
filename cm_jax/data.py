"""The input pipeline: random access to a TFDS split on disk, global batches as jax.Arrays.

One path for every dataset (the embedded digits, CIFAR-10, ImageNet, LSUN, a user's folder):

  TFDS split in ArrayRecord files --(tfds data source: random access)--> records of this process's
  rows --(decode, crop/resize, flip: Grain worker threads or processes)--> uint8 host batch
  --(prefetched to the devices)--> float32 global batch in [-1, 1].

The order of examples is a pure function of (seed, step): epoch e visits the split in the order of a
permutation drawn from `np.random.default_rng([seed, e])`, and the global batch at `step` is the slice
[step * B, (step + 1) * B) of the concatenated epochs; row r is flipped when the r-th of B uniform
draws of `np.random.default_rng([seed, step, 'flip'])` is below 0.5. A process reads (and decodes)
only the records of the rows its devices hold, so the global batch depends neither on the number of
processes or devices nor on where a run was resumed, and the reader keeps no state: a resumed run
starts reading at its step, and nothing about the input goes into the checkpoint.

Host memory is bounded by the batches in flight (see `InputPipeline`), not by the dataset: nothing
holds a split in memory except `load_split` (edit inputs, evaluation references), which asks for it.

Nothing is ever downloaded implicitly: the embedded 'sklearn_digits' dataset is built locally on first
use, a `folder:` dataset is converted once from the user's files (`cm_jax.datasets.prepare`), and any
other TFDS dataset must already be prepared, as ArrayRecord files, in `data.data_dir`.
"""

import collections
import concurrent.futures
import math
import os
import threading
import time
from typing import Any, Iterator

from absl import flags
from absl import logging
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from cm_jax import datasets as cm_datasets
from cm_jax.datasets import images as image_ops
from cm_jax.datasets import prepare
from cm_jax.errors import ConfigError, DatasetNotFoundError, choose

# Tags the flip stream's seed so it never coincides with an epoch permutation's seed.
_FLIP_STREAM = 0x666C6970  # 'flip'
# Images decoded per task while a whole split is read into memory (`load_split`).
_READ_CHUNK = 256


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


# --------------------------------------------------------------------------------------------------
# The dataset: found, checked against the config, prepared where cm_jax may prepare it.
# --------------------------------------------------------------------------------------------------
def _hide_gpus_from_tf() -> None:
  # TF only parses records here; left alone it would reserve GPU memory that JAX needs.
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
      f"tfds.builder('{name}', data_dir='/path/to/tfds', file_format='array_record')"
      f'.download_and_prepare()"\n'
      f'     (ArrayRecord files: the input pipeline reads them by random access. TFDS 4.9.10 needs '
      f'`pip install importlib_resources` for this; datasets with manual downloads, e.g. '
      f'imagenet2012, first need their files in /path/to/tfds/downloads/manual).\n'
      f'  2. Copy the folder /path/to/tfds/{name.split("/")[0]} to {data_dir}/ on this machine '
      f'(or onto a shared filesystem).\n'
      f'  3. Run with --config.data.data_dir={data_dir} (or set TFDS_DATA_DIR).')


def _embedded(name: str) -> bool:
  return name.split(':')[0] in cm_datasets.EMBEDDED_DATASETS


def _tfds_name(data_config: ml_collections.ConfigDict) -> str:
  """The TFDS name that `data.name` stands for (a `folder:` name stands for its prepared copy)."""
  if prepare.is_folder(data_config.name):
    return prepare.folder_dataset_name(data_config)
  return data_config.name


def _builder(data_config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
  """The TFDS builder of `data.name`; raises DatasetNotFoundError if TFDS cannot find it."""
  name, data_dir = _tfds_name(data_config), _data_dir(data_config)
  try:
    # try_gcs=False: never read the public bucket gs://tfds-data instead of data_dir.
    return tfds.builder(name, data_dir=data_dir, try_gcs=False)
  except tfds.core.DatasetNotFoundError as e:
    root = data_dir or str(tfds.core.constants.DATA_DIR)
    raise DatasetNotFoundError(
        f'TFDS has no builder named data.name={name!r} and no prepared copy of it under '
        f'{root}. Check the spelling (e.g. sklearn_digits, cifar10, imagenet_resized/64x64, '
        f'lsun/bedroom, or folder:/path/to/images for your own images); for a dataset TFDS does '
        f'know: ' + _prepare_instructions(name, root)
    ) from e


def _check_image_feature(builder: tfds.core.DatasetBuilder,
                         data_config: ml_collections.ConfigDict) -> bool:
  """Checks the dataset's images against the config; returns whether they need crop + resize."""
  features = builder.info.features
  if 'image' not in features or not isinstance(features['image'], tfds.features.Image):
    raise ConfigError(
        f'Dataset {data_config.name!r} has no "image" image feature (it has {sorted(features)}); '
        f'cm_jax trains on image datasets.')
  choose({m: m for m in image_ops.RESIZE_METHODS}, data_config.resize, 'data.resize')
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
    builder.download_and_prepare(download_config=download_config, file_format='array_record')
  except Exception:  # pylint: disable=broad-except
    # Processes sharing a data_dir may race; only the last rename fails, and the data is there.
    if not _builder(data_config).is_prepared():
      raise
  return _builder(data_config)  # A fresh builder reads the generated split metadata.


def _no_random_access(builder: tfds.core.DatasetBuilder, name: str) -> DatasetNotFoundError:
  """The error for a dataset prepared only as TFRecord files, saying what to do."""
  formats = sorted(f.value for f in builder.info.available_file_formats())
  return DatasetNotFoundError(
      f'Dataset {name!r} in {builder.data_dir} is prepared as {formats} files, which cannot be '
      'read by random access. Either add ArrayRecord files beside them once (pip install '
      f'apache-beam; tfds convert_format --dataset_version_dir={builder.data_dir} '
      '--out_file_format=array_record), or prepare it again into another data_dir with '
      "file_format='array_record':\n" + _prepare_instructions(name, str(builder.data_dir_root)))


def prepared_builder(data_config: ml_collections.ConfigDict) -> tuple[tfds.core.DatasetBuilder, bool]:
  """(the dataset's builder, whether its images need crop + resize), checked against the config
  before any data is read; the embedded dataset is built, and a `folder:` dataset converted, here
  on first use."""
  _hide_gpus_from_tf()
  name = data_config.name
  if prepare.is_folder(name):
    prepare.ensure_folder_dataset(data_config)
  builder = _builder(data_config)
  crop_resize = _check_image_feature(builder, data_config)
  if not builder.is_prepared():
    if not _embedded(name):
      raise DatasetNotFoundError(
          f'Dataset {name!r} is not prepared in {builder.data_dir_root} (no '
          f'{builder.data_dir}). ' + _prepare_instructions(name, str(builder.data_dir_root)))
    builder = _prepare_embedded(builder, data_config)
  return builder, crop_resize


def _num_examples(builder: tfds.core.DatasetBuilder, name: str, split: str, sub_split) -> int | None:
  if not builder.info.splits:  # Empty only for mocked metadata (tfds.testing.mock_data).
    return None
  try:
    return builder.info.splits[sub_split].num_examples
  except (KeyError, ValueError) as e:
    raise ConfigError(
        f'Dataset {name!r} has no split {split!r}: it has {sorted(builder.info.splits)} '
        f'(slices such as "train[:90%]" work too).') from e


# --------------------------------------------------------------------------------------------------
# Records: random access to decoded examples.
# --------------------------------------------------------------------------------------------------
class TfdsRecords:
  """Random access to a TFDS split's (image, label) pairs, decoded as the config asks.

  Picklable (Grain worker processes receive a copy): it holds the TFDS data source, which opens its
  ArrayRecord files lazily, and no JAX object.
  """

  def __init__(self, builder: tfds.core.DatasetBuilder, split, data_config: ml_collections.ConfigDict):
    # Raw records: the image bytes are decoded here with PIL (the reference's decoder, which also
    # reads the WebP images of some TFDS LSUN categories that TensorFlow cannot decode).
    self._source = builder.as_data_source(
        split=split, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
    self.has_labels = 'label' in builder.info.features
    self._size, self._channels = data_config.image_size, data_config.num_channels
    self._resize = data_config.resize
    self.num_examples = len(self._source)

  def _example(self, record: bytes) -> tuple[np.ndarray, int]:
    example = prepare.parse_record(record, self.has_labels)
    return image_ops.decode(example['image'], self._size, self._channels, self._resize), example['label']

  def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [n, size, size, C] images and int32 [n] labels of the examples at `indices`."""
    keys = [int(i) for i in indices]
    try:
      # One batched read: ArrayRecord fetches the records in parallel (it matters on remote disks).
      records = self._source.__getitems__(keys)
    except TypeError:  # tfds.testing.mock_data's source reads only one record at a time.
      records = [self._source[key] for key in keys]
    images = np.empty((len(indices), self._size, self._size, self._channels), np.uint8)
    labels = np.empty((len(indices),), np.int32)
    for row, record in enumerate(records):
      images[row], labels[row] = self._example(record)
    return images, labels


class ArrayRecords:
  """Decoded examples held in memory (tests and tools that already have the arrays)."""

  has_labels = True

  def __init__(self, images: np.ndarray, labels: np.ndarray):
    self._images, self._labels = images, np.asarray(labels, np.int32)
    self.num_examples = len(images)

  def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return self._images[indices], self._labels[indices]


def open_records(data_config: ml_collections.ConfigDict, split: str, process_index: int = 0,
                 process_count: int = 1) -> TfdsRecords:
  """Random access to shard `process_index` of `process_count` of a split (1 shard: all of it)."""
  name = data_config.name
  builder, _ = prepared_builder(data_config)
  sub_split = split
  if process_count > 1:
    sub_split = tfds.even_splits(split, n=process_count)[process_index]
  num_examples = _num_examples(builder, name, split, sub_split)
  try:
    records = TfdsRecords(builder, sub_split, data_config)
  except NotImplementedError as e:  # TFDS: no file format with random access.
    raise _no_random_access(builder, name) from e
  except (KeyError, ValueError) as e:
    raise ConfigError(f'Dataset {name!r} has no split {split!r}: it has '
                      f'{sorted(builder.info.splits)}.') from e
  if num_examples is not None and records.num_examples != num_examples:
    raise RuntimeError(f'{name}[{sub_split}] has {records.num_examples} records where its '
                       f'metadata says {num_examples}.')
  return records


def load_split(
    data_config: ml_collections.ConfigDict,
    split: str,
    process_index: int | None = None,
    process_count: int | None = None,
    indices: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """Reads this process's shard of a TFDS split into memory (for edit inputs and FID references).

  Training never does this: `InputPipeline` streams.

  Args:
    data_config: the config's `data` section (name, data_dir, image_size, num_channels, resize).
    split: a TFDS split, e.g. 'train', 'test' or 'train[:90%]'.
    process_index: which shard to read; defaults to `jax.process_index()`.
    process_count: into how many shards to cut the split (`tfds.even_splits`, the first shards
      one example longer when it does not divide); defaults to `jax.process_count()`. Pass 0 and 1
      (index and count) for the whole split.
    indices: only these examples of the shard (positions within it), in this order; None: all.

  Returns:
    (images, labels): uint8 [n, image_size, image_size, num_channels] and int32 [n]. Datasets
    without a 'label' feature give labels of 0.

  Raises:
    DatasetNotFoundError: the dataset is not prepared in data.data_dir (the message says how to
      prepare it). Only the embedded 'sklearn_digits' is built, and a `folder:` converted, here.
    ConfigError: the dataset's images do not match data.image_size / data.num_channels, or the
      split does not exist.
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} is not in [0, {process_count}).')
  start = time.time()
  records = open_records(data_config, split, process_index, process_count)
  indices = np.arange(records.num_examples) if indices is None else np.asarray(indices, np.int64)
  size, channels = data_config.image_size, data_config.num_channels
  images = np.empty((len(indices), size, size, channels), np.uint8)
  labels = np.empty((len(indices),), np.int32)

  def read(chunk_start: int) -> None:
    chunk = slice(chunk_start, chunk_start + _READ_CHUNK)
    images[chunk], labels[chunk] = records.read(indices[chunk])

  # PIL releases the GIL while it decodes: threads use every core.
  with concurrent.futures.ThreadPoolExecutor(_default_threads()) as pool:
    list(pool.map(read, range(0, len(indices), _READ_CHUNK)))
  logging.info('Read %d examples of %s[%s] (shard %d of %d) in %.1fs (%.1f MB).', len(images),
               data_config.name, split, process_index, process_count, time.time() - start,
               images.nbytes / 1e6)
  return images, labels


def _default_threads() -> int:
  return max(1, min(16, len(os.sched_getaffinity(0))))


# --------------------------------------------------------------------------------------------------
# Batches: which example each row of a step holds, and this process's rows of it on the host.
# --------------------------------------------------------------------------------------------------
class BatchReader:
  """This process's rows of the global batch at a step, as uint8 numpy; a pure function of the step.

  Picklable and free of JAX objects: Grain runs it in worker threads, or in worker processes.
  """

  def __init__(self, records, global_batch_size: int, seed: int, rows: np.ndarray,
               random_flip: bool):
    self.records = records
    self.global_batch_size = global_batch_size
    self.seed = seed
    self.rows = rows
    self.random_flip = random_flip
    self.num_examples = records.num_examples
    # Enough cached epochs for a batch spanning several of them, plus the next one.
    self._max_cached = -(-global_batch_size // self.num_examples) + 2
    self._permutations: dict[int, np.ndarray] = {}
    self._lock = threading.Lock()  # Worker threads share the cache.

  def __getstate__(self):
    state = dict(self.__dict__)
    del state['_lock']
    state['_permutations'] = {}
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def _permutation(self, epoch: int) -> np.ndarray:
    with self._lock:
      if epoch not in self._permutations:
        if len(self._permutations) >= self._max_cached:
          del self._permutations[min(self._permutations)]
        rng = np.random.default_rng([self.seed, epoch])
        self._permutations[epoch] = rng.permutation(self.num_examples)
      return self._permutations[epoch]

  def indices(self, step: int) -> np.ndarray:
    """Indices into the split of this process's rows of the global batch at `step`."""
    positions = step * self.global_batch_size + self.rows
    epochs, offsets = np.divmod(positions, self.num_examples)
    first, last = int(epochs[0]), int(epochs[-1])
    if first == last:
      return self._permutation(first)[offsets]
    indices = np.empty_like(positions)
    for epoch in range(first, last + 1):  # The batch crosses an epoch boundary.
      in_epoch = epochs == epoch
      indices[in_epoch] = self._permutation(epoch)[offsets[in_epoch]]
    return indices

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    if step < 0:
      raise ValueError(f'step must be >= 0, got {step}.')
    images, labels = self.records.read(self.indices(step))
    if self.random_flip:
      # Drawn for the whole global batch, so row r's flip is the same whoever materialises it.
      rng = np.random.default_rng([self.seed, step, _FLIP_STREAM])
      flip = rng.random(self.global_batch_size)[self.rows] < 0.5
      images[flip] = images[flip, :, ::-1]
    return {'image': images, 'label': labels}


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


def _loader_options(data_config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  loader = data_config.get('loader')
  options = ml_collections.ConfigDict({'num_threads': 4, 'prefetch': 4, 'device_prefetch': 2,
                                       'num_workers': 0})
  if loader is not None:
    options.update(loader)
  for key in ('num_threads', 'prefetch'):
    if options[key] < 1:
      raise ConfigError(f'data.loader.{key}={options[key]} must be >= 1.')
  if options.device_prefetch < 0 or options.num_workers < 0:
    raise ConfigError(f'data.loader.device_prefetch={options.device_prefetch} and num_workers='
                      f'{options.num_workers} must be >= 0.')
  return options


class InputPipeline:
  """Deterministic global batches of a split, streamed from disk, resumable at any step.

  `batches(start, stop)` is what training iterates: Grain reads the host batches of the coming steps
  ahead in `data.loader.num_threads` threads (or `num_workers` processes), keeping at most
  `data.loader.prefetch` of them, and `data.loader.device_prefetch` batches are on the devices before
  the step that needs them. Host memory for input is therefore bounded by about
  (prefetch + device_prefetch + 2) x (this process's rows per step) x H x W x C bytes, whatever the
  size of the dataset, plus 8 bytes per example for the cached epoch permutations.

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
    """Checks the batch against processes and mesh and the data against the config.

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
    self._set_process(process_index, process_count)
    if not isinstance(seed, (int, np.integer)) or seed < 0:
      raise ConfigError(f'The data seed must be a non-negative integer, got {seed!r}.')
    _check_global_batch(global_batch_size, sharding, self.process_count)
    self._loader = _loader_options(data_config)

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

    records = self._records(data_config, split, arrays)
    self.has_labels = records.has_labels
    self.num_examples = records.num_examples
    if self.num_examples == 0:
      raise ConfigError(f'Split {split!r} of {data_config.name!r} is empty.')
    self._reader = BatchReader(records, global_batch_size, self.seed, self._local_rows(sharding),
                               bool(data_config.random_flip))
    self._open: list[Any] = []  # Iterators of `batches` not yet closed.

  def _set_process(self, process_index: int | None, process_count: int | None) -> None:
    """This process, or the one of several that a test simulates."""
    self.process_index = jax.process_index() if process_index is None else process_index
    self.process_count = jax.process_count() if process_count is None else process_count
    self._simulated = (self.process_index, self.process_count) != (jax.process_index(),
                                                                   jax.process_count())
    if not 0 <= self.process_index < self.process_count:
      raise ValueError(f'process_index={self.process_index} not in [0, {self.process_count}).')

  def _local_rows(self, sharding: jax.sharding.NamedSharding) -> np.ndarray:
    """Rows of the global batch this (possibly simulated) process provides."""
    if self._simulated:
      per_process = self.global_batch_size // self.process_count
      return np.arange(self.process_index * per_process, (self.process_index + 1) * per_process)
    return _addressable_rows(sharding, self._image_shape)

  def _records(self, data_config, split: str, arrays):
    if arrays is None:
      # Every process opens the whole split: the global permutation may pick any example.
      return open_records(data_config, split)
    images, labels = arrays
    if tuple(images.shape[1:]) != self._image_shape[1:] or images.dtype != np.uint8:
      raise ConfigError(
          f'The given images are {images.dtype} {tuple(images.shape[1:])}, not uint8 '
          f'{self._image_shape[1:]} as data.image_size / data.num_channels say.')
    return ArrayRecords(images, labels)

  def local_indices(self, step: int) -> np.ndarray:
    """Indices into the split of this process's rows of the global batch at `step`."""
    return self._reader.indices(step)

  def local_batch(self, step: int) -> dict[str, np.ndarray]:
    """This process's rows of the global batch at `step` on the host: uint8 images, int32 labels."""
    return self._reader(step)

  def _to_device(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    images = jax.make_array_from_process_local_data(self._image_sharding, batch['image'],
                                                     self._image_shape)
    labels = jax.make_array_from_process_local_data(self._label_sharding, batch['label'],
                                                    self._image_shape[:1])
    return {'image': self._to_float(images), 'label': labels}

  def _check_real_layout(self) -> None:
    if self._simulated:
      raise RuntimeError('A simulated process (process_index/process_count overridden) only '
                         'offers local_batch(); get_batch needs the real process layout.')

  def get_batch(self, step: int) -> dict[str, jax.Array]:
    """The global batch at `step`: 'image' float32 [B, H, W, C] in [-1, 1], 'label' int32 [B]."""
    self._check_real_layout()
    return self._to_device(self.local_batch(step))

  def host_batches(self, start_step: int, stop_step: int) -> Iterator[dict[str, np.ndarray]]:
    """`local_batch(s)` for s in [start_step, stop_step), read ahead by Grain's workers."""
    loader = self._loader
    dataset = grain.MapDataset.range(start_step, stop_step).map(self._reader)
    dataset = dataset.to_iter_dataset(grain.ReadOptions(num_threads=loader.num_threads,
                                                        prefetch_buffer_size=loader.prefetch))
    if loader.num_workers > 0:
      if not flags.FLAGS.is_parsed():
        # Grain's process workers read its absl flags; a program that parses none (a notebook, a
        # test) takes their defaults.
        flags.FLAGS.mark_as_parsed()
      # Processes for decoding that holds the GIL; each gets whole steps, in order.
      dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=loader.num_workers,
                                                                 per_worker_buffer_size=1))
    return iter(dataset)

  def batches(self, start_step: int, stop_step: int) -> Iterator[dict[str, jax.Array]]:
    """`get_batch(s)` for s in [start_step, stop_step), prefetched: the batches of the next
    `data.loader.device_prefetch` steps are already on their way to the devices when one is used.

    `close()` (or the iterator's own `close()`) stops the reading ahead.
    """
    self._check_real_layout()
    iterator = self._prefetched(start_step, stop_step)
    self._open.append(iterator)
    return iterator

  def close(self) -> None:
    """Stops the workers of every iterator `batches` returned."""
    while self._open:
      self._open.pop().close()

  def _prefetched(self, start_step: int, stop_step: int) -> Iterator[dict[str, jax.Array]]:
    host = self.host_batches(start_step, stop_step)
    pending = collections.deque()
    try:
      for batch in host:
        pending.append(self._to_device(batch))  # Asynchronous: the transfer overlaps the step.
        if len(pending) > self._loader.device_prefetch:
          yield pending.popleft()
      while pending:
        yield pending.popleft()
    finally:
      close = getattr(host, 'close', None)
      if close is not None:
        close()  # Stops Grain's threads (or processes) when training ends or raises.

"""Tests of the embedded digits dataset and the input pipeline (offline, CPU, ~40 s)."""

import hashlib
import io
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from unittest import mock

import jax
import ml_collections
import numpy as np
import PIL.Image
import pytest
import tensorflow_datasets as tfds

from cm_jax import data
from cm_jax.datasets import images, sklearn_digits
from cm_jax.errors import ConfigError, DatasetNotFoundError
from configs import default

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def no_network(monkeypatch):
  """Fails the test on any attempt to open a socket or to look at the GCS bucket."""

  def refuse(*args, **kwargs):
    raise AssertionError(f'network access attempted: {args} {kwargs}')

  monkeypatch.setattr(socket.socket, 'connect', refuse)
  monkeypatch.setattr(socket, 'create_connection', refuse)
  monkeypatch.setattr(tfds.core.utils.gcs_utils, 'exists', refuse)


def data_config(data_dir: str, **overrides) -> ml_collections.ConfigDict:
  config = default.get_config().data
  config.data_dir = str(data_dir)
  config.update(overrides)
  return config


@pytest.fixture(scope='session')
def digits_dir(tmp_path_factory) -> str:
  """A TFDS data_dir with sklearn_digits built into it once, offline."""
  data_dir = tmp_path_factory.mktemp('tfds')
  with mock.patch.object(socket.socket, 'connect', side_effect=AssertionError('network')), \
      mock.patch.object(tfds.core.utils.gcs_utils, 'exists', side_effect=AssertionError('gcs')):
    data.load_split(data_config(data_dir), 'test', process_index=0, process_count=1)
  return str(data_dir)


@pytest.fixture(scope='session')
def digits_train(digits_dir) -> tuple[np.ndarray, np.ndarray]:
  return data.load_split(data_config(digits_dir), 'train', process_index=0, process_count=1)


def single_device_sharding() -> jax.sharding.NamedSharding:
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ('data', 'fsdp'))
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(('data', 'fsdp')))


def synthetic_arrays(num_examples: int, size: int = 4) -> tuple[np.ndarray, np.ndarray]:
  """Images whose pixels are random, labels that are the example's index (to trace it)."""
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (num_examples, size, size, 1), dtype=np.uint8)
  return images, np.arange(num_examples, dtype=np.int32)


def synthetic_pipeline(num_examples: int, batch: int, seed: int = 0, **kwargs) -> data.InputPipeline:
  arrays = kwargs.pop('arrays', None) or synthetic_arrays(num_examples)
  config = data_config('', image_size=arrays[0].shape[1], **kwargs.pop('config', {}))
  return data.InputPipeline(config, batch, seed, single_device_sharding(), arrays=arrays, **kwargs)


# The embedded dataset.


def test_digits_builder_matches_sklearn(digits_dir):
  builder = tfds.builder('sklearn_digits', data_dir=digits_dir)
  assert builder.is_prepared()
  splits = builder.info.splits
  assert splits['train'].num_examples + splits['test'].num_examples == 1797
  assert splits['test'].num_examples == pytest.approx(0.2 * 1797, abs=10)
  expected_images, expected_labels = sklearn_digits.load_scaled_digits()
  assert expected_images.max() == 255 and expected_images.min() == 0
  seen = []
  assert builder.info.file_format == tfds.core.FileFormat.ARRAY_RECORD  # Random access.
  for split in ('train', 'test'):
    source = builder.as_data_source(split=split)
    examples = {key: np.stack([example[key] for example in source]) for key in source[0]}
    index = examples['index']
    assert examples['image'].dtype == np.uint8 and examples['image'].shape[1:] == (8, 8, 1)
    np.testing.assert_array_equal(examples['image'], expected_images[index])
    np.testing.assert_array_equal(examples['label'], expected_labels[index])
    assert set(examples['label']) == set(range(10)), split
    seen.append(index)
  np.testing.assert_array_equal(np.sort(np.concatenate(seen)), np.arange(1797))


def test_digits_split_is_fixed_and_stratified():
  _, labels = sklearn_digits.load_scaled_digits()
  first, second = sklearn_digits.split_indices(labels), sklearn_digits.split_indices(labels)
  np.testing.assert_array_equal(first['test'], second['test'])
  for label in range(10):
    count = np.sum(labels == label)
    assert np.sum(labels[first['test']] == label) == round(0.2 * count)


def test_digits_reused_not_rebuilt(digits_dir, no_network):
  with mock.patch.object(tfds.core.DatasetBuilder, 'download_and_prepare',
                         side_effect=AssertionError('rebuilt')):
    images, labels = data.load_split(data_config(digits_dir), 'test', 0, 1)
  assert images.shape == (359, 8, 8, 1) and labels.dtype == np.int32


def test_load_split_process_shards_partition_the_split(digits_dir, digits_train):
  images, labels = digits_train
  assert images.shape == (1438, 8, 8, 1) and images.dtype == np.uint8
  for count in (2, 3):
    shards = [data.load_split(data_config(digits_dir), 'train', i, count) for i in range(count)]
    assert max(len(s[1]) for s in shards) - min(len(s[1]) for s in shards) <= 1
    np.testing.assert_array_equal(np.concatenate([s[0] for s in shards]), images)
    np.testing.assert_array_equal(np.concatenate([s[1] for s in shards]), labels)


# Errors a user can cause.


def test_missing_dataset_says_how_to_prepare_and_downloads_nothing(tmp_path, no_network):
  with pytest.raises(DatasetNotFoundError) as info:
    data.load_split(data_config(tmp_path, name='cifar10', image_size=32, num_channels=3),
                    'train', 0, 1)
  message = str(info.value)
  assert "tfds.builder('cifar10'" in message and 'download_and_prepare()' in message
  assert f'--config.data.data_dir={tmp_path}' in message
  assert not list(tmp_path.rglob('*.tfrecord*'))  # Nothing was fetched.


def test_unknown_dataset_name(tmp_path, no_network):
  with pytest.raises(DatasetNotFoundError, match='no_such_dataset'):
    data.load_split(data_config(tmp_path, name='no_such_dataset'), 'train', 0, 1)


@pytest.mark.parametrize('overrides, match', [
    ({'image_size': 32}, 'has 8x8x1 images .* set --config.data.image_size=8[.]'),
    ({'num_channels': 3}, 'set --config.data.num_channels=1[.]'),
    # Checked from the metadata, before the (missing) data is needed.
    ({'name': 'cifar10'}, 'image_size=32 --config.data.num_channels=3'),
])
def test_image_shape_mismatch(digits_dir, overrides, match, no_network):
  with pytest.raises(ConfigError, match=match):
    data.load_split(data_config(digits_dir, **overrides), 'train', 0, 1)


def test_unknown_split(digits_dir):
  with pytest.raises(ConfigError, match='validation'):
    data.load_split(data_config(digits_dir), 'validation', 0, 1)


def test_batch_that_does_not_divide_over_processes():
  with pytest.raises(ConfigError, match='multiple of 3'):
    synthetic_pipeline(100, batch=32, process_index=0, process_count=3)
  with pytest.raises(ConfigError, match='multiple of 1'):
    synthetic_pipeline(100, batch=0)


def test_arrays_of_wrong_shape():
  with pytest.raises(ConfigError, match='image_size'):
    synthetic_pipeline(10, batch=2, arrays=synthetic_arrays(10, size=4), config={'num_channels': 3})


# Order, determinism and sharding.


def test_same_step_same_batch_and_resume(digits_dir, digits_train):
  config = data_config(digits_dir)
  pipeline = data.InputPipeline(config, 64, 7, single_device_sharding())
  batches = [pipeline.get_batch(step) for step in range(40)]  # Crosses an epoch at step 22.
  resumed = data.InputPipeline(config, 64, 7, single_device_sharding())
  for step in (39, 22, 3):
    np.testing.assert_array_equal(resumed.get_batch(step)['image'], batches[step]['image'])
    np.testing.assert_array_equal(resumed.get_batch(step)['label'], batches[step]['label'])
  assert not np.array_equal(batches[0]['image'], batches[1]['image'])
  other_seed = data.InputPipeline(config, 64, 8, single_device_sharding(), arrays=digits_train)
  assert not np.array_equal(other_seed.get_batch(0)['image'], batches[0]['image'])


def test_get_batch_layout_and_range(digits_dir, digits_train):
  sharding = single_device_sharding()
  pipeline = data.InputPipeline(data_config(digits_dir), 128, 0, sharding)
  batch = pipeline.get_batch(5)
  assert batch['image'].shape == (128, 8, 8, 1) and batch['image'].dtype == np.float32
  assert batch['label'].shape == (128,) and batch['label'].dtype == np.int32
  assert batch['image'].sharding.is_equivalent_to(sharding, 4)
  assert batch['label'].sharding.spec == jax.sharding.PartitionSpec(('data', 'fsdp'))
  images = np.asarray(batch['image'])
  assert images.min() == -1.0 and images.max() == 1.0  # Digits have both 0 and 255 pixels.
  indices = pipeline.local_indices(5)
  np.testing.assert_allclose(images, data.to_float(digits_train[0][indices]), atol=1e-6)
  np.testing.assert_array_equal(batch['label'], digits_train[1][indices])


def test_epoch_covers_every_example_once():
  pipeline = synthetic_pipeline(96, batch=32, seed=3)
  orders = [np.concatenate([pipeline.local_batch(step)['label'] for step in range(e * 3, e * 3 + 3)])
            for e in range(2)]
  for order in orders:
    np.testing.assert_array_equal(np.sort(order), np.arange(96))
  assert not np.array_equal(orders[0], orders[1])  # Each epoch has its own permutation.


@pytest.mark.parametrize('batch', [32, 256])  # Batches crossing one, or spanning several, epochs.
def test_order_is_the_concatenated_epoch_permutations(batch):
  num_examples, seed = 100, 5
  pipeline = synthetic_pipeline(num_examples, batch=batch, seed=seed)
  stream = np.concatenate([np.random.default_rng([seed, e]).permutation(num_examples)
                           for e in range(batch * 10 // num_examples + 1)])
  for step in range(10):
    np.testing.assert_array_equal(pipeline.local_batch(step)['label'],
                                  stream[step * batch:(step + 1) * batch])


@pytest.mark.parametrize('flip', [False, True])
def test_global_batch_independent_of_process_count(flip):
  arrays = synthetic_arrays(100)
  config = {'random_flip': flip}
  whole = synthetic_pipeline(100, batch=64, arrays=arrays, config=config)
  halves = [synthetic_pipeline(100, batch=64, arrays=arrays, config=config, process_index=i,
                               process_count=2) for i in range(2)]
  for step in (0, 1, 7):
    expected = whole.local_batch(step)
    parts = [half.local_batch(step) for half in halves]
    assert len(parts[0]['label']) == 32
    for key in ('image', 'label'):
      np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), expected[key])
  with pytest.raises(RuntimeError, match='local_batch'):
    halves[0].get_batch(0)


def test_random_flips_are_mirror_images():
  images, labels = synthetic_arrays(100)
  pipeline = synthetic_pipeline(100, batch=64, arrays=(images, labels), config={'random_flip': True})
  flipped_count = 0
  for step in range(4):
    batch = pipeline.local_batch(step)
    original = images[batch['label']]
    flipped = np.all(batch['image'] == original[:, :, ::-1], axis=(1, 2, 3))
    kept = np.all(batch['image'] == original, axis=(1, 2, 3))
    assert np.all(flipped | kept)
    flipped_count += flipped.sum()
    np.testing.assert_array_equal(pipeline.local_batch(step)['image'], batch['image'])
  assert 0.3 < flipped_count / 256 < 0.7
  unflipped = synthetic_pipeline(100, batch=64, arrays=(images, labels))
  np.testing.assert_array_equal(unflipped.local_batch(0)['image'],
                                images[unflipped.local_batch(0)['label']])


def test_uint8_float_round_trip():
  values = np.arange(256, dtype=np.uint8)
  floats = data.to_float(values)
  assert floats.dtype == np.float32 and floats[0] == -1.0 and floats[-1] == 1.0
  np.testing.assert_array_equal(data.to_uint8(floats), values)
  np.testing.assert_array_equal(data.to_uint8(np.array([-3.0, 0.0, 1.001, 7.0])), [0, 127, 255, 255])  # Truncated, as the references.


def test_adm_resize_is_the_references_center_crop_arr(monkeypatch):
  """openai/consistency_models center_crop_arr: box-halve while the short side >= 2 * size, bicubic
  to a short side of `size` (rounding the long side), then the central square."""
  calls = []
  resize = PIL.Image.Image.resize

  def recording_resize(image, size, resample=None, **kwargs):
    calls.append((image.size, tuple(size), resample))
    return resize(image, size, resample=resample, **kwargs)

  monkeypatch.setattr(PIL.Image.Image, 'resize', recording_resize)
  rng = np.random.default_rng(0)
  wide = PIL.Image.fromarray(rng.integers(0, 256, (401, 603, 3), dtype=np.uint8))
  out = images.center_crop_arr(wide, 64)
  # 401 >= 128: halve to 301x200; 200 >= 128: halve to 150x100; 100 < 128: bicubic to 96x64.
  assert calls == [((603, 401), (301, 200), PIL.Image.BOX), ((301, 200), (150, 100), PIL.Image.BOX),
                   ((150, 100), (96, 64), PIL.Image.BICUBIC)]
  assert out.shape == (64, 64, 3) and out.dtype == np.uint8
  # The central square of the last image: columns 16..80 of 96.
  last = resize(resize(resize(wide, (301, 200), PIL.Image.BOX), (150, 100), PIL.Image.BOX), (96, 64),
                PIL.Image.BICUBIC)
  np.testing.assert_array_equal(out, np.asarray(last)[:, 16:80])
  calls.clear()
  # The reference's LSUN export: a single box resize of the short side, then the central crop.
  box = images.box_crop_arr(wide, 64)
  assert calls == [((603, 401), (96, 64), PIL.Image.BOX)] and box.shape == (64, 64, 3)
  calls.clear()
  square = PIL.Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
  np.testing.assert_array_equal(images.crop_resize(square, 64, 'adm'), np.asarray(square))
  assert not calls  # Already the right size: untouched.


def test_decode_converts_modes_as_a_fixed_channel_decoder_does():
  grey = np.arange(64, dtype=np.uint8).reshape(8, 8)
  png = io.BytesIO()
  PIL.Image.fromarray(grey).save(png, format='PNG')
  rgb = images.decode(png.getvalue(), 8, 3, 'adm')
  assert rgb.shape == (8, 8, 3) and all(np.array_equal(rgb[..., c], grey) for c in range(3))
  np.testing.assert_array_equal(images.decode(png.getvalue(), 8, 1, 'adm')[..., 0], grey)


@pytest.mark.parametrize('name, size', [('cifar10', 32), ('lsun/bedroom', 16)])
def test_named_tfds_dataset_with_mock_data(tmp_path, name, size, no_network):
  config = data_config(tmp_path, name=name, image_size=size, num_channels=3)
  # mock_data fakes the reading but not `is_prepared`.
  with tfds.testing.mock_data(num_examples=6), \
      mock.patch.object(tfds.core.DatasetBuilder, 'is_prepared', return_value=True):
    images, labels = data.load_split(config, 'train', 0, 1)
  assert images.shape == (6, size, size, 3) and images.dtype == np.uint8
  assert labels.shape == (6,) and labels.dtype == np.int32


_TWO_PROCESS_WORKER = textwrap.dedent("""
    import sys
    import jax
    import numpy as np
    process_id, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    jax.distributed.initialize(f'localhost:{port}', num_processes=2, process_id=process_id,
                               initialization_timeout=60)
    from cm_jax import data
    from configs import default
    assert (jax.process_count(), jax.device_count()) == (2, 4)
    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 2), ('data', 'fsdp'))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(('data', 'fsdp')))
    config = default.get_config().data  # data_dir '' reads $TFDS_DATA_DIR.
    config.random_flip = True
    try:
      data.InputPipeline(config, 6, 0, sharding)
      sys.exit('no ConfigError for a batch of 6 on 4 devices')
    except data.ConfigError as e:
      assert 'multiple of 4' in str(e), e
    pipeline = data.InputPipeline(config, 64, 0, sharding)
    batch = pipeline.get_batch(30)
    prefetched = next(pipeline.batches(30, 40))  # The read-ahead path gives the same rows.
    for name in batch:
      assert all(np.array_equal(a.data, b.data) for a, b in
                 zip(batch[name].addressable_shards, prefetched[name].addressable_shards)), name
    pipeline.close()
    pieces = {}
    for name, array in batch.items():
      for shard in array.addressable_shards:
        pieces[f'{name}_{shard.index[0].start}'] = np.asarray(shard.data)
    np.savez(out, **pieces)
""")


def test_two_processes_build_the_same_global_batch(digits_dir, tmp_path):
  """2 real JAX processes x 2 CPU devices: together they hold the single-device global batch."""
  with socket.socket() as probe:
    probe.bind(('localhost', 0))
    port = probe.getsockname()[1]
  env = dict(os.environ, TFDS_DATA_DIR=digits_dir, PYTHONPATH=REPO_ROOT, JAX_PLATFORMS='cpu',
             XLA_FLAGS='--xla_force_host_platform_device_count=2')
  workers = [subprocess.Popen(
      [sys.executable, '-c', _TWO_PROCESS_WORKER, str(i), str(port), str(tmp_path / f'{i}.npz')],
      env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
  for worker in workers:
    output, _ = worker.communicate(timeout=150)
    assert worker.returncode == 0, output[-3000:]
  expected = data.InputPipeline(data_config(digits_dir, random_flip=True), 64, 0,
                                single_device_sharding()).get_batch(30)
  got = {'image': np.zeros((64, 8, 8, 1), np.float32), 'label': np.full((64,), -1, np.int32)}
  starts = []
  for i in range(2):
    for key, piece in np.load(tmp_path / f'{i}.npz').items():
      name, start = key.split('_')
      got[name][int(start):int(start) + len(piece)] = piece
      starts.append((i, name, int(start)))
  assert sorted(start for i, name, start in starts if name == 'label') == [0, 16, 32, 48]
  assert all((start >= 32) == bool(i) for i, _, start in starts)  # Each process: its half.
  np.testing.assert_array_equal(got['image'], np.asarray(expected['image']))
  np.testing.assert_array_equal(got['label'], np.asarray(expected['label']))


# Streaming: the read-ahead gives exactly the batches of random access, from any step.


@pytest.mark.parametrize('loader', [
    {'num_threads': 1, 'prefetch': 1, 'device_prefetch': 0},
    {'num_threads': 4, 'prefetch': 8, 'device_prefetch': 2},
])
def test_prefetched_batches_are_the_random_access_batches(digits_dir, loader):
  config = data_config(digits_dir, random_flip=True)
  config.loader.update(loader)
  pipeline = data.InputPipeline(config, 64, 5, single_device_sharding())
  # From a step inside epoch 1 (22.5 steps per epoch), across the next epoch boundary.
  got = list(pipeline.batches(30, 50))
  assert len(got) == 20
  for step, batch in zip(range(30, 50), got):
    want = pipeline.get_batch(step)
    np.testing.assert_array_equal(np.asarray(batch['image']), np.asarray(want['image']))
    np.testing.assert_array_equal(np.asarray(batch['label']), np.asarray(want['label']))
    assert batch['image'].sharding == want['image'].sharding
  pipeline.close()


@pytest.mark.slow  # Spawning the workers (each imports TF, JAX, TFDS) takes ~15 s on 2 cores.
def test_worker_processes_give_the_same_batches(digits_dir):
  config = data_config(digits_dir, random_flip=True)
  config.loader.num_workers = 2
  pipeline = data.InputPipeline(config, 32, 1, single_device_sharding())
  host = pipeline.host_batches(40, 46)
  for step in range(40, 46):
    batch = next(host)
    want = pipeline.local_batch(step)
    np.testing.assert_array_equal(batch['image'], want['image'])
    np.testing.assert_array_equal(batch['label'], want['label'])
  host.close()


_KILLED_READER = textwrap.dedent("""
    import hashlib, sys
    import jax
    import numpy as np
    from cm_jax import data
    from configs import default
    data_dir, out = sys.argv[1], sys.argv[2]
    config = default.get_config().data
    config.data_dir, config.random_flip = data_dir, True
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ('data', 'fsdp'))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(('data', 'fsdp')))
    pipeline = data.InputPipeline(config, 16, 9, sharding)
    with open(out, 'w') as f:
      for step, batch in enumerate(pipeline.batches(0, 10_000)):
        digest = hashlib.sha256(np.asarray(batch['image']).tobytes()
                                + np.asarray(batch['label']).tobytes()).hexdigest()
        f.write(f'{step} {digest}\\n')
        f.flush()
""")


def _digest(batch) -> str:
  return hashlib.sha256(np.asarray(batch['image']).tobytes()
                        + np.asarray(batch['label']).tobytes()).hexdigest()


def test_a_killed_reader_resumes_mid_epoch_on_the_same_batches(digits_dir, tmp_path):
  """SIGKILL a process while its workers read ahead, mid-epoch (1438 examples: 89.9 steps of 16);
  a new reader started at the next step continues with exactly the uninterrupted batches."""
  out = str(tmp_path / 'digests.txt')
  env = dict(os.environ, PYTHONPATH=REPO_ROOT, JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)
  proc = subprocess.Popen([sys.executable, '-c', _KILLED_READER, digits_dir, out], env=env,
                          cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  deadline = time.time() + 120
  try:
    while time.time() < deadline and proc.poll() is None:
      if os.path.exists(out) and sum(1 for _ in open(out)) >= 120:  # In the second epoch.
        proc.send_signal(signal.SIGKILL)
        break
      time.sleep(0.01)
    proc.wait(timeout=60)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == -signal.SIGKILL, proc.stdout.read()[-3000:]
  with open(out) as f:
    lines = [line.split() for line in f if line.endswith('\n')]
  killed_after = int(lines[-1][0])
  assert killed_after % 90 not in (0, 89)  # Mid-epoch.
  config = data_config(digits_dir, random_flip=True)
  resumed = data.InputPipeline(config, 16, 9, single_device_sharding())
  uninterrupted = data.InputPipeline(config, 16, 9, single_device_sharding())
  stop = killed_after + 1 + 30
  got = [_digest(b) for b in resumed.batches(killed_after + 1, stop)]
  want = [_digest(uninterrupted.get_batch(step)) for step in range(killed_after + 1, stop)]
  assert got == want
  # And what the killed process read before the kill is what random access gives.
  for step, digest in lines[-5:]:
    assert digest == _digest(uninterrupted.get_batch(int(step)))

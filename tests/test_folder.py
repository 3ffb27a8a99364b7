"""A user's folder of images, and a TFDS dataset resized as the reference does, prepared once into
ArrayRecord TFDS datasets (cm_jax/datasets/prepare.py) and then read like any other (~30 s)."""

import io
import logging
import os
from unittest import mock

import jax
import ml_collections
import numpy as np
import PIL.Image
import pytest
import tensorflow_datasets as tfds

from cm_jax import data
from cm_jax.datasets import images, prepare
from cm_jax.errors import ConfigError, DatasetNotFoundError
from configs import default

SIZE = 16


def single_device_sharding() -> jax.sharding.NamedSharding:
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ('data', 'fsdp'))
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(('data', 'fsdp')))


def _save(path, array: np.ndarray, **kwargs) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  PIL.Image.fromarray(array).save(path, **kwargs)


@pytest.fixture
def tree(tmp_path) -> dict:
  """Real PNG and JPEG files of mixed sizes in two class folders, plus a corrupt JPEG, a greyscale
  PNG, one too small for SIZE, and a text file. Returns the folder and what each good file becomes."""
  rng = np.random.default_rng(0)
  root = tmp_path / 'my photos'
  good = {  # relative path: (height, width, format)
      'cats/a.png': (24, 30, 'PNG'),
      'cats/b.jpg': (40, 70, 'JPEG'),  # Box-halved once (40 >= 2 x 16), then bicubic.
      'cats/nested/c.jpeg': (64, 17, 'JPEG'),
      'dogs/d.png': (SIZE, SIZE, 'PNG'),  # Already the right size.
      'dogs/e.JPG': (90, 120, 'JPEG'),
  }
  expected = {}
  for rel, (height, width, fmt) in good.items():
    _save(str(root / rel), rng.integers(0, 256, (height, width, 3), dtype=np.uint8), format=fmt)
    with PIL.Image.open(root / rel) as image:  # What the file decodes to (JPEG is lossy).
      expected[rel] = images.center_crop_arr(image.convert('RGB'), SIZE)
  _save(str(root / 'dogs' / 'grey.png'), rng.integers(0, 256, (30, 30), dtype=np.uint8))
  _save(str(root / 'cats' / 'tiny.png'), rng.integers(0, 256, (12, 40, 3), dtype=np.uint8))
  jpeg = io.BytesIO()
  PIL.Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(jpeg, format='JPEG')
  (root / 'dogs' / 'broken.jpg').write_bytes(jpeg.getvalue()[:300])  # Truncated.
  (root / 'README.txt').write_text('not an image')
  return {'root': str(root), 'expected': expected, 'data_dir': str(tmp_path / 'tfds')}


def folder_config(tree: dict, **overrides) -> ml_collections.ConfigDict:
  config = default.get_config().data
  config.update(name=f'folder:{tree["root"]}', data_dir=tree['data_dir'], image_size=SIZE,
                num_channels=3, folder_labels=True)
  config.update(overrides)
  return config


BAD = {'dogs/broken.jpg': 'cannot be read as an image', 'dogs/grey.png': 'greyscale',
       'cats/tiny.png': 'too small: 40x12'}


def test_bad_files_are_refused_by_default_with_every_path_and_reason(tree):
  with pytest.raises(ConfigError) as info:
    data.InputPipeline(folder_config(tree), 4, 0, single_device_sharding())
  message = str(info.value)
  assert message.startswith(f'3 of the 8 image files in {tree["root"]} cannot be used')
  for rel, reason in BAD.items():
    assert f'  {rel}: ' in message and reason in message.split(f'  {rel}: ')[1].split('\n')[0]
  assert '--config.data.bad_files=skip' in message
  name = prepare.folder_dataset_name(folder_config(tree))
  assert not os.path.exists(os.path.join(tree['data_dir'], name, prepare.VERSION))  # Nothing kept.
  with open(os.path.join(tree['data_dir'], name, 'bad_files.txt')) as f:
    assert sorted(line.split('\t')[0] for line in f) == sorted(BAD)


def test_skipped_bad_files_are_reported_and_only_good_images_are_trained_on(tree, caplog):
  config = folder_config(tree, bad_files='skip')
  with caplog.at_level(logging.INFO):
    pipeline = data.InputPipeline(config, 5, 0, single_device_sharding())
  assert pipeline.num_examples == 5 and pipeline.has_labels
  logged = '\n'.join(r.getMessage() for r in caplog.records)
  assert 'Skipped 3 bad files' in logged and all(rel in logged for rel in BAD)
  assert 'Ignored 1 files' in logged and 'README.txt' in logged
  assert '5 of 8 image files' in logged and '2 classes' in logged
  # One step of batch 5 is the whole epoch: each good image once, as center_crop_arr makes it, with
  # the label of its first-level folder (cats 0, dogs 1, in sorted order).
  batch = pipeline.local_batch(0)
  seen = set()
  for image, label in zip(batch['image'], batch['label']):
    matches = [rel for rel, want in tree['expected'].items() if np.array_equal(image, want)]
    assert len(matches) == 1, 'a trained image is none of the good files'
    assert label == ('cats', 'dogs').index(matches[0].split('/')[0])
    seen.add(matches[0])
  assert seen == set(tree['expected'])


def test_a_prepared_folder_is_reused_and_a_changed_one_refused(tree):
  config = folder_config(tree, bad_files='skip')
  data.InputPipeline(config, 5, 0, single_device_sharding())
  with mock.patch.object(prepare, 'prepare_folder', side_effect=AssertionError('prepared again')):
    again = data.InputPipeline(config, 5, 0, single_device_sharding())
    assert again.num_examples == 5
    # Prepared with the bad files skipped: refusing them now says so instead of training.
    with pytest.raises(ConfigError, match='3 bad files .* were skipped when it was prepared'):
      data.InputPipeline(folder_config(tree, bad_files='refuse'), 5, 0, single_device_sharding())
    _save(os.path.join(tree['root'], 'cats', 'new.png'), np.zeros((20, 20, 3), np.uint8))
    with pytest.raises(ConfigError, match='changed since it was prepared'):
      data.InputPipeline(config, 5, 0, single_device_sharding())


def test_labels_need_class_folders_and_other_shapes_are_other_datasets(tree, tmp_path):
  loose = tmp_path / 'loose'
  _save(str(loose / 'x.png'), np.zeros((20, 20, 3), np.uint8))
  with pytest.raises(ConfigError, match='lie directly in'):
    data.InputPipeline(folder_config({'root': str(loose), 'data_dir': tree['data_dir']}), 1, 0,
                       single_device_sharding())
  unlabeled = folder_config({'root': str(loose), 'data_dir': tree['data_dir']}, folder_labels=False)
  pipeline = data.InputPipeline(unlabeled, 1, 0, single_device_sharding())
  assert not pipeline.has_labels and pipeline.local_batch(0)['label'].tolist() == [0]
  names = {prepare.folder_dataset_name(folder_config(tree, **o))
           for o in ({}, {'image_size': 32}, {'resize': 'box'}, {'folder_labels': False})}
  assert len(names) == 4 and all(n.startswith('folder_my_photos_') for n in names)
  with pytest.raises(DatasetNotFoundError, match='there is no folder'):
    prepare.ensure_folder_dataset(folder_config({'root': str(tmp_path / 'none'),
                                                 'data_dir': tree['data_dir']}))


def test_the_prepare_command_says_how_to_train(tree, capsys):
  prepare.main([f'--source=folder:{tree["root"]}', f'--image_size={SIZE}', '--labels',
                '--bad_files=skip', f'--data_dir={tree["data_dir"]}'])
  out = capsys.readouterr().out
  assert 'Prepared 5 images' in out
  assert (f'--config.data.name=folder:{tree["root"]} --config.data.image_size={SIZE} '
          '--config.data.num_channels=3' in out)
  assert '--config.data.folder_labels=True' in out and '--config.data.bad_files=skip' in out
  with pytest.raises(SystemExit, match='cannot be used'):  # Refused: a one-line error, no trace.
    prepare.main([f'--source=folder:{tree["root"]}', '--image_size=12',
                  f'--data_dir={tree["data_dir"]}', '--labels'])


# A TFDS dataset of full-size images, resized once with the reference's preprocessing (issue 13,
# item 13: ImageNet 64 from imagenet2012 as openai/consistency_models makes it).


def _source_dataset(data_dir: str, file_format: str) -> dict:
  """A tiny TFDS dataset as imagenet2012 is prepared: JPEGs of varying sizes, class labels."""
  rng = np.random.default_rng(1)
  splits, decoded = {}, {}
  for split, count in (('train', 6), ('validation', 3)):
    rows = []
    for i in range(count):
      shape = (int(rng.integers(20, 90)), int(rng.integers(20, 90)), 3)
      buffer = io.BytesIO()
      PIL.Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(buffer, format='JPEG')
      rows.append((i, {'image': io.BytesIO(buffer.getvalue()), 'label': i % 3}))
      decoded[split, i] = np.asarray(PIL.Image.open(io.BytesIO(buffer.getvalue())).convert('RGB'))
    splits[split] = rows
  features = tfds.features.FeaturesDict({
      'image': tfds.features.Image(shape=(None, None, 3), encoding_format='jpeg'),
      'label': tfds.features.ClassLabel(names=['n015', 'n020', 'n031'])})
  tfds.dataset_builders.store_as_tfds_dataset(
      name='toy_imagenet', version='1.0.0', features=features, split_datasets=splits,
      data_dir=data_dir, file_format=file_format, disable_shuffling=True)
  return decoded


def test_a_tfds_dataset_resized_as_the_reference_keeps_its_labels(tmp_path):
  data_dir = str(tmp_path / 'tfds')
  decoded = _source_dataset(data_dir, 'tfrecord')  # imagenet2012 is prepared as TFRecord files.
  config = default.get_config().data
  config.update(name='toy_imagenet', data_dir=data_dir, image_size=SIZE, num_channels=3)
  # TFRecord files have no random access: the pipeline says how to get ArrayRecord files.
  with pytest.raises(DatasetNotFoundError, match='convert_format --dataset_version_dir=.*toy_imagenet'):
    data.InputPipeline(config, 3, 0, single_device_sharding())
  name = prepare.prepare_resized('toy_imagenet', SIZE, 'adm', data_dir=data_dir)
  assert name == f'toy_imagenet_{SIZE}_adm'
  config.name = name
  builder = tfds.builder(name, data_dir=data_dir)
  assert builder.info.features['label'].names == ['n015', 'n020', 'n031']  # Same label order.
  for split, count in (('train', 6), ('validation', 3)):
    got, labels = data.load_split(config, split, 0, 1)
    assert len(got) == count
    for i in range(count):
      want = images.center_crop_arr(PIL.Image.fromarray(decoded[split, i]), SIZE)
      np.testing.assert_array_equal(got[i], want)
    assert labels.tolist() == [i % 3 for i in range(count)]

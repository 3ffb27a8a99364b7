r"""Prepare once, train many times: a folder of images, or a TFDS dataset resized as the reference does,
written as a TFDS dataset in ArrayRecord files (random access) that trains like any other.

A folder of PNG/JPEG/WebP files (labels, when asked, from the names of its first-level subfolders):

  python -m cm_jax.datasets.prepare --source=folder:/path/to/images --image_size=256 \
      --data_dir=/data/tfds [--labels] [--bad_files=skip] [--resize=adm] [--num_channels=3]
  python launch.py ... --config.data.name=folder:/path/to/images --config.data.image_size=256 \
      --config.data.data_dir=/data/tfds

`--config.data.name=folder:/path` alone also prepares it on first use (one process only: a run of
several processes needs it prepared first, by this command). The prepared copy is found again by the
folder's path and the options that shape its images (`folder_dataset_name`); a folder whose files
changed since is refused, not silently re-read.

Bad files (unreadable or truncated, a mode that is not the dataset's: grey among colour, 16-bit,
transparent; a short side below image_size) are listed with their paths and reasons, and then either
refused (data.bad_files='refuse', the default: nothing is written, the run stops) or skipped
('skip': the list stays beside the dataset, in cm_jax_folder.json, and is logged on every use).

A TFDS dataset resized with the reference's preprocessing (e.g. ImageNet 64 as openai/consistency_models
makes it from the full-size ILSVRC-2012 images, rather than TFDS 'imagenet_resized/64x64'):

  python -m cm_jax.datasets.prepare --source=imagenet2012 --image_size=64 --resize=adm \
      --data_dir=/data/tfds   # writes TFDS 'imagenet2012_64_adm' (train and validation) there
"""

import argparse
import concurrent.futures
import hashlib
import io
import json
import os
import re
import shutil
import sys
import time
from typing import Any, Callable, Iterable, Iterator

from absl import logging
import ml_collections
import numpy as np
from PIL import Image
import tensorflow as tf
import tensorflow_datasets as tfds

from cm_jax import files
from cm_jax.datasets import images as image_ops
from cm_jax.errors import ConfigError, DatasetNotFoundError, choose

FOLDER_PREFIX = 'folder:'
BAD_FILE_POLICIES = ('refuse', 'skip')
REPORT_NAME = 'cm_jax_folder.json'  # Beside the prepared dataset's version folders.
VERSION = '1.0.0'
_CHUNK = 64  # Files decoded per round of the thread pool: bounds the memory of a preparation.
_LISTED = 30  # Bad files named in an error message (all of them go to the report file).


def is_folder(name: str) -> bool:
  return name.startswith(FOLDER_PREFIX)


def _folder_path(name: str) -> str:
  return os.path.abspath(os.path.expanduser(name[len(FOLDER_PREFIX):]))


def folder_dataset_name(data_config: ml_collections.ConfigDict) -> str:
  """The TFDS name of a `folder:` dataset's prepared copy: the folder's name and a hash of what
  shapes its images (path, size, channels, resize method, labels)."""
  path = _folder_path(data_config.name)
  shape = {'path': path, 'image_size': data_config.image_size,
           'num_channels': data_config.num_channels, 'resize': data_config.resize,
           'labels': bool(data_config.folder_labels)}
  digest = hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:10]
  slug = re.sub(r'[^a-z0-9]+', '_', os.path.basename(path).lower()).strip('_')[:40] or 'images'
  return f'folder_{slug}_{data_config.image_size}_{digest}'


def _data_root(data_dir: str) -> str:
  return os.path.expanduser(data_dir or str(tfds.core.constants.DATA_DIR))


# --------------------------------------------------------------------------------------------------
# Reading a folder.
# --------------------------------------------------------------------------------------------------
def scan_folder(folder: str, labels: bool) -> tuple[list[tuple[str, int]], list[str], list[str]]:
  """([(relative path, label)] of its image files in sorted order, ignored files, class names).

  Raises:
    DatasetNotFoundError: no such folder, or no image file in it.
    ConfigError: labels are asked for but images lie directly in the folder (outside any class).
  """
  if not os.path.isdir(folder):
    raise DatasetNotFoundError(f'data.name={FOLDER_PREFIX}{folder}: there is no folder {folder}.')
  found, ignored = [], []
  for root, dirs, names in os.walk(folder):
    dirs.sort()
    for name in sorted(names):
      rel = os.path.relpath(os.path.join(root, name), folder)
      if name.startswith('.'):
        continue  # .DS_Store and the like: not the user's data.
      (found if name.lower().endswith(image_ops.IMAGE_EXTENSIONS) else ignored).append(rel)
  if not found:
    raise DatasetNotFoundError(
        f'{folder} holds no image files ({", ".join(image_ops.IMAGE_EXTENSIONS)}), '
        f'{len(ignored)} other files.')
  if not labels:
    return [(rel, 0) for rel in found], ignored, []
  loose = [rel for rel in found if os.sep not in rel]
  if loose:
    raise ConfigError(
        f'data.folder_labels=True takes each image\'s label from its first-level subfolder, but '
        f'{len(loose)} images lie directly in {folder} (e.g. {loose[:3]}): move them into class '
        'folders, or set --config.data.folder_labels=False.')
  classes = sorted({rel.split(os.sep)[0] for rel in found})
  index = {name: i for i, name in enumerate(classes)}
  return [(rel, index[rel.split(os.sep)[0]]) for rel in found], ignored, classes


def fingerprint(folder: str, entries: list[tuple[str, int]]) -> str:
  """A hash of the image files' names and sizes: changes when files are added, removed or edited."""
  digest = hashlib.sha256()
  for rel, _ in entries:
    digest.update(f'{rel}\0{os.path.getsize(os.path.join(folder, rel))}\n'.encode())
  return digest.hexdigest()[:16]


def load_file(path: str, size: int, num_channels: int, resize: str) -> tuple[bytes | None, str | None]:
  """(PNG bytes of the prepared size x size image, None) or (None, why the file is bad)."""
  try:
    with open(path, 'rb') as f:
      image = image_ops.open_image(f.read())
  except Exception as e:  # pylint: disable=broad-except  # PIL raises many kinds for bad data.
    return None, f'cannot be read as an image ({type(e).__name__}: {e})'
  problem = image_ops.mode_problem(image, num_channels)
  if problem:
    return None, problem
  width, height = image.size
  if min(width, height) < size:
    return None, (f'too small: {width}x{height}, its short side is below data.image_size={size} '
                  '(it would have to be enlarged)')
  array = image_ops.crop_resize(image_ops.to_mode(image, num_channels), size, resize)
  return _png(array), None


def _png(array: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  # Level 1: lossless like any level, several times faster to write than the default, ~10% larger.
  Image.fromarray(array).save(buffer, format='PNG', compress_level=1)
  return buffer.getvalue()


def _ordered_map(fn: Callable[[Any], Any], items: Iterable[Any], threads: int) -> Iterator[Any]:
  """fn over items in threads, results in order, at most a few chunks in memory."""
  items = list(items)
  with concurrent.futures.ThreadPoolExecutor(threads) as pool:
    for start in range(0, len(items), _CHUNK):
      yield from pool.map(fn, items[start:start + _CHUNK])


def _threads() -> int:
  return max(1, min(16, len(os.sched_getaffinity(0))))


class _Refused(Exception):
  """Stops the TFDS writer when bad files are refused."""


def _remove_unfinished(dataset_dir: str) -> None:
  if os.path.isdir(dataset_dir):
    for name in os.listdir(dataset_dir):
      if name.startswith('incomplete.'):
        shutil.rmtree(os.path.join(dataset_dir, name), ignore_errors=True)


def _bad_listing(bad: list[dict], limit: int = _LISTED) -> str:
  lines = [f'  {b["path"]}: {b["reason"]}' for b in bad[:limit]]
  if len(bad) > limit:
    lines.append(f'  ... and {len(bad) - limit} more')
  return '\n'.join(lines)


def prepare_folder(data_config: ml_collections.ConfigDict, threads: int | None = None) -> dict:
  """Converts the folder of `data.name` into its TFDS dataset; returns the report it writes.

  Raises:
    ConfigError: bad files with data.bad_files='refuse' (all listed; nothing is written).
  """
  folder = _folder_path(data_config.name)
  size, channels, resize = data_config.image_size, data_config.num_channels, data_config.resize
  choose({m: m for m in image_ops.RESIZE_METHODS}, resize, 'data.resize')
  policy = choose({p: p for p in BAD_FILE_POLICIES}, data_config.bad_files, 'data.bad_files')
  name, root = folder_dataset_name(data_config), _data_root(data_config.data_dir)
  entries, ignored, classes = scan_folder(folder, bool(data_config.folder_labels))
  start = time.time()
  logging.info('Preparing %s (%d image files) as TFDS dataset %s in %s.', folder, len(entries), name,
               root)
  bad: list[dict] = []
  counts = {'written': 0}

  def load(entry):
    return load_file(os.path.join(folder, entry[0]), size, channels, resize)

  def examples():
    for (rel, label), (png, reason) in zip(entries, _ordered_map(load, entries, threads or _threads())):
      if reason:
        bad.append({'path': rel, 'reason': reason})
      elif not (bad and policy == 'refuse'):  # Once refused, only check the remaining files.
        example = {'image': io.BytesIO(png), 'path': rel}
        if classes:
          example['label'] = label
        counts['written'] += 1
        yield counts['written'] - 1, example
    if bad and policy == 'refuse':
      raise _Refused()

  report = {'source': folder, 'fingerprint': fingerprint(folder, entries), 'image_size': size,
            'num_channels': channels, 'resize': resize, 'classes': classes,
            'num_image_files': len(entries), 'ignored': ignored}
  dataset_dir = os.path.join(root, name)
  try:
    tfds.dataset_builders.store_as_tfds_dataset(
        name=name, version=VERSION, features=_folder_features(size, channels, classes),
        split_datasets={'train': examples()}, data_dir=root, file_format='array_record',
        disable_shuffling=True,  # Records in sorted file order: the training order is ours.
        description=f'The images of {folder}, prepared by cm_jax.datasets.prepare ({size}x{size}, '
                    f'{channels} channels, resize {resize!r}).')
  except _Refused:
    _remove_unfinished(dataset_dir)
    os.makedirs(dataset_dir, exist_ok=True)
    listing = os.path.join(dataset_dir, 'bad_files.txt')
    files.atomic_write(listing, lambda f: f.write(
        ''.join(f'{b["path"]}\t{b["reason"]}\n' for b in bad)))
    raise ConfigError(
        f'{len(bad)} of the {len(entries)} image files in {folder} cannot be used (all listed in '
        f'{listing}):\n{_bad_listing(bad)}\nFix or remove them, or set '
        '--config.data.bad_files=skip to train on the other images.') from None
  report.update(bad=bad, num_examples=counts['written'], bad_files=policy)
  files.atomic_write(os.path.join(dataset_dir, REPORT_NAME),
                     lambda f: json.dump(report, f, indent=1))
  _tell(report, name, root, time.time() - start)
  return report


def _folder_features(size: int, channels: int, classes: list[str]) -> tfds.features.FeaturesDict:
  features = {'image': tfds.features.Image(shape=(size, size, channels), encoding_format='png'),
              'path': tfds.features.Text()}
  if classes:
    features['label'] = tfds.features.ClassLabel(names=classes)
  return tfds.features.FeaturesDict(features)


def _tell(report: dict, name: str, root: str, seconds: float | None = None) -> None:
  """What the user is told about a prepared folder (every time it is used)."""
  took = f' in {seconds:.0f} s' if seconds is not None else ''
  logging.info('Folder %s: %d of %d image files as TFDS dataset %s in %s%s%s.', report['source'],
               report['num_examples'], report['num_image_files'], name, root, took,
               f', {len(report["classes"])} classes' if report['classes'] else '')
  if report['bad']:
    logging.warning('Skipped %d bad files of %s (data.bad_files=skip):\n%s', len(report['bad']),
                    report['source'], _bad_listing(report['bad']))
  if report['ignored']:
    logging.warning('Ignored %d files of %s that are not images (%s): %s', len(report['ignored']),
                    report['source'], ', '.join(image_ops.IMAGE_EXTENSIONS),
                    ', '.join(report['ignored'][:10]) + (' ...' if len(report['ignored']) > 10 else ''))


def read_report(data_config: ml_collections.ConfigDict) -> dict | None:
  """The report of a prepared `folder:` dataset, or None if it is not prepared (completely)."""
  name, root = folder_dataset_name(data_config), _data_root(data_config.data_dir)
  path = os.path.join(root, name, REPORT_NAME)
  if not (os.path.exists(path) and os.path.exists(os.path.join(root, name, VERSION,
                                                               'dataset_info.json'))):
    return None
  with open(path) as f:
    return json.load(f)


def ensure_folder_dataset(data_config: ml_collections.ConfigDict) -> dict:
  """Prepares a `folder:` dataset on first use; on later ones checks that it still fits.

  Raises:
    ConfigError: the folder's files changed since it was prepared, or bad files were skipped then
      and data.bad_files is now 'refuse'.
    DatasetNotFoundError: not prepared, and this is one of several processes.
  """
  choose({p: p for p in BAD_FILE_POLICIES}, data_config.bad_files, 'data.bad_files')
  folder, name = _folder_path(data_config.name), folder_dataset_name(data_config)
  root = _data_root(data_config.data_dir)
  report = read_report(data_config)
  if report is None:
    import jax  # pylint: disable=g-import-not-at-top
    if jax.process_count() > 1:
      raise DatasetNotFoundError(
          f'{data_config.name} is not prepared in {root} yet, and {jax.process_count()} processes '
          'would each convert it. Prepare it once first, then launch the run:\n  python -m '
          f'cm_jax.datasets.prepare --source={data_config.name} --image_size='
          f'{data_config.image_size} --num_channels={data_config.num_channels} --resize='
          f'{data_config.resize} --bad_files={data_config.bad_files} --data_dir={root}'
          + (' --labels' if data_config.folder_labels else ''))
    return prepare_folder(data_config)
  entries, _, _ = scan_folder(folder, bool(data_config.folder_labels))
  if fingerprint(folder, entries) != report['fingerprint']:
    raise ConfigError(
        f'The files in {folder} changed since it was prepared as {os.path.join(root, name)} '
        f'({report["num_image_files"]} image files then, {len(entries)} now). Delete that folder '
        'to prepare it again (a run that trained on the old copy then trains on the new one).')
  if report['bad'] and data_config.bad_files == 'refuse':
    raise ConfigError(
        f'{len(report["bad"])} bad files of {folder} were skipped when it was prepared (with '
        f'data.bad_files=skip), and data.bad_files is now \'refuse\':\n{_bad_listing(report["bad"])}'
        '\nSet --config.data.bad_files=skip to train without them, or fix them and delete '
        f'{os.path.join(root, name)} to prepare the folder again.')
  _tell(report, name, root)
  return report


# --------------------------------------------------------------------------------------------------
# A TFDS dataset resized with the reference's preprocessing.
# --------------------------------------------------------------------------------------------------
def resized_name(source: str, image_size: int, resize: str) -> str:
  """'imagenet2012' -> 'imagenet2012_64_adm'; 'lsun/bedroom' -> 'lsun_bedroom_256_adm'."""
  return f'{re.sub(r"[^A-Za-z0-9]+", "_", source)}_{image_size}_{resize}'


def parse_record(record: bytes, has_labels: bool) -> dict[str, Any]:
  """{'image': encoded bytes, 'label': int} of a serialized TFDS example (a tf.train.Example)."""
  features = tf.train.Example.FromString(record).features.feature
  return {'image': features['image'].bytes_list.value[0],
          'label': features['label'].int64_list.value[0] if has_labels else 0}


def raw_examples(builder: tfds.core.DatasetBuilder, split: str) -> Iterator[dict[str, Any]]:
  """A split's examples in order with their images still encoded, whatever its file format."""
  has_labels = 'label' in builder.info.features
  try:
    source = builder.as_data_source(split=split,
                                    deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
  except NotImplementedError:  # No random access (TFRecord files): TFDS's sequential reader.
    dataset = builder.as_dataset(split=split, shuffle_files=False,
                                 decoders={'image': tfds.decode.SkipDecoding()})
    for example in tfds.as_numpy(dataset):
      yield {'image': example['image'], 'label': int(example['label']) if has_labels else 0}
    return
  for index in range(len(source)):
    yield parse_record(source[index], has_labels)


def prepare_resized(source: str, image_size: int, resize: str, data_dir: str = '',
                    out_data_dir: str = '', splits: tuple[str, ...] = (), num_channels: int = 3,
                    threads: int | None = None) -> str:
  """Writes TFDS `source` (prepared in any file format) resized to image_size by `resize`, with its
  labels (and their order), as the ArrayRecord dataset `resized_name(...)`; returns that name."""
  choose({m: m for m in image_ops.RESIZE_METHODS}, resize, 'resize')
  builder = tfds.builder(source, data_dir=data_dir or None, try_gcs=False)
  if not builder.is_prepared():
    raise DatasetNotFoundError(f'{source} is not prepared in {builder.data_dir_root}: prepare it '
                               'with TFDS first (see the README, "Real datasets").')
  features = builder.info.features
  label = features['label'] if 'label' in features else None
  splits = splits or tuple(builder.info.splits)
  name, root = resized_name(source, image_size, resize), _data_root(out_data_dir or data_dir)

  def convert(example: dict) -> bytes:
    image = image_ops.to_mode(image_ops.open_image(example['image']), num_channels)
    return _png(image_ops.crop_resize(image, image_size, resize))

  def examples(split: str):
    rows = raw_examples(builder, split)
    window = []

    def flush():
      for example, png in zip(window, pool.map(convert, window)):
        out = {'image': io.BytesIO(png)}
        if label is not None:
          out['label'] = int(example['label'])
        yield len(written), out
        written.append(1)
      window.clear()

    written = []
    with concurrent.futures.ThreadPoolExecutor(threads or _threads()) as pool:
      for example in rows:
        window.append(example)
        if len(window) == _CHUNK * 4:
          yield from flush()
      yield from flush()

  out_features = {'image': tfds.features.Image(shape=(image_size, image_size, num_channels),
                                               encoding_format='png')}
  if label is not None:
    out_features['label'] = tfds.features.ClassLabel(names=label.names)
  tfds.dataset_builders.store_as_tfds_dataset(
      name=name, version=VERSION, features=tfds.features.FeaturesDict(out_features),
      split_datasets={split: examples(split) for split in splits}, data_dir=root,
      file_format='array_record', disable_shuffling=True,
      description=f'TFDS {source} resized to {image_size}x{image_size} by cm_jax.datasets.prepare '
                  f'with resize {resize!r} (openai/consistency_models preprocessing).')
  return name


# --------------------------------------------------------------------------------------------------
# Command line.
# --------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--source', required=True,
                      help='folder:/path/to/images, or the name of a prepared TFDS dataset.')
  parser.add_argument('--image_size', type=int, required=True)
  parser.add_argument('--num_channels', type=int, default=3, choices=(1, 3))
  parser.add_argument('--resize', default='adm', choices=image_ops.RESIZE_METHODS)
  parser.add_argument('--data_dir', default='', help="TFDS data_dir ('' = the TFDS default).")
  parser.add_argument('--out_data_dir', default='',
                      help='TFDS sources: where to write the resized copy (default: --data_dir).')
  parser.add_argument('--splits', default='', help='TFDS sources: comma-separated (default: all).')
  parser.add_argument('--labels', action='store_true',
                      help='Folders: labels from the first-level subfolder names.')
  parser.add_argument('--bad_files', default='refuse', choices=BAD_FILE_POLICIES)
  args = parser.parse_args(argv)
  logging.set_verbosity(logging.INFO)
  try:
    if is_folder(args.source):
      data_config = ml_collections.ConfigDict({
          'name': args.source, 'data_dir': args.data_dir, 'image_size': args.image_size,
          'num_channels': args.num_channels, 'resize': args.resize, 'folder_labels': args.labels,
          'bad_files': args.bad_files})
      report = ensure_folder_dataset(data_config)
      print(f'Prepared {report["num_examples"]} images. Train with --config.data.name='
            f'{args.source} --config.data.image_size={args.image_size} --config.data.num_channels='
            f'{args.num_channels} --config.data.data_dir={_data_root(args.data_dir)}'
            + (' --config.data.folder_labels=True' if args.labels else '')
            + (" --config.data.bad_files=skip" if report['bad'] else '')
            + (f' --config.data.resize={args.resize}' if args.resize != 'adm' else ''))
    else:
      splits = tuple(s for s in args.splits.split(',') if s)
      name = prepare_resized(args.source, args.image_size, args.resize, args.data_dir,
                             args.out_data_dir, splits, args.num_channels)
      print(f'Train with --config.data.name={name} --config.data.image_size={args.image_size} '
            f'--config.data.data_dir={_data_root(args.out_data_dir or args.data_dir)}')
  except (ConfigError, DatasetNotFoundError) as e:
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  main()

r"""Converts a released checkpoint into a cm_jax run folder (see cm_jax/convert/__init__.py, README).

  python -m cm_jax.convert --source=cd_imagenet64_lpips.pt --config=configs/imagenet64_cd.py:lpips \
      --workdir=runs/imagenet64_cd_lpips_released

Pass the config exactly as the converted run will be used afterwards (with the same overrides).
"""

import os
import sys

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Config file of the run (path.py or path.py:variant).',
                                lock_config=True)
flags.DEFINE_string('source', None, 'The checkpoint file to convert.')
flags.DEFINE_string('workdir', None, 'The new run folder.')
flags.DEFINE_enum('source_format', 'auto', ['auto', 'cm_cifar10', 'cm_pytorch', 'edm', 'edm2'],
                  'The checkpoint format; auto tells it from the file.')
flags.DEFINE_integer('step', None, 'Step of the written checkpoint (default: training.num_steps).')
flags.mark_flags_as_required(['config', 'source', 'workdir'])


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  from cm_jax import convert  # pylint: disable=g-import-not-at-top
  from cm_jax.errors import USER_ERRORS  # pylint: disable=g-import-not-at-top
  try:
    convert.convert(FLAGS.config, FLAGS.source, FLAGS.workdir, FLAGS.source_format, FLAGS.step)
  except USER_ERRORS as error:
    sys.exit(f'{type(error).__name__}: {error}')


if __name__ == '__main__':
  sys.path.insert(0, os.getcwd())  # Config files import `configs.default` from the repository root.
  app.run(main)

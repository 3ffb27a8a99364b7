r"""Launch a cm_jax run: train, sample, edit or evaluate.

  python launch.py --config=configs/digits_cd.py --workdir=/tmp/digits_cd
  python launch.py --config=configs/digits_cd.py --workdir=/tmp/digits_cd --mode=sample \
      --config.sampling.sampler=multistep

Any config field can be overridden: --config.training.lr=1e-4. On TPU VMs and pods, under SLURM
`srun` and Open MPI, multi-process initialisation is automatic (--multihost=auto); elsewhere pass
--coordinator_address, --num_processes and --process_id to every process. One process drives all GPUs
of a host by itself. See docs/scaling.md.
"""

import os
import sys

# Keep TensorFlow (used only by TFDS and the summary writers) off the accelerators and quiet.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app, flags, logging  # pylint: disable=g-import-not-at-top
from ml_collections import config_flags

from cm_jax.errors import PREEMPTED_EXIT_CODE  # pylint: disable=g-import-not-at-top
from cm_jax.modes import MODES  # pylint: disable=g-import-not-at-top

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Config file (path.py or path.py:variant).',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Where the run lives: checkpoints, logs, samples, metrics.')
flags.DEFINE_enum('mode', 'train', MODES, 'What to do (a module of cm_jax/modes).')
flags.DEFINE_enum('multihost', 'auto', ['auto', 'on', 'off'],
                  'jax.distributed.initialize: auto = when a cluster (TPU pod, SLURM) or the '
                  'flags below say so; on = always; off = never.')
flags.DEFINE_string('coordinator_address', None, 'host:port of process 0 (multi-process runs).')
flags.DEFINE_integer('num_processes', None, 'Number of processes (multi-process runs).')
flags.DEFINE_integer('process_id', None, 'This process (multi-process runs).')
flags.DEFINE_string('edit_input', '', 'Image file or folder to edit (--mode=edit); default: dataset.')
flags.DEFINE_string('eval_samples', '', 'An existing samples npz to evaluate (--mode=eval).')
flags.mark_flags_as_required(['config', 'workdir'])


class _QuietLibraries:
  """Drop INFO lines from Orbax and TFDS internals: they bury the run's own progress lines."""

  def filter(self, record) -> bool:
    noisy = ('/orbax/', '/tensorflow_datasets/')
    return record.levelno > 20 or not any(part in record.pathname for part in noisy)


def _init_distributed() -> None:
  from cm_jax import sharding
  sharding.initialize_distributed(FLAGS.multihost, FLAGS.coordinator_address, FLAGS.num_processes,
                                  FLAGS.process_id)


def _config_spec(argv) -> str | None:
  """The value of --config (`--config=x` or `--config x`), if given."""
  for i, arg in enumerate(argv):
    if arg.startswith('--config='):
      return arg.split('=', 1)[1]
    if arg == '--config' and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _parse_flags(argv):
  """absl flag parsing, with one line for what a user can get wrong: a config file that is not
  there, a variant it does not have, an override path it does not have or a value of the wrong type.
  """
  from cm_jax import config_utils  # pylint: disable=g-import-not-at-top
  from cm_jax.errors import ConfigError  # pylint: disable=g-import-not-at-top
  spec = _config_spec(argv)
  try:
    if spec is not None:
      # config_flags would defer a missing file's error to the config's first use, as a traceback.
      config_utils.check_config_file(spec)
    return FLAGS(argv)
  except ConfigError as error:
    sys.exit(f'Config error: {error}')
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as error:
    keys = [a[len('--config.'):].split('=', 1)[0] for a in argv if a.startswith('--config.')]
    try:
      if spec is not None:
        # Runs the config file again, outside config_flags: its own errors keep their traceback.
        config_utils.check_override_keys(config_utils.load_config_file(spec), keys)
    except ConfigError as config_error:
      sys.exit(f'Config error: {config_error}')
    message = str(error)
    if isinstance(error, flags.Error) and '\n' not in message.strip():
      sys.exit(f'Config error: {message.removeprefix("flag ")}')  # E.g. a value of the wrong type.
    raise


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.get_absl_handler().addFilter(_QuietLibraries())
  import tensorflow as tf
  tf.config.set_visible_devices([], 'GPU')  # TF must not take GPU memory from JAX.
  from cm_jax.errors import USER_ERRORS, Preempted
  try:
    from cm_jax import config_utils
    config_utils.check_local_dir(FLAGS.workdir)
    _init_distributed()  # Before anything touches a device.
    import jax
    # Random bits that do not depend on how an array is sharded (jax's default since 0.5; set here
    # so that a run's samples and losses stay the same on any device count whatever the default).
    jax.config.update('jax_threefry_partitionable', True)
    logging.info('JAX process %d/%d, %d local / %d global devices.', jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())
    if jax.process_index() > 0:
      logging.set_verbosity(logging.WARNING)  # One progress log per run (process 0's); warnings stay.
    result = _run_mode(FLAGS.config)
  except USER_ERRORS as error:
    logging.error('%s: %s', type(error).__name__, error)
    sys.exit(f'{type(error).__name__}: {error}')
  except Preempted as notice:
    _exit_preempted(str(notice))
  if getattr(result, 'preempted', False):
    _exit_preempted(f'Preemption notice: the checkpoint of step {result.step} is saved in '
                    f'{FLAGS.workdir}. Relaunch the same command to resume.')


def _exit_preempted(message: str) -> None:
  """Exit with PREEMPTED_EXIT_CODE: not 0, so that a scheduler or an `&&` chain sees the run is not
  finished, and not 1, so that it can tell a stop to resume from a failure."""
  logging.warning('%s', message)
  print(message, file=sys.stderr, flush=True)
  sys.exit(PREEMPTED_EXIT_CODE)


def _run_mode(config):
  import importlib
  mode = importlib.import_module(f'cm_jax.modes.{FLAGS.mode}')
  flags = {'edit': {'edit_input': FLAGS.edit_input}, 'eval': {'samples_path': FLAGS.eval_samples}}
  return mode.run(config, FLAGS.workdir, **flags.get(FLAGS.mode, {}))


if __name__ == '__main__':
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # configs/ import configs.default.
  app.run(main, flags_parser=_parse_flags)

"""Reliability (issue 19): no silent wrong result, no lost workdir record, one line per user error.

In-process where the behaviour is the library's; through `launch.py` where it is the process's
(signals, exit codes, the lock, what reaches stderr). Training runs are tiny digits runs.
"""

import os
import re
import shutil
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from cm_jax import checkpointing, inference
from cm_jax.errors import ConfigError, WorkdirError
from cm_jax.modes import eval as eval_mode
from tests import tiny

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env() -> dict:
  """The test session's environment, sharing its compilation cache with launch.py."""
  env = dict(os.environ)
  env.pop('XLA_FLAGS', None)
  if jax.config.jax_compilation_cache_dir:
    env['JAX_COMPILATION_CACHE_DIR'] = jax.config.jax_compilation_cache_dir
    env['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0.5'
  return env


def _launch(*args, timeout: int = 600) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, 'launch.py', *args], cwd=REPO, capture_output=True,
                        text=True, timeout=timeout, env=_env())


def _last_line(stderr: str) -> str:
  """The one line a user error ends in; asserts no traceback came before it."""
  assert 'Traceback' not in stderr, stderr[-3000:]
  return stderr.strip().splitlines()[-1]


def _steps(ckpt_dir: str) -> list[int]:
  if not os.path.isdir(ckpt_dir):
    return []
  return sorted(int(n) for n in os.listdir(ckpt_dir) if n.isdigit())


# --------------------------------------------------------------------------------------------------
# Items 3 and 8 on a trained run.
# --------------------------------------------------------------------------------------------------
def _trained_config(data_dir: str):
  config = tiny.edm_config(data_dir, steps=6)
  config.training.checkpoint_every = 5
  return config


@pytest.fixture(scope='module')
def trained(tmp_path_factory, digits_data_dir) -> str:
  """A tiny EDM run of 6 steps with checkpoint_every=5."""
  workdir = str(tmp_path_factory.mktemp('trained') / 'run')
  tiny.train(_trained_config(digits_data_dir), workdir)
  return workdir


def test_checkpoints_only_every_checkpoint_every_and_at_the_end(trained):
  assert _steps(os.path.join(trained, 'checkpoints')) == [5, 6]  # Not Orbax's extra first step.


def test_a_checkpoint_that_cannot_be_written_is_one_line_naming_the_folder(tmp_path, monkeypatch,
                                                                           digits_data_dir):
  workdir = str(tmp_path / 'run')
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  save = checkpointing.Checkpointer.save

  def save_into_a_vanished_folder(self, step, *args, **kwargs):
    shutil.rmtree(self.directory)
    with open(self.directory, 'w') as f:  # The folder is now a file: nothing can be written.
      f.write('x')
    return save(self, step, *args, **kwargs)
  monkeypatch.setattr(checkpointing.Checkpointer, 'save', save_into_a_vanished_folder)
  start = time.time()
  with pytest.raises(WorkdirError, match=re.escape(f'Cannot write the checkpoint of step 5 into '
                                                   f'{ckpt_dir} (NotADirectoryError')) as info:
    tiny.train(_trained_config(digits_data_dir), workdir)
  assert '\n' not in str(info.value)
  assert time.time() - start < 240  # Not Orbax's 5-minute wait for a directory never created.


def test_sampling_with_another_model_is_one_line(trained, tmp_path, digits_data_dir):
  workdir = str(tmp_path / 'run')
  shutil.copytree(trained, workdir)
  other = _trained_config(digits_data_dir)
  other.model.nf = 16
  # With the run's config.json, the config is compared before anything is read.
  with pytest.raises(WorkdirError, match=r'another model \(model.nf: 8 in the workdir, 16 now'):
    inference.restore(other, workdir)
  # Without it, the checkpoint is refused on its metadata, before any array is read: a read that
  # fails half-way printed a traceback per pending TensorStore read at exit ('Event loop is
  # closed').
  os.remove(os.path.join(workdir, 'config.json'))
  out = _launch('--config=configs/digits_edm.py', f'--workdir={workdir}', '--mode=sample',
                f'--config.data.data_dir={digits_data_dir}', timeout=300)
  assert out.returncode == 1
  assert 'Event loop is closed' not in out.stderr
  assert 'the saved params are of another network' in _last_line(out.stderr)


def test_eval_samples_that_are_not_an_npz_are_one_line(tmp_path):
  config = tiny.edm_config('unused')
  text = tmp_path / 'samples.txt'
  text.write_text('these are not samples\n')
  array = tmp_path / 'samples.npy'
  np.save(array, np.zeros((2, 8, 8, 1), np.uint8))
  for path in (text, array):
    with pytest.raises(ConfigError, match='is not an npz file') as info:
      eval_mode.read_samples(str(path), config)
    assert 'allow_pickle' not in str(info.value)

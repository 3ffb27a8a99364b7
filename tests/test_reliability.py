"""Reliability (issue 19): no silent wrong result, no lost workdir record, one line per user error.

In-process where the behaviour is the library's; through `launch.py` where it is the process's
(signals, exit codes, the lock, what reaches stderr). Training runs are tiny digits runs.
"""

import ast
import contextlib
import json
import logging
import math
import os
import re
import shutil
import shlex
import signal
import socket
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from cm_jax import checkpointing, config_utils, inference, methods, rundir, teacher, trainer
from cm_jax.errors import (PREEMPTED_EXIT_CODE, ConfigError, NonFiniteLossError, Preempted,
                           TeacherError, WorkdirError)
from cm_jax.modes import eval as eval_mode
from cm_jax.modes import train as train_mode
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


@pytest.fixture
def no_training(monkeypatch):
  """Makes reaching the training loop (and so any compilation) a test failure."""
  def fail(*args, **kwargs):
    raise AssertionError('reached training: the error should have come before compiling')
  monkeypatch.setattr(trainer, 'train', fail)


# --------------------------------------------------------------------------------------------------
# Item 6: a workdir that cannot be used is one line.
# --------------------------------------------------------------------------------------------------
def test_unusable_workdirs_are_one_line_before_compiling(tmp_path, no_training, digits_data_dir):
  config = tiny.edm_config(digits_data_dir)
  a_file = tmp_path / 'a_file'
  a_file.write_text('not a directory')
  # Components of 200 characters (the filesystem's limit is 255), about 3,980 in all: the folders
  # can be created, but Orbax's files below them would pass the 4,096 characters of a path.
  too_long = str(tmp_path)
  while len(too_long) < 3780:
    too_long += '/' + 'd' * 199
  too_long += '/' + 'd' * (3979 - len(too_long))
  cases = {str(a_file): 'is a file, not a directory',
           str(a_file / 'run'): 'Cannot create the run directory',
           too_long: 'use a shorter --workdir path'}
  for workdir, expected in cases.items():
    with pytest.raises(WorkdirError, match=expected) as info:
      tiny.train(config, workdir)
    assert '\n' not in str(info.value)
  # The path is named (the long one by its end).
  assert too_long[-50:] in str(info.value)


# --------------------------------------------------------------------------------------------------
# Item 6: what the command line can get wrong is one line, before TensorFlow or JAX is set up.
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('args, expected', [
    (['--config=configs/digits_edm.py', '--config.training.lr=abc'],
     "--config.training.lr=abc: could not convert string to float: 'abc'"),
    (['--config=configs/nope.py'], "Config file 'configs/nope.py' does not exist"),
    (['--config=configs'], "Config file 'configs' is a directory"),
    (['--config=configs/digits_edm.py:nope'],
     'configs/digits_edm.py has no variants (its get_config takes no argument): use '
     '--config=configs/digits_edm.py without ":nope".'),
    (['--config=configs/digits_edm.py', '--config.training.nope=1'],
     "--config.training.nope: there is no 'nope' in training"),
], ids=['wrong_type', 'missing_file', 'directory', 'no_variants', 'unknown_field'])
def test_command_line_errors_are_one_line(args, expected, tmp_path):
  start = time.time()
  out = _launch(*args, f'--workdir={tmp_path / "run"}', timeout=120)
  assert out.returncode == 1
  assert _last_line(out.stderr).startswith('Config error: ')
  assert expected in _last_line(out.stderr)
  assert time.time() - start < 30  # Refused while parsing flags, before TF or JAX is set up.
  assert not (tmp_path / 'run').exists()


# --------------------------------------------------------------------------------------------------
# Item 7: the non-finite guard's advice, and degenerate noise settings before compiling.
# --------------------------------------------------------------------------------------------------
def _blown_up() -> dict:
  """fetch_metrics' metrics of steps 7, 8 and 9, the last two non-finite."""
  return {'loss': np.array([0.5, np.inf, np.nan]), 'finite': np.array([True, False, False])}


def test_the_non_finite_message_advises_only_what_works(tmp_path, digits_data_dir):
  workdir = str(tmp_path)
  config = tiny.edm_config(digits_data_dir)
  config.training.lr, config.training.grad_clip = 2e-3, 0.0
  with pytest.raises(NonFiniteLossError) as info:
    trainer.check_finite([7, 8, 9], _blown_up(), None, workdir, config)
  message = str(info.value)
  assert 'at step 8 (loss=inf)' in message and 'step None' not in message
  assert f'no checkpoint was saved yet in {workdir}' in message
  # A lower rate with allow_other_config (without it, the changed lr is refused); float32 is on
  # already; gradient clipping changes the optimizer state, so not on this workdir.
  assert ('Relaunch the same command with --config.training.lr=0.0002 '
          '--config.allow_other_config=True to start again with them.') in message
  assert 'model.dtype' not in message
  assert 'grad_clip=1.0) needs a new --workdir' in message
  config.training.grad_clip, config.model.dtype = 1.0, 'bfloat16'
  with pytest.raises(NonFiniteLossError) as info:
    trainer.check_finite([7, 8, 9], _blown_up(), 6, workdir, config)
  message = str(info.value)
  assert f'the last good checkpoint (step 6) is kept in {workdir}' in message
  assert ('--config.training.lr=0.0002 --config.model.dtype=float32 '
          '--config.allow_other_config=True to resume from step 6 with them.') in message
  assert 'grad_clip' not in message
  # The advised relaunch is accepted by the workdir check, which refuses it without the flag.
  config_utils.save_config(tiny.edm_config(digits_data_dir), workdir)
  advised = tiny.edm_config(digits_data_dir)
  advised.training.lr = 1e-4
  with pytest.raises(WorkdirError, match='allow_other_config=True'):
    config_utils.check_workdir(advised, workdir)
  advised.allow_other_config = True
  config_utils.check_workdir(advised, workdir)


@pytest.mark.parametrize('field, value', [('sigma_data', 0.0), ('rho', 0.0), ('sigma_data', -0.5),
                                          ('sigma_max', math.inf), ('noise_cond_scale', math.nan)])
def test_degenerate_noise_settings_are_refused_before_compiling(field, value, tmp_path,
                                                                no_training):
  config = tiny.edm_config('unused')
  config.noise[field] = value
  with pytest.raises(ConfigError, match=re.escape(f'{field}={value}')):
    tiny.train(config, str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()


# --------------------------------------------------------------------------------------------------
# Item 5: checked before anything is trained or written.
# --------------------------------------------------------------------------------------------------
def test_every_sampler_name_is_checked_before_anything_trains(tmp_path, no_training):
  workdir = tmp_path / 'run'
  for field, value in (('training.final_samplers', ('nope',)), ('sampling.sampler', 'nope'),
                       ('eval.samplers', ('heun', 'nope'))):
    config = tiny.edm_config('unused')
    block, name = field.split('.')
    config[block][name] = value
    with pytest.raises(ConfigError, match=f"^{field} has 'nope', which is not a sampler of edm"):
      tiny.train(config, str(workdir))
  # A distillation run checks them before training its teacher (never loaded here).
  config = tiny.cd_config('unused', '', steps=1)
  config.teacher.config = str(tmp_path / 'not_loaded_before_the_check.py')
  config.teacher.train_if_missing = True
  config.training.final_samplers = ('onestep', 'heun')
  with pytest.raises(ConfigError, match="^training.final_samplers has 'heun'"):
    tiny.train(config, str(workdir))
  assert not workdir.exists()


# --------------------------------------------------------------------------------------------------
# Items 2, 3 and 8 on a trained run.
# --------------------------------------------------------------------------------------------------
def _trained_config(data_dir: str):
  return tiny.constant_edm_config(data_dir, steps=6)


@pytest.fixture(scope='module')
def trained(tmp_path_factory, digits_data_dir) -> str:
  """A tiny EDM run of 6 steps with checkpoint_every=5 (its compiled step is shared with the
  teachers below)."""
  workdir = str(tmp_path_factory.mktemp('trained') / 'run')
  tiny.train(_trained_config(digits_data_dir), workdir)
  return workdir


def test_checkpoints_only_every_checkpoint_every_and_at_the_end(trained):
  assert _steps(os.path.join(trained, 'checkpoints')) == [5, 6]  # Not Orbax's extra first step.


def test_a_failed_launch_keeps_the_workdir_record(trained, tmp_path, digits_data_dir):
  workdir = str(tmp_path / 'run')
  shutil.copytree(trained, workdir)
  with open(os.path.join(workdir, 'config.json')) as f:
    record = f.read()
  other = _trained_config(digits_data_dir)
  other.model.nf, other.allow_other_config = 16, True  # Its state cannot restore these checkpoints.
  with pytest.raises(WorkdirError, match='No checkpoint in .* can be restored'):
    tiny.train(other, workdir)
  with open(os.path.join(workdir, 'config.json')) as f:
    assert f.read() == record
  assert tiny.train(_trained_config(digits_data_dir), workdir).step == 6  # The original command.
  assert not os.path.exists(rundir.lock_path(workdir))


def test_a_checkpoint_that_cannot_be_written_is_one_line_naming_the_folder(tmp_path):
  ckpt_dir = str(tmp_path / 'checkpoints')
  ckpt = checkpointing.Checkpointer(ckpt_dir, save_every=5)  # Asynchronous saves, as in training.
  state = {'params': {'w': jax.numpy.ones(3)}}
  ckpt.save(5, state, {'step': 5})
  ckpt.wait()
  shutil.rmtree(ckpt_dir)
  with open(ckpt_dir, 'w') as f:  # The folder is now a file: nothing can be written.
    f.write('x')
  start = time.time()
  with pytest.raises(WorkdirError, match=re.escape(f'Cannot write the checkpoint of step 10 into '
                                                   f'{ckpt_dir} (NotADirectoryError')) as info:
    try:
      ckpt.save(10, state, {'step': 10})
    finally:
      with contextlib.suppress(WorkdirError):
        ckpt.close()
  assert '\n' not in str(info.value)
  assert time.time() - start < 60  # Not Orbax's 5-minute wait for a directory never created.


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


def test_the_teacher_mismatch_error_suggests_a_command_that_works(tmp_path):
  tdir = str(tmp_path / 'teacher')
  os.makedirs(tdir)
  student = tiny.cd_config('unused', tdir)
  student.teacher.config = 'configs/digits_edm.py'
  student.model.nf, student.model.ch_mult = 16, (1, 2, 2)
  saved = tiny.edm_config('unused').to_dict()  # The teacher there: nf=8, ch_mult=(1, 2).
  with pytest.raises(TeacherError) as info:
    teacher.check_usable(student, teacher.TeacherRun(tdir, 4, saved))
  message = str(info.value)
  assert 'model.nf: teacher 8, student 16' in message
  command = shlex.split(message.split('`')[1])
  expected_dir = tdir + '_2'  # Not tdir: it holds the other teacher and would refuse the command.
  assert command[:4] == ['python', 'launch.py', '--config=configs/digits_edm.py',
                         f'--workdir={expected_dir}']
  assert f'then add --config.teacher.workdir={expected_dir} to this command' in message
  # The command's overrides exist, and turn the file's network (not only the saved teacher's) into
  # the student's.
  overrides = dict(a[len('--config.'):].split('=', 1) for a in command[4:])
  trains = config_utils.load_config_file('configs/digits_edm.py')
  config_utils.check_override_keys(trains, overrides)
  assert {'model.nf': '16', 'model.ch_mult': '(1, 2, 2)'}.items() <= overrides.items()
  for field, text in overrides.items():
    block, name = field.split('.')
    trains[block][name] = ast.literal_eval(text)
  teacher.check_fits(student, trains.to_dict(), expected_dir)


# --------------------------------------------------------------------------------------------------
# Item 4: the workdir lock.
# --------------------------------------------------------------------------------------------------
def _dead_pid() -> int:
  """The pid of a process that has exited (and been reaped)."""
  proc = subprocess.Popen(['true'])
  proc.wait()
  return proc.pid


def _hold_lock(workdir: str, host: str, pid: int) -> None:
  os.makedirs(workdir, exist_ok=True)
  with open(rundir.lock_path(workdir), 'w') as f:
    json.dump({'host': host, 'pid': pid, 'since': 'earlier'}, f)


def test_the_workdir_lock_refuses_a_live_launch_and_takes_over_a_dead_ones(tmp_path, caplog):
  workdir, host = str(tmp_path / 'run'), socket.gethostname()
  # A live process of this host, and any process of another host (it cannot be checked from here).
  for holder, pid in ((host, os.getppid()), ('another-host', _dead_pid())):
    _hold_lock(workdir, holder, pid)
    with pytest.raises(WorkdirError) as info:
      with rundir.locked(workdir):
        pytest.fail('entered a locked workdir')
    assert str(info.value) == (
        f'{workdir} is locked by another launch (pid {pid} on {holder}, since earlier): wait for '
        f'it to finish or stop it, or use another --workdir. If that launch is not running, remove '
        f'{rundir.lock_path(workdir)}.')
  # A lock of a process that is gone (kill -9) is taken over, held while the body runs, released.
  _hold_lock(workdir, host, _dead_pid())
  with caplog.at_level(logging.WARNING), rundir.locked(workdir):
    with open(rundir.lock_path(workdir)) as f:
      assert json.load(f)['pid'] == os.getpid()
    with pytest.raises(WorkdirError, match='already being trained by this process'):
      with rundir.locked(workdir):
        pass
  assert any('Taking over the stale lock' in r.getMessage() for r in caplog.records)
  assert not os.path.exists(rundir.lock_path(workdir))


# --------------------------------------------------------------------------------------------------
# Item 1: a preempted teacher stops the job; an unfinished teacher is refused.
# --------------------------------------------------------------------------------------------------
def _write_configs(tmp_path, data_dir: str, teacher_steps: int) -> str:
  """A CD config file whose teacher (a config file of `teacher_steps`) trains first."""
  teacher_config = tmp_path / 'teacher_config.py'
  teacher_config.write_text(textwrap.dedent(f'''
      from tests import tiny
      def get_config():
        return tiny.constant_edm_config({data_dir!r}, steps={teacher_steps})
  '''))
  cd_config = tmp_path / 'cd_config.py'
  # No distillation step: the student's state is created from the teacher, and nothing compiles.
  cd_config.write_text(textwrap.dedent(f'''
      from tests import tiny
      def get_config():
        config = tiny.cd_config({data_dir!r}, '', steps=0)
        config.teacher.config, config.teacher.train_if_missing = {str(teacher_config)!r}, True
        config.training.final_samplers = ()
        return config
  '''))
  return str(cd_config)


def test_a_preempted_teacher_stops_the_job_and_a_relaunch_finishes_it_first(trained, tmp_path,
                                                                           monkeypatch,
                                                                           digits_data_dir):
  # The teacher: the trained run (steps 5 and 6 saved) as a run of 8 steps.
  cd_config = _write_configs(tmp_path, digits_data_dir, teacher_steps=8)
  workdir = str(tmp_path / 'main')
  tdir = os.path.join(workdir, 'teacher')
  shutil.copytree(trained, tdir)
  config_utils.save_config(tiny.constant_edm_config(digits_data_dir, steps=8), tdir)
  with monkeypatch.context() as patch:  # A preemption notice at the teacher's step 7.
    patch.setattr(checkpointing.Checkpointer, 'reached_preemption', lambda self, step: step == 7)
    with pytest.raises(Preempted, match=f'while training the teacher in {tdir}: its checkpoint of '
                                        'step 7 is saved. Relaunch the same command'):
      train_mode.run(config_utils.load_config_file(cd_config), workdir)
  assert _steps(os.path.join(tdir, 'checkpoints')) == [5, 6, 7]
  # Nothing of the student: no state, no record, no lock.
  assert sorted(os.listdir(workdir)) == ['checkpoints', 'teacher']
  assert not os.listdir(os.path.join(workdir, 'checkpoints'))
  assert not os.path.exists(rundir.lock_path(tdir))
  # Not told to train it, the unfinished teacher is refused, saying how to go on.
  config = config_utils.load_config_file(cd_config)
  config.teacher.train_if_missing = False
  with pytest.raises(TeacherError, match='stopped at step 7 of its 8: finish it with .*'
                                         'allow_unfinished=True to distil it as it is'):
    tiny.train(config, workdir)
  config.teacher.allow_unfinished = True  # Told to, it is distilled as it is.
  teacher.check_finished(config, teacher.find(config, workdir))
  # The same command again finishes the teacher first, then the student starts from it.
  out = train_mode.run(config_utils.load_config_file(cd_config), workdir)
  assert _steps(os.path.join(tdir, 'checkpoints'))[-1] == 8
  teacher_params = out.frozen[methods.TEACHER]  # Read from the teacher's newest checkpoint.
  for a, b in zip(jax.tree.leaves(out.state.params), jax.tree.leaves(teacher_params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert os.path.exists(os.path.join(workdir, 'config.json'))


# --------------------------------------------------------------------------------------------------
# Items 1, 4 and 8 at the process level: the lock between two launches, and the preemption exit code.
# --------------------------------------------------------------------------------------------------
def _read(path: str) -> str:
  with open(path) as f:
    return f.read()


def _start(tmp_path, config: str, workdir: str) -> tuple[subprocess.Popen, str]:
  log = str(tmp_path / 'launch.log')
  with open(log, 'w') as f:
    proc = subprocess.Popen([sys.executable, 'launch.py', f'--config={config}',
                             f'--workdir={workdir}'], cwd=REPO, env=_env(), stdout=f,
                            stderr=subprocess.STDOUT)
  return proc, log


def _wait_for_a_checkpoint(ckpt_dir: str, proc: subprocess.Popen, log: str,
                           timeout: float = 300) -> None:
  """Until the first checkpoint is saved: the launch is then in its training loop."""
  deadline = time.time() + timeout
  while not _steps(ckpt_dir):
    if proc.poll() is not None or time.time() > deadline:
      proc.kill()
      pytest.fail(f'no checkpoint (exit {proc.poll()}):\n{_read(log)[-3000:]}')
    time.sleep(0.02)


@pytest.mark.slow
def test_a_second_launch_is_refused_and_a_preempted_teacher_exits_with_the_preemption_code(
    tmp_path, digits_data_dir, no_training):
  cd_config = _write_configs(tmp_path, digits_data_dir, teacher_steps=100_000)
  workdir = str(tmp_path / 'main')
  tdir = os.path.join(workdir, 'teacher')
  first, log = _start(tmp_path, cd_config, workdir)
  try:
    _wait_for_a_checkpoint(os.path.join(tdir, 'checkpoints'), first, log)
    first.send_signal(signal.SIGSTOP)  # Holds its locks, training the teacher, while we look.
    with open(rundir.lock_path(workdir)) as f:
      held = json.load(f)
    assert (held['pid'], held['host']) == (first.pid, socket.gethostname())
    # A second launch (this process) is refused, before compiling.
    with pytest.raises(WorkdirError, match=re.escape(
        f'{workdir} is locked by another launch (pid {first.pid} on {socket.gethostname()}')):
      train_mode.run(config_utils.load_config_file(cd_config), workdir)
    # SIGTERM while the teacher trains stops the whole job, with the preemption exit code.
    first.send_signal(signal.SIGTERM)
    first.send_signal(signal.SIGCONT)
    assert first.wait(timeout=300) == PREEMPTED_EXIT_CODE, _read(log)[-3000:]
  finally:
    if first.poll() is None:
      first.kill()
  assert 'Traceback' not in _read(log), _read(log)[-3000:]
  assert _read(log).strip().splitlines()[-1].startswith('Preemption notice while training the '
                                                        f'teacher in {tdir}: its checkpoint of step')
  assert 5 <= _steps(os.path.join(tdir, 'checkpoints'))[-1] < 100_000
  assert not _steps(os.path.join(workdir, 'checkpoints'))  # No distillation of that teacher.
  assert not os.path.exists(rundir.lock_path(workdir)) and not os.path.exists(rundir.lock_path(tdir))


@pytest.mark.slow
def test_a_preempted_run_exits_with_the_preemption_code(tmp_path, digits_data_dir):
  config = tmp_path / 'config.py'
  config.write_text(textwrap.dedent(f'''
      from tests import tiny
      def get_config():
        return tiny.constant_edm_config({digits_data_dir!r}, steps=100_000)
  '''))
  workdir = str(tmp_path / 'run')
  proc, log = _start(tmp_path, str(config), workdir)
  try:
    _wait_for_a_checkpoint(os.path.join(workdir, 'checkpoints'), proc, log)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == PREEMPTED_EXIT_CODE, _read(log)[-3000:]  # Not 0: not finished.
  finally:
    if proc.poll() is None:
      proc.kill()
  step = _steps(os.path.join(workdir, 'checkpoints'))[-1]
  assert 5 < step < 100_000  # Saved where it stopped, not only at the periodic step.
  assert _last_line(_read(log)) == (f'Preemption notice: the checkpoint of step {step} is saved in '
                                    f'{workdir}. Relaunch the same command to resume.')

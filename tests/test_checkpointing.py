"""Crash safety: a save killed half-way, a damaged newest checkpoint, SIGTERM as a preemption notice.

Runs train `distributed_worker.make_config` (tiny digits EDM) on one CPU device, where training is
deterministic: a resumed run must give exactly the losses of an uninterrupted one.
"""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from cm_jax import checkpointing, experiment
from cm_jax.errors import WorkdirError
from tests import distributed_worker, tiny

REPO = distributed_worker.REPO
STEPS = 20
TMP_MARK = '.orbax-checkpoint-tmp'  # Orbax's name for a step it has not finished writing.


def losses(out) -> dict[int, float]:
  return {int(s): float(loss) for s, loss in out.losses}


def finalized_steps(workdir: str) -> list[int]:
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  return sorted(int(n) for n in os.listdir(ckpt_dir) if n.isdigit()) if os.path.isdir(ckpt_dir) else []


def unfinished_saves(workdir: str) -> list[str]:
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  return [n for n in os.listdir(ckpt_dir) if TMP_MARK in n] if os.path.isdir(ckpt_dir) else []


@pytest.fixture(scope='module')
def baseline(one_device_run):
  """20 uninterrupted steps with checkpoints at 10 and 20 (conftest's, shared with test_distributed)."""
  assert finalized_steps(one_device_run['workdir'])[-2:] == [10, 20]
  assert sorted(one_device_run['losses']) == list(range(STEPS))
  return one_device_run


def _truncate_arrays(step_dir: str) -> None:
  for root, _, files in os.walk(os.path.join(step_dir, 'params')):
    if os.sep + 'd' in root:  # OCDBT data files hold the array bytes.
      for name in files:
        path = os.path.join(root, name)
        with open(path, 'r+b') as f:
          f.truncate(os.path.getsize(path) // 2)


def _delete_item(step_dir: str) -> None:
  shutil.rmtree(os.path.join(step_dir, 'opt_state'))


# After a failed read, a TensorStore callback of Orbax's may find Orbax's event loop closed: noise.
@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
@pytest.mark.parametrize('damage', [_truncate_arrays, _delete_item], ids=['truncated', 'missing'])
def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(damage, baseline, tmp_path,
                                                                  digits_data_dir, caplog):
  workdir = str(tmp_path / 'run')
  shutil.copytree(baseline['workdir'], workdir)
  damage(os.path.join(workdir, 'checkpoints', '20'))
  with caplog.at_level(logging.WARNING):
    out = tiny.train(distributed_worker.make_config(digits_data_dir, STEPS), workdir)
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert any('Checkpoint at step 20' in w and 'cannot be restored' in w for w in warnings), warnings
  # Resumed from step 10, with exactly the uninterrupted run's losses, and saved step 20 anew.
  assert losses(out) == {s: baseline['losses'][s] for s in range(10, STEPS)}
  assert finalized_steps(workdir)[-1] == 20
  # The damaged step is kept for inspection, out of the way of the run.
  aside = os.listdir(os.path.join(workdir, 'checkpoints.unreadable'))
  assert len(aside) == 1 and aside[0].startswith('20-')


def test_no_restorable_checkpoint_is_an_error_not_a_fresh_start(baseline, tmp_path,
                                                                digits_data_dir):
  workdir = str(tmp_path / 'run')
  shutil.copytree(baseline['workdir'], workdir)
  config = distributed_worker.make_config(digits_data_dir, STEPS)
  config.model.nf, config.allow_other_config = 16, True  # Another model: no step fits it.
  with pytest.raises(WorkdirError, match='No checkpoint in .* can be restored'):
    tiny.train(config, workdir)
  assert finalized_steps(workdir)[-2:] == [10, 20]  # Nothing moved or deleted.
  assert not os.path.exists(os.path.join(workdir, 'checkpoints.unreadable'))


def test_checkpointer_restores_onto_the_shardings_asked_for(baseline):
  """Read-only restore of single items (as sampling and teachers do), placed as requested."""
  config = distributed_worker.make_config('', STEPS)
  exp = experiment.build(config, baseline['workdir'])
  ckpt = checkpointing.Checkpointer(os.path.join(baseline['workdir'], 'checkpoints'),
                                    read_only=True)
  abstract = checkpointing.with_shardings(exp.abstract_state, exp.state_shardings)
  step, items, meta = ckpt.restore_latest({'params': abstract.params})
  ckpt.close()
  assert step == 20 and meta['step'] == 20
  for leaf, want in zip(jax.tree.leaves(items['params']), jax.tree.leaves(exp.state_shardings.params)):
    assert leaf.sharding == want


def _start_worker(data_dir: str, workdir: str, out: str, steps: int,
                  checkpoint_every: int) -> subprocess.Popen:
  env = dict(os.environ)
  env.pop('XLA_FLAGS', None)
  if jax.config.jax_compilation_cache_dir:
    env['CM_JAX_TEST_XLA_CACHE'] = jax.config.jax_compilation_cache_dir
  args = [sys.executable, '-m', 'tests.distributed_worker', '--devices=1', f'--data_dir={data_dir}',
          f'--workdir={workdir}', f'--out={out}', f'--steps={steps}',
          f'--checkpoint_every={checkpoint_every}']
  log = open(out + '.log', 'w')  # pylint: disable=consider-using-with
  return subprocess.Popen(args, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


def _tail(out: str) -> str:
  with open(out + '.log') as f:
    return f.read()[-3000:]


@pytest.mark.slow
def test_run_killed_mid_save_resumes_from_the_previous_good_step(baseline, tmp_path,
                                                                 digits_data_dir):
  workdir, out = str(tmp_path / 'run'), str(tmp_path / 'out.json')
  # A save every step (async): the process spends most of its time with a save in flight.
  for _ in range(3):  # The save may finish between seeing it and the kill landing: try again.
    proc = _start_worker(digits_data_dir, workdir, out, steps=200, checkpoint_every=1)
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:
      if len(finalized_steps(workdir)) >= 2 and unfinished_saves(workdir):
        proc.send_signal(signal.SIGKILL)
        break
      time.sleep(0.002)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, _tail(out)
    if unfinished_saves(workdir):
      break
  partial = unfinished_saves(workdir)
  assert partial, 'no save was in progress at any of the kills'
  good = finalized_steps(workdir)[-1]
  assert good < STEPS - 1
  assert all(int(name.split('.')[0]) > good for name in partial)
  # Relaunch (the same command, here in-process): resumes at the newest complete step and matches
  # the uninterrupted run step for step.
  config = distributed_worker.make_config(digits_data_dir, STEPS, checkpoint_every=1)
  resumed = tiny.train(config, workdir)
  assert losses(resumed) == {s: baseline['losses'][s] for s in range(good, STEPS)}
  assert finalized_steps(workdir)[-1] == STEPS
  assert not unfinished_saves(workdir)  # The stale temporary directory was cleaned up.


@pytest.mark.slow
def test_sigterm_saves_at_the_next_step_and_exits_cleanly(tmp_path, digits_data_dir):
  workdir, out = str(tmp_path / 'run'), str(tmp_path / 'out.json')
  proc = _start_worker(digits_data_dir, workdir, out, steps=100_000, checkpoint_every=5)
  deadline = time.time() + 300
  # A first checkpoint (step 5): then the loop is running.
  while proc.poll() is None and not finalized_steps(workdir) and time.time() < deadline:
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=120) == 0, _tail(out)
  with open(out) as f:
    result, = json.load(f)
  assert result['preempted'] and 1 < result['step'] < 100_000
  assert finalized_steps(workdir)[-1] == result['step']  # Saved where it stopped.
  assert max(s for s, _ in result['losses']) == result['step'] - 1  # Checked before saving.
  assert np.isfinite([loss for _, loss in result['losses']]).all()

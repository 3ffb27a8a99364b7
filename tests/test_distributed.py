"""Scale-out on CPU: 1 device, 8 fake devices, FSDP and 2 processes give the same training run.

Multi-device runs are subprocesses (`tests/distributed_worker.py`): the number of fake CPU devices is
fixed when jax is imported. All runs train `distributed_worker.make_config` (tiny digits EDM, dropout
0.1, a constant learning rate) for 20 steps from seed 0 on the same global batches; the 2-process
run trains the first 10 (step k's loss does not depend on how many steps a run was asked for).

Tolerance: RTOL on each step's loss. The runs differ only in how float32 sums are split over devices
(the batch mean of the loss, the cross-device gradient all-reduce, and on FSDP the gathered weights):
each reordering moves a result by about one float32 ulp (6e-8 relative), and Adam passes such
differences on to the next steps without amplifying them much in 20 steps. Measured maxima over the
20 steps: 2.2e-7 relative for 8 devices vs 1, 8.1e-8 for FSDP vs data parallel on 8, 1.8e-7 for
2 processes x 4 vs 1. RTOL = 2e-5 is ~100x that and still far below what a real fault produces: another
batch or noise draw moves a step's loss by tens of percent (consecutive steps' losses differ by 10-40%),
and bfloat16 compute alone by up to 4e-4.
"""

import json
import os
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from cm_jax import experiment, sharding, trainer
from cm_jax.errors import ConfigError
from tests import distributed_worker, tiny

REPO = distributed_worker.REPO
RTOL = 2e-5
STEPS = 20
HALF = 10  # The reference's first checkpoint, where the 2-process run stops.


def worker_env() -> dict:
  env = dict(os.environ)
  env.pop('XLA_FLAGS', None)
  # The subprocesses share this session's persistent compile cache.
  cache = jax.config.jax_compilation_cache_dir
  if cache:
    env['CM_JAX_TEST_XLA_CACHE'] = cache
  return env


def run_worker(data_dir: str, workdirs, out: str, devices: int, fsdps=(1,), timeout: int = 400,
               **flags) -> list[dict]:
  """One worker process training `workdirs` in turn (mesh.fsdp from `fsdps`); one summary each."""
  args = [sys.executable, '-m', 'tests.distributed_worker', f'--devices={devices}',
          f'--data_dir={data_dir}', f'--out={out}', f'--steps={STEPS}']
  args += [f'--workdir={w}' for w in workdirs] + [f'--fsdp={f}' for f in fsdps]
  args += [f'--{k}={v}' for k, v in flags.items()]
  proc = subprocess.run(args, cwd=REPO, env=worker_env(), capture_output=True, text=True,
                        timeout=timeout)
  assert proc.returncode == 0, proc.stderr[-4000:]
  with open(out) as f:
    return json.load(f)


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def losses(summary_or_out) -> dict[int, float]:
  pairs = (summary_or_out['losses'] if isinstance(summary_or_out, dict) else summary_or_out.losses)
  return {int(s): float(loss) for s, loss in pairs}


def assert_same_losses(got: dict, want: dict, steps) -> None:
  steps = list(steps)
  assert sorted(got) == steps
  np.testing.assert_allclose([got[s] for s in steps], [want[s] for s in steps], rtol=RTOL, atol=0)


def copy_run_at(workdir: str, step: int, target: str) -> str:
  """A copy of a run's workdir that holds only its checkpoints up to `step`, as if it stopped there."""
  shutil.copytree(workdir, target)
  ckpt_dir = os.path.join(target, 'checkpoints')
  for name in os.listdir(ckpt_dir):
    if name.isdigit() and int(name) > step:
      shutil.rmtree(os.path.join(ckpt_dir, name))
  return target


@pytest.fixture(scope='module')
def baseline(one_device_run):
  """The reference: 20 steps on the test process's single CPU device, checkpoints at 10 and 20
  (conftest's, shared with test_checkpointing)."""
  assert sorted(one_device_run['losses']) == list(range(STEPS))
  return one_device_run


@pytest.fixture(scope='module')
def eight(tmp_path_factory, digits_data_dir, baseline):
  """8 fake devices in one process: a fresh data-parallel run, the 1-device run resumed from its
  step 10, and a fresh run on a (data 2, fsdp 4) mesh."""
  root = tmp_path_factory.mktemp('eight_devices')
  resumed = copy_run_at(baseline['workdir'], 10, str(root / 'from_one_device'))
  # The tiny model's leaves are below FSDP_MIN_SIZE: shard every leaf that divides, so that the
  # FSDP run has sharded params, Adam moments and EMA, not a replicated model.
  fresh, from_one, fsdp = run_worker(
      digits_data_dir, [str(root / 'run'), resumed, str(root / 'fsdp')], str(root / 'out.json'),
      devices=8, fsdps=(1, 1, 4), fsdp_min_size=1)
  return {'fresh': fresh, 'from_one': from_one, 'fsdp': fsdp, 'workdir': str(root / 'run')}


def test_eight_devices_give_the_losses_of_one(eight, baseline):
  assert eight['fresh']['mesh'] == {'data': 8, 'fsdp': 1}
  assert_same_losses(losses(eight['fresh']), baseline['losses'], range(STEPS))


def test_one_device_checkpoint_resumes_on_eight(eight, baseline):
  assert_same_losses(losses(eight['from_one']), baseline['losses'], range(10, STEPS))


def test_eight_device_checkpoint_resumes_on_one(eight, baseline, tmp_path, digits_data_dir):
  workdir = copy_run_at(eight['workdir'], 10, str(tmp_path / 'run'))
  out = tiny.train(distributed_worker.make_config(digits_data_dir, STEPS), workdir)
  assert_same_losses(losses(out), baseline['losses'], range(10, STEPS))
  assert_same_losses(losses(out), losses(eight['fresh']), range(10, STEPS))
  # Weights agree to 1% of one Adam step (lr = 2e-3): where a gradient is ~0, Adam's m / sqrt(v)
  # turns ulp-level differences into ~1e-6 absolute ones, so a relative bound alone would not do.
  for got, want in zip(jax.tree.leaves(out.state.params), baseline['params']):
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=2e-5)


def test_fsdp_gives_the_losses_of_data_parallel(eight):
  fsdp = eight['fsdp']
  assert fsdp['mesh'] == {'data': 2, 'fsdp': 4}
  for item in ('params', 'opt_state', 'ema_params'):
    layout = fsdp[item]
    assert layout['sharded'] >= layout['leaves'] // 2, (item, layout)
    # Created and kept sharded: no device holds more than its quarter of a sharded leaf.
    assert layout['max_device_fraction_of_sharded'] == 0.25, (item, layout)
    assert layout['dtypes'] == ['float32']
  assert eight['fresh']['params']['sharded'] == 0  # Pure data parallel: all replicated.
  assert_same_losses(losses(fsdp), losses(eight['fresh']), range(STEPS))


@pytest.mark.slow
def test_two_processes_of_four_devices_give_the_losses_of_one(baseline, tmp_path, digits_data_dir):
  port, out = free_port(), str(tmp_path / 'out.json')
  workdir = str(tmp_path / 'run')
  procs = []
  for process_id in range(2):
    args = [sys.executable, '-m', 'tests.distributed_worker', '--devices=4', '--num_processes=2',
            f'--process_id={process_id}', f'--port={port}', f'--data_dir={digits_data_dir}',
            f'--workdir={workdir}', f'--out={out}', f'--steps={HALF}']
    procs.append(subprocess.Popen(args, cwd=REPO, env=worker_env(), stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True))
  try:
    logs = [p.communicate(timeout=500)[0] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  assert [p.returncode for p in procs] == [0, 0], '\n'.join(log[-3000:] for log in logs)
  with open(out) as f:
    two, = json.load(f)
  assert (two['processes'], two['devices'], two['mesh']) == (2, 8, {'data': 8, 'fsdp': 1})
  assert_same_losses(losses(two), baseline['losses'], range(HALF))
  # Only process 0 writes: one events file, one config.json; the checkpoints are shared.
  events = [n for n in os.listdir(workdir) if n.startswith('events.out.tfevents')]
  assert len(events) == 1 and os.path.exists(os.path.join(workdir, 'config.json'))
  assert sorted(int(n) for n in os.listdir(os.path.join(workdir, 'checkpoints')) if n.isdigit())[-1] == HALF


def test_bfloat16_compute_trains_with_float32_state(baseline, tmp_path, digits_data_dir):
  config = distributed_worker.make_config(digits_data_dir, STEPS, dtype='bfloat16')
  exp = experiment.build(config, str(tmp_path / 'run'))
  # The step really computes in bfloat16 (the convolutions), with float32 inputs and state.
  batch = {'image': jax.ShapeDtypeStruct((16, 8, 8, 1), np.float32),
           'label': jax.ShapeDtypeStruct((16,), np.int32)}
  hlo = trainer.make_train_step(exp, {}).lower(exp.abstract_state, {}, batch,
                                             jax.ShapeDtypeStruct((), np.int32)).as_text()
  assert 'bf16' in hlo and 'convolution' in hlo
  out = tiny.train(config, str(tmp_path / 'run'))
  state = out.state
  for tree in (state.params, state.opt_state, state.ema_params):
    assert {str(x.dtype) for x in jax.tree.leaves(tree) if x.ndim} == {'float32'}
  got = losses(out)
  want = baseline['losses']
  assert all(np.isfinite(v) for v in got.values())
  # Same data, noise and dropout as the float32 run: bfloat16 rounding moves the losses (measured:
  # at most 4e-4 relative), but not by nothing (that would mean float32 compute).
  rel = np.array([abs(got[s] - want[s]) / want[s] for s in range(STEPS)])
  assert 1e-5 < rel.max() < 5e-3, rel
  assert np.mean([got[s] for s in range(15, 20)]) < 0.9 * np.mean([got[s] for s in range(5)])


# ---- Multi-process set-up and errors before compiling. ----
def test_device_grid_keeps_fsdp_groups_inside_a_slice():
  import dataclasses  # pylint: disable=g-import-not-at-top

  @dataclasses.dataclass(frozen=True)
  class FakeDevice:  # What mesh_utils reads of a device: two slices (or hosts) of 4 chips.
    id: int
    slice_index: int
    process_index: int
    coords: tuple
    core_on_chip: int = 0
    platform: str = 'tpu'
    device_kind: str = 'TPU v4'

  ids = np.vectorize(lambda d: d.id)
  slice_of = np.vectorize(lambda d: d.slice_index)
  two_slices = [FakeDevice(i, i // 4, i // 4, (i % 2, i % 4 // 2, 0)) for i in range(8)]
  grid = sharding.device_grid(two_slices, 4, 2)
  assert grid.shape == (4, 2) and sorted(ids(grid).ravel()) == list(range(8))
  # Each fsdp group (a row) sits in one slice; the data axis crosses the slices.
  assert all(len(set(row)) == 1 for row in slice_of(grid)) and set(slice_of(grid)[:, 0]) == {0, 1}
  with pytest.raises(ConfigError, match='multiple of the 2 TPU slices'):
    sharding.device_grid(two_slices, 1, 8)
  # Not TPUs (e.g. GPU nodes, which may report a slice_index too): jax.devices() order, any shape.
  gpus = [dataclasses.replace(d, platform='gpu', device_kind='H100') for d in two_slices]
  np.testing.assert_array_equal(ids(sharding.device_grid(gpus, 1, 8)), np.arange(8).reshape(1, 8))
  np.testing.assert_array_equal(ids(sharding.device_grid(gpus, 2, 4)), np.arange(8).reshape(2, 4))


def test_initialize_distributed_needs_complete_flags_outside_a_cluster(monkeypatch):
  for var in ('SLURM_JOB_ID', 'TPU_WORKER_HOSTNAMES', 'MEGASCALE_COORDINATOR_ADDRESS',
              'TPU_PROCESS_ADDRESSES', 'OMPI_MCA_orte_hnp_uri'):
    monkeypatch.delenv(var, raising=False)
  assert sharding.detected_cluster() is None
  assert not sharding.initialize_distributed('auto')  # A plain host: one process, nothing to do.
  assert not sharding.initialize_distributed('off')
  with pytest.raises(ConfigError, match='--num_processes=N and --process_id=i'):
    sharding.initialize_distributed('auto', 'localhost:1234')
  with pytest.raises(ConfigError, match=r'--process_id=2 must be in \[0, --num_processes=2\)'):
    sharding.initialize_distributed('on', 'localhost:1234', 2, 2)
  with pytest.raises(ConfigError, match='contradicts'):
    sharding.initialize_distributed('off', 'localhost:1234', 2, 0)
  # SLURM: only inside `srun` with several tasks (a shell in an allocation runs one process).
  slurm = {'SLURM_JOB_ID': '7', 'SLURM_STEP_NODELIST': 'node[1-2]', 'SLURM_PROCID': '0',
           'SLURM_LOCALID': '0'}
  for var, value in slurm.items():
    monkeypatch.setenv(var, value)
  monkeypatch.setenv('SLURM_NTASKS', '1')
  assert sharding.detected_cluster() is None
  monkeypatch.setenv('SLURM_NTASKS', '16')
  assert sharding.detected_cluster() == 'SLURM'


def _launch(*args, devices: int = 1):
  env = worker_env()
  env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}'
  env['JAX_PLATFORMS'] = 'cpu'
  return subprocess.run([sys.executable, 'launch.py', *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=180)


def test_launch_rejects_a_batch_that_does_not_divide_before_compiling(tmp_path, digits_data_dir):
  common = ['--config=configs/digits_edm.py', f'--workdir={tmp_path}',
            f'--config.data.data_dir={digits_data_dir}']
  bad_batch = _launch(*common, '--config.training.batch_size=12', devices=8)
  assert bad_batch.returncode != 0
  assert 'training.batch_size=12 does not divide over 8 devices' in bad_batch.stderr
  assert 'use a multiple of 8 (e.g. 8 or 16)' in bad_batch.stderr
  assert 'Traceback' not in bad_batch.stderr
  assert not os.path.exists(tmp_path / 'checkpoints')


@pytest.mark.slow
def test_a_run_samples_on_a_device_count_its_training_batch_does_not_divide(tmp_path,
                                                                           digits_data_dir):
  from configs import digits_edm  # pylint: disable=g-import-not-at-top
  from cm_jax.modes import train as train_mode  # pylint: disable=g-import-not-at-top
  # A one-level network without attention (tests/tiny.py's): what is tested is where the batches go.
  overrides = {'data.data_dir': digits_data_dir, 'training.batch_size': 12,
               'training.num_steps': 2, 'model.nf': 8, 'model.ch_mult': (1,),
               'model.attn_resolutions': (), 'sampling.num_steps': 3, 'sampling.num_samples': 10,
               'sampling.batch_size': 10}
  # Trained here, on this process's one device (launch.py's train mode is tested in
  # test_reliability); its final samples are written as by a launch.
  config = digits_edm.get_config()
  for key, value in overrides.items():
    section, field = key.split('.')
    config[section][field] = value
  train_mode.run(config, str(tmp_path))
  with np.load(tmp_path / 'samples' / 'heun_nfe5' / 'samples_10x8x8x1.npz') as npz:
    on_one = npz['arr_0']
  # 12 does not divide over 8 devices: only training needs it to; sampling pads its own batches.
  # The same overrides on the command line: a config that differed from the run's would be refused.
  sampled = _launch('--config=configs/digits_edm.py', f'--workdir={tmp_path}', '--mode=sample',
                    *[f'--config.{key}={value}' for key, value in overrides.items()], devices=8)
  assert sampled.returncode == 0, sampled.stderr[-3000:]
  with np.load(tmp_path / 'samples' / 'heun_nfe5' / 'samples_10x8x8x1.npz') as npz:
    np.testing.assert_array_equal(npz['arr_0'], on_one)

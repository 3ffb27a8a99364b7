"""CD and CT runs end to end on tiny models: teacher handling, target network, curriculum resume."""

import json
import os
import textwrap

import jax
import numpy as np
import pytest

from cm_jax import checkpointing
from cm_jax.modes import train as train_mode
from cm_jax.errors import TeacherError, WorkdirError
from tests import tiny


@pytest.fixture(scope='module')
def teacher_dir(tmp_path_factory, digits_data_dir):
  workdir = str(tmp_path_factory.mktemp('teacher'))
  tiny.train(tiny.edm_config(digits_data_dir, steps=2), workdir)
  return workdir


def _leaves_equal(a, b) -> bool:
  return all(np.array_equal(np.asarray(x), np.asarray(y))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _teacher_ema(teacher_dir, exp):
  ckpt = checkpointing.Checkpointer(os.path.join(teacher_dir, 'checkpoints'), read_only=True)
  abstract = checkpointing.with_shardings(exp.abstract_state, exp.state_shardings)
  items = ckpt.restore_items(ckpt.latest_step(), {'ema_params': abstract.ema_params})
  ckpt.close()
  return items['ema_params'][0]


def test_missing_teacher_says_which_run_to_train(tmp_path, digits_data_dir):
  config = tiny.cd_config(digits_data_dir, str(tmp_path / 'no_teacher'))
  with pytest.raises(TeacherError, match='launch.py --config=configs/digits_edm.py'):
    tiny.train(config, str(tmp_path / 'cd'))
  assert not os.path.exists(tmp_path / 'cd' / 'checkpoints')


def test_teacher_of_another_architecture_is_refused(tmp_path, digits_data_dir, teacher_dir):
  config = tiny.cd_config(digits_data_dir, teacher_dir)
  config.model.nf = 16
  with pytest.raises(TeacherError, match='model.nf: teacher 8, student 16'):
    tiny.train(config, str(tmp_path / 'cd'))
  assert not os.path.exists(tmp_path / 'cd' / 'checkpoints')


def test_cd_starts_from_teacher_never_changes_it_and_tracks_target(tmp_path, digits_data_dir,
                                                                   teacher_dir):
  start = tiny.train(tiny.cd_config(digits_data_dir, teacher_dir, steps=0),
                                   str(tmp_path / 'cd0'))
  teacher = _teacher_ema(teacher_dir, start.exp)
  assert _leaves_equal(start.state.params, teacher)  # The student starts as the teacher.
  config = tiny.cd_config(digits_data_dir, teacher_dir, steps=3)
  config.training.final_samplers = ('onestep', 'multistep', 'teacher_heun')
  out = train_mode.run(config, str(tmp_path / 'cd'))
  assert _leaves_equal(out.frozen['teacher_params'], teacher)  # Frozen through training.
  assert _leaves_equal(_teacher_ema(teacher_dir, out.exp), teacher)  # And on disk.
  assert not _leaves_equal(out.state.params, teacher)
  # mu = 0: the target network equals the online one after every step.
  assert _leaves_equal(out.state.extra['target_params'], out.state.params)
  assert set(out.samples) == {'onestep', 'multistep', 'teacher_heun'}
  assert (out.samples['onestep']['nfe'], out.samples['multistep']['nfe']) == (1, 2)
  assert out.samples['teacher_heun']['nfe'] == 5


# The phases of a train-mode call, in the order they first start (cm_jax.phases).
_RUN_PHASES = ('state restore or init', 'train step compile', 'training loop', 'metric setup')


def _phases_of(workdir) -> dict:
  with open(workdir / 'phases.json') as f:
    return json.load(f)


def test_cd_trains_the_teacher_first_when_asked(tmp_path, digits_data_dir, capsys):
  teacher_config = tmp_path / 'teacher_config.py'
  teacher_config.write_text(textwrap.dedent(f'''
      from tests import tiny
      def get_config():
        return tiny.edm_config({digits_data_dir!r}, steps=2)
  '''))
  config = tiny.cd_config(digits_data_dir, '', steps=1)
  config.teacher.config, config.teacher.train_if_missing = str(teacher_config), True
  config.training.final_samplers = ('onestep',)
  config.training.lr_decay = 'constant'  # So the student may be extended below (a cosine one may not).
  workdir = tmp_path / 'main'
  train_mode.run(config, str(workdir))
  assert os.path.isdir(workdir / 'teacher' / 'checkpoints' / '2')
  assert os.path.exists(workdir / 'teacher' / 'samples' / 'heun_nfe5' / 'samples_16x8x8x1.npz')
  assert os.path.isdir(workdir / 'checkpoints' / '1')
  _check_phases_of_the_whole_job(workdir, capsys.readouterr().out)
  # A finished teacher is reused, not retrained: relaunching only extends the student.
  mtime = os.path.getmtime(workdir / 'teacher' / 'config.json')
  config.training.num_steps = 2
  train_mode.run(config, str(workdir))
  assert os.path.getmtime(workdir / 'teacher' / 'config.json') == mtime
  assert os.path.isdir(workdir / 'checkpoints' / '2')
  # The relaunch's table holds only its own work: the teacher's phases are not carried over.
  relaunch = _phases_of(workdir)
  assert [p['name'] for p in relaunch['phases']] == [
      'experiment build', 'dataset preparation', 'frozen inputs load', *_RUN_PHASES,
      'onestep: sampling', 'onestep: metric', 'onestep: writing outputs']
  assert {p['name']: p.get('steps') for p in relaunch['phases']}['training loop'] == 1
  assert not relaunch['scopes']


def _check_phases_of_the_whole_job(workdir, printed: str) -> None:
  """One table for the job: the teacher's phases under `teacher:`, none of their own elsewhere."""
  record = _phases_of(workdir)
  teacher = ['experiment build', 'dataset preparation', 'frozen inputs load', *_RUN_PHASES,
             'heun: sampling', 'heun: metric', 'heun: writing outputs']
  assert [p['name'] for p in record['phases']] == [
      'experiment build', 'dataset preparation', *[f'teacher: {name}' for name in teacher],
      'frozen inputs load', *_RUN_PHASES, 'onestep: sampling', 'onestep: metric',
      'onestep: writing outputs']
  loops = {p['name']: p for p in record['phases'] if p['name'].endswith('training loop')}
  assert loops['teacher: training loop']['steps'] == 2 and loops['training loop']['steps'] == 1
  total, walls = record['total']['wall_s'], [p['wall_s'] for p in record['phases']]
  assert min(walls) >= 0 and sum(walls) <= total
  assert sum(walls) + record['other']['wall_s'] == pytest.approx(total)
  [scope] = record['scopes']
  teacher_rows = sum(p['wall_s'] for p in record['phases'] if p['name'].startswith('teacher: '))
  assert scope['name'] == 'teacher' and teacher_rows <= scope['wall_s'] <= total
  assert not os.path.exists(workdir / 'teacher' / 'phases.json')  # The teacher joined the job.
  assert printed.count('Where the time went') == 1
  assert '| teacher: training loop (2 steps' in printed


def _ct_config(data_dir, steps):
  config = tiny.shrink(__import__('configs.digits_ict', fromlist=['x']).get_config(), data_dir,
                       steps)
  config.training.num_steps = steps
  # A short curriculum so N changes within the run: K' = floor(6 / (log2(4) + 1)) = 2 steps.
  config.consistency.start_scales, config.consistency.end_scales = 2, 8
  config.model.dropout = 0.1
  return config


def test_ict_preempted_run_continues_the_curriculum(tmp_path, digits_data_dir, monkeypatch):
  """N(k) depends on the total step count K, so a resumed run must keep K and its step."""
  full = tiny.train(_ct_config(digits_data_dir, 6), str(tmp_path / 'a'))
  with monkeypatch.context() as patch:  # A preemption notice at step 3: save and stop there.
    patch.setattr(checkpointing.Checkpointer, 'reached_preemption', lambda self, step: step == 3)
    first = tiny.train(_ct_config(digits_data_dir, 6), str(tmp_path / 'b'))
  assert first.preempted and first.step == 3
  resumed = tiny.train(_ct_config(digits_data_dir, 6), str(tmp_path / 'b'))
  assert dict(first.losses + resumed.losses) == dict(full.losses)
  assert _leaves_equal(full.state.items(), resumed.state.items())  # EMA, optimizer, target too.
  # CT starts from random weights, and with mu = 0 (iCT) the target is the online network.
  assert _leaves_equal(full.state.extra['target_params'], full.state.params)
  # Changing K mid-run would change the curriculum of the remaining steps: refused.
  with pytest.raises(WorkdirError, match='training.num_steps'):
    tiny.train(_ct_config(digits_data_dir, 8), str(tmp_path / 'b'))


def _target_ema_runs(data_dir, teacher_dir):
  """CT with the CIFAR-10 paper run's mu(k) (mu0 = 0.9, N(k) from s0 = 2) and CD with ImageNet-64's
  fixed mu = 0.95, at tiny size."""
  ct = tiny.shrink(__import__('configs.cifar10_ct', fromlist=['x']).get_config('l2'), data_dir, 4)
  ct.data, ct.model = tiny.edm_config(data_dir).data, tiny.edm_config(data_dir).model
  ct.training.batch_size, ct.training.grad_clip = 16, 1.0
  ct.consistency.end_scales = 10
  ct.sampling.ts = (0, 5, 10)  # On the final N = 11 grid.
  cd = tiny.cd_config(data_dir, teacher_dir, steps=4)
  cd.consistency.target_ema = 0.95
  return {'ct': ct, 'cd': cd}


@pytest.mark.parametrize('name', ['ct', 'cd'])
def test_a_target_network_with_mu_above_zero_trails_and_resumes(tmp_path, digits_data_dir,
                                                                 teacher_dir, monkeypatch, name):
  config = lambda: _target_ema_runs(digits_data_dir, teacher_dir)[name]
  full = tiny.train(config(), str(tmp_path / 'a'))
  with monkeypatch.context() as patch:
    patch.setattr(checkpointing.Checkpointer, 'reached_preemption', lambda self, step: step == 2)
    first = tiny.train(config(), str(tmp_path / 'b'))
  resumed = tiny.train(config(), str(tmp_path / 'b'))
  assert first.step == 2 and dict(first.losses + resumed.losses) == dict(full.losses)
  assert _leaves_equal(full.state.items(), resumed.state.items())  # The target network included.
  assert not _leaves_equal(full.state.extra['target_params'], full.state.params)  # It trails.


@pytest.mark.parametrize('name', ['ct', 'cd'])
def test_each_step_moves_the_target_by_mu(tmp_path, digits_data_dir, teacher_dir, name):
  """theta- <- mu theta- + (1 - mu) theta after each update, with mu(k) of the run's schedule:
  0.81, then 0.9^(2 / (N(k) - 1)), for CT (the reference's formula); 0.95 for CD."""
  import jax.numpy as jnp
  from cm_jax import consistency, experiment, trainer
  config = _target_ema_runs(digits_data_dir, teacher_dir)[name]
  config.teacher.workdir = teacher_dir
  exp = experiment.build(config, str(tmp_path / 'run'))
  frozen = exp.load_frozen()
  # The state and the step as a run creates and compiles them: the programs of the runs above, which
  # the session's compilation cache holds.
  ckpt = checkpointing.Checkpointer(str(tmp_path / 'run' / 'checkpoints'))
  state, _ = trainer.restore_or_init(exp, ckpt)
  ckpt.close()
  state = state.replace(extra={'target_params': jax.tree.map(lambda p: p + 0.1, state.params)})
  step_fn = trainer.compile_train_step(exp, state, frozen)
  batch = {'image': jnp.zeros((16, 8, 8, 1)) + jnp.linspace(-1, 1, 64).reshape(1, 8, 8, 1),
           'label': jnp.zeros((16,), jnp.int32)}
  mus = []
  for k in range(3):
    old_target = jax.tree.map(np.asarray, state.extra['target_params'])  # The step donates state.
    state, metrics = step_fn(state, frozen, batch, jnp.int32(k))
    mu = float(metrics['target_ema'])
    mus.append(mu)
    expected = jax.tree.map(lambda t, p: mu * t + (1 - mu) * p, old_target, state.params)
    for a, b in zip(jax.tree.leaves(state.extra['target_params']), jax.tree.leaves(expected)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
  if name == 'cd':
    assert mus == pytest.approx([0.95] * 3)
  else:
    n = [int(consistency.num_scales_at(config.consistency, k, 4)) for k in range(3)]
    assert mus[0] == pytest.approx(0.81, rel=1e-6)
    assert mus == pytest.approx([0.9 ** (2 / max(m - 1, 1)) for m in n], rel=1e-6)

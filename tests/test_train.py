"""The training loop end to end on tiny models: resume equivalence, errors, the non-finite guard."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from cm_jax import checkpointing, experiment, inference, trainer
from cm_jax.modes import train as train_mode
from cm_jax.errors import ConfigError, DatasetNotFoundError, NonFiniteLossError, WorkdirError
from tests import tiny

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize('lr_decay', ['constant', 'cosine'])
def test_resume_gives_the_same_losses_as_an_uninterrupted_run(tmp_path, digits_data_dir, monkeypatch,
                                                              lr_decay):
  def config():
    c = tiny.edm_config(digits_data_dir, steps=6)
    c.training.lr_decay = lr_decay
    return c
  full = tiny.train(config(), str(tmp_path / 'a'))
  # The same command stopped after step 3 (as by a preemption notice), then relaunched.
  with monkeypatch.context() as patch:
    patch.setattr(checkpointing.Checkpointer, 'reached_preemption', lambda self, step: step == 3)
    first = tiny.train(config(), str(tmp_path / 'b'))
  assert first.preempted
  resumed = tiny.train(config(), str(tmp_path / 'b'))
  assert [s for s, _ in first.losses] == [0, 1, 2]
  assert [s for s, _ in resumed.losses] == [3, 4, 5]  # Started at the saved step, not from 0.
  assert dict(full.losses) == dict(first.losses + resumed.losses)  # Bitwise on CPU.
  # The whole state, not only the params: the EMA copies that are sampled and the optimizer state.
  for item, tree in full.state.items().items():
    for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(resumed.state.items()[item])):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=item)


def test_train_and_finish_writes_checkpoint_samples_grid_and_metrics(tmp_path, digits_data_dir):
  workdir = str(tmp_path / 'run')
  out = train_mode.run(tiny.edm_config(digits_data_dir, steps=2), workdir)
  result = out.samples['heun']
  assert result['nfe'] == 5  # 3 Heun levels = 2 Heun steps + 1 Euler step.
  with np.load(result['npz']) as npz:
    assert npz['arr_0'].shape == (16, 8, 8, 1) and npz['arr_0'].dtype == np.uint8
  assert os.path.basename(result['npz']) == 'samples_16x8x8x1.npz'
  assert os.path.exists(result['grid'])
  assert os.path.isdir(os.path.join(workdir, 'checkpoints', '2'))
  with open(os.path.join(workdir, 'metrics.json')) as f:
    recorded = json.load(f)['heun_nfe5']
  # The recorded metric is the digits metric of the written samples.
  from cm_jax.evaluation import digits_metric
  with np.load(result['npz']) as npz:
    expected = digits_metric.DigitsMetric(tiny.edm_config(digits_data_dir).data)(npz['arr_0'])
  assert recorded['digits_fd'] == pytest.approx(expected['digits_fd'], rel=1e-9)
  assert recorded['digits_classes'] == expected['digits_classes']
  assert any(name.startswith('events.out.tfevents') for name in os.listdir(workdir))


@pytest.mark.xla_optimised  # Thousands of steps or 10^5 samples of one program.
def test_edm_loss_decreases_on_digits(tmp_path, digits_data_dir):
  config = tiny.edm_config(digits_data_dir, steps=300)
  config.model.nf, config.training.lr, config.training.batch_size = 16, 2e-3, 32
  config.training.log_every, config.training.checkpoint_every = 100, 300
  losses = np.array([loss for _, loss in tiny.train(config, str(tmp_path)).losses])
  # The EDM weighting makes the loss ~1 for a network that outputs 0 (D = c_skip x); learning
  # the digits brings it well below.
  assert losses[:20].mean() > 0.8
  assert losses[-50:].mean() < 0.6 * losses[:20].mean()


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, digits_data_dir):
  config = tiny.edm_config(digits_data_dir, steps=40)
  # Step 0's update makes the params ~1e30 (finite, saved at step 1); step 1 overflows.
  config.training.lr, config.training.grad_clip, config.training.checkpoint_every = 1e30, 0.0, 1
  with pytest.raises(NonFiniteLossError, match='last good checkpoint') as info:
    tiny.train(config, str(tmp_path))
  ckpt_steps = sorted(int(d) for d in os.listdir(tmp_path / 'checkpoints') if d.isdigit())
  assert ckpt_steps, 'a checkpoint before the blow-up is kept'
  # The kept checkpoint restores to finite params.
  config.training.lr = 1e-4
  restored = inference.restore(config, str(tmp_path))
  step = restored.step
  assert step == ckpt_steps[-1] and f'step {step}' in str(info.value)
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(restored.state.params))


def test_workdir_of_another_config_is_refused(tmp_path, digits_data_dir):
  tiny.train(tiny.edm_config(digits_data_dir, steps=2), str(tmp_path))
  other = tiny.edm_config(digits_data_dir, steps=4)
  # Another run's data (any field outside RESUMABLE_CHANGES is refused alike); it leaves the compiled
  # step as it is, so both runs share the one the tests above compiled.
  other.data.random_flip = True
  with pytest.raises(WorkdirError, match='data.random_flip'):
    tiny.train(other, str(tmp_path))
  other.allow_other_config = True
  assert tiny.train(other, str(tmp_path)).step == 4


def test_extending_num_steps_is_refused_only_where_the_schedule_depends_on_it(tmp_path,
                                                                            digits_data_dir):
  for lr_decay, resumable in (('constant', True), ('cosine', False)):
    workdir = str(tmp_path / lr_decay)
    # 6 steps: the cosine run is then the resume test's, whose compiled step it shares.
    config = tiny.edm_config(digits_data_dir, steps=6)
    config.training.lr_decay = lr_decay
    tiny.train(config, workdir)
    config.training.num_steps = 7
    if resumable:
      assert tiny.train(config, workdir).step == 7
    else:
      with pytest.raises(WorkdirError, match='training.num_steps: 6 in the workdir, 7 now'):
        tiny.train(config, workdir)


def test_bad_config_values_fail_before_compiling(tmp_path, digits_data_dir):
  config = tiny.edm_config(digits_data_dir)
  config.training.batch_size = 0
  with pytest.raises(ConfigError, match='batch_size'):
    experiment.build(config, str(tmp_path))
  config = tiny.edm_config(digits_data_dir)
  config.method = 'gan'
  with pytest.raises(ConfigError, match="method='gan' is not one of 'edm', 'cd', 'ct'"):
    experiment.build(config, str(tmp_path))
  config = tiny.edm_config(digits_data_dir)
  config.mesh.fsdp = 3
  with pytest.raises(ConfigError, match='mesh.fsdp'):
    experiment.build(config, str(tmp_path))


def test_learning_rate_schedules_at_known_steps():
  config = tiny.edm_config('unused')
  t = config.training
  t.lr, t.warmup_steps, t.num_steps, t.lr_decay = 1e-3, 100, 1100, 'constant'
  _, constant = experiment.make_optimizer(t)
  assert [float(constant(s)) for s in (0, 50, 100, 1100, 5000)] == pytest.approx(
      [0.0, 5e-4, 1e-3, 1e-3, 1e-3])
  t.lr_decay, t.lr_end_factor = 'cosine', 0.1
  _, cosine = experiment.make_optimizer(t)
  # After warmup: lr * (end + (1 - end) * (1 + cos(pi * k / K)) / 2), k = step - warmup, K = 1000.
  expected = [0.0, 5e-4, 1e-3, 1e-3 * (0.1 + 0.9 * 0.5), 1e-4, 1e-4]
  assert [float(cosine(s)) for s in (0, 50, 100, 600, 1100, 5000)] == pytest.approx(expected, rel=1e-5)
  t.num_steps = 0  # A run built only to restore or sample: warmup, then the end rate.
  _, short = experiment.make_optimizer(t)
  assert [float(short(s)) for s in (50, 100, 101)] == pytest.approx([5e-4, 1e-3, 1e-4], rel=1e-5)
  t.lr_decay = 'linear'
  with pytest.raises(ConfigError, match="training.lr_decay='linear' is not one of 'constant', 'cosine'"):
    experiment.make_optimizer(t)


def test_missing_dataset_says_how_to_prepare_it(tmp_path):
  config = tiny.edm_config(str(tmp_path / 'empty'))
  config.data.name, config.data.image_size, config.data.num_channels = 'cifar10', 32, 3
  with pytest.raises(DatasetNotFoundError, match='download_and_prepare'):
    tiny.train(config, str(tmp_path / 'run'))
  assert not os.path.exists(tmp_path / 'run' / 'checkpoints')


# launch.py's command-line errors, each a launch of its own: one process imports what every launch
# imports (absl, the modes, TensorFlow and JAX, which main() imports before it checks anything), then
# forks a fresh launch per command line (nothing has touched a device or parsed a flag before the fork).
# Each child runs launch.py's `app.run(main, flags_parser=_parse_flags)` and exits as the interpreter
# would: an uncaught exception prints its traceback, sys.exit('message') prints the message.
_LAUNCHES = textwrap.dedent("""
    import json, os, sys, traceback
    sys.path.insert(0, os.getcwd())
    import launch
    import tensorflow, jax
    from absl import app
    results = []
    for argv, err_path in json.loads(sys.argv[1]):
      sys.stdout.flush(); sys.stderr.flush()
      pid = os.fork()
      if pid == 0:
        fd = os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(fd, 2)
        code = 0
        sys.argv = ['launch.py'] + argv  # config_flags reads the overrides from sys.argv.
        try:
          app.run(launch.main, flags_parser=launch._parse_flags)
        except SystemExit as stop:
          if isinstance(stop.code, int) or stop.code is None:
            code = stop.code or 0
          else:
            print(stop.code, file=sys.stderr)
            code = 1
        except BaseException:
          traceback.print_exc()
          code = 1
        sys.stdout.flush(); sys.stderr.flush()
        os._exit(code)
      results.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
    print('CODES ' + json.dumps(results))
""")


def _launch_each(tmp_path, *argvs) -> list[subprocess.CompletedProcess]:
  """What `python launch.py ARGV` gives for each ARGV (its exit status and stderr)."""
  err_paths = [str(tmp_path / f'launch_{i}.stderr') for i in range(len(argvs))]
  proc = subprocess.run([sys.executable, '-c', _LAUNCHES,
                         json.dumps([[list(argv), path] for argv, path in zip(argvs, err_paths)])],
                        cwd=REPO, capture_output=True, text=True, timeout=180)
  assert proc.returncode == 0 and 'CODES ' in proc.stdout, proc.stderr[-3000:]
  codes = json.loads(proc.stdout.split('CODES ')[-1])
  done = []
  for argv, path, code in zip(argvs, err_paths, codes):
    with open(path) as f:
      done.append(subprocess.CompletedProcess(argv, code, '', f.read()))
  return done


@pytest.fixture(scope='module')
def launched(tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
  """The command lines of the three tests below, launched once (see _LAUNCHES)."""
  tmp = tmp_path_factory.mktemp('launches')
  workdir = tmp / 'run'
  argvs = {
      'bad_key': ['--config=configs/digits_edm.py', f'--workdir={workdir}', '--config.training.lrr=1'],
      'bad_type': ['--config=configs/digits_edm.py', f'--workdir={workdir}',
                   '--config.training.lr=fast'],
      'bad_value': ['--config=configs/digits_edm.py', f'--workdir={workdir}',
                    '--config.consistency.distance=lp3', '--config.method=cd'],
      'url': ['--config=configs/digits_edm.py', '--workdir=gs://bucket/runs/x'],
      'teacher_url': ['--config=configs/digits_cd.py', f'--workdir={workdir}',
                      '--config.teacher.workdir=s3://bucket/teacher'],
      'negative_lr': ['--config=configs/digits_cd.py:pseudo_huber', f'--workdir={workdir}',
                      '--config.training.lr=-1e-4'],
  }
  done = dict(zip(argvs, _launch_each(tmp, *argvs.values())))
  done['workdir'] = workdir
  return done


def test_command_line_overrides_and_their_errors(launched):
  bad_key = launched['bad_key']
  assert bad_key.returncode != 0
  assert "no 'lrr' in training" in bad_key.stderr and 'lr, lr_decay, lr_end_factor, num_grid_samples' in bad_key.stderr
  bad_type = launched['bad_type']
  assert bad_type.returncode != 0 and "could not convert string to float: 'fast'" in bad_type.stderr
  bad_value = launched['bad_value']
  assert bad_value.returncode != 0 and 'consistency.distance' in bad_value.stderr
  assert not os.path.exists(launched['workdir'] / 'checkpoints')


def test_url_workdirs_are_refused_with_what_to_do_instead(launched):
  url = launched['url']
  assert url.returncode != 0 and 'Traceback' not in url.stderr
  assert 'WorkdirError: --workdir=gs://bucket/runs/x: URL paths are not supported' in url.stderr
  assert 'gcsfuse' in url.stderr and not os.path.exists(os.path.join(REPO, 'gs:'))
  teacher = launched['teacher_url']
  assert teacher.returncode != 0 and '--config.teacher.workdir=s3://bucket/teacher' in teacher.stderr
  assert not os.path.exists(launched['workdir'] / 'checkpoints')


def test_config_override_applies_and_variants_load(launched):
  # The override reaches the config with its type: validation then rejects the value itself.
  negative = launched['negative_lr']
  assert negative.returncode != 0 and 'training.lr=-0.0001 must be a positive number' in negative.stderr
  from cm_jax import config_utils
  assert config_utils.load_config_file('configs/digits_cd.py:pseudo_huber').consistency.distance == (
      'pseudo_huber')
  assert config_utils.load_config_file('configs/cifar10_cd.py:l1').training.lr == 2e-4

r"""`--mode=train` (the default): train or resume a run, then write its final samples and metrics.

  python launch.py --config=configs/digits_cd.py --workdir=runs/digits

A method that distils a teacher run (config.teacher) with teacher.train_if_missing trains that
teacher first, into teacher.workdir, with teacher.config: a finished teacher is reused, a preempted
one stops the whole job (a relaunch finishes it first), and one that stopped before its num_steps is
refused unless teacher.allow_unfinished is set.

Before anything compiles or is written: every sampler name and the dataset are checked; then the
workdir is created, probed writable and locked against a second launch (cm_jax.rundir). config.json
is written once the state is restored or created.
"""

import dataclasses
import logging
import os
from typing import Any

import jax
import ml_collections
from clu import metric_writers

from cm_jax import (config_utils, data, evaluators, experiment, inference, phases, rundir,
                    sharding, teacher, trainer)
from cm_jax.errors import Preempted, TeacherError
from cm_jax.evaluators import image_metrics


@dataclasses.dataclass
class TrainOutcome:
  """What a train-mode call did: the trainer's result, the experiment, the frozen inputs, and the
  final samples' records by sampler (empty when the run stopped early, e.g. preempted)."""
  result: trainer.TrainResult
  exp: experiment.Experiment
  frozen: dict
  samples: dict[str, dict]

  @property
  def state(self):
    return self.result.state

  @property
  def step(self) -> int:
    return self.result.step

  @property
  def preempted(self) -> bool:
    return self.result.preempted

  @property
  def losses(self) -> list[tuple[int, float]]:
    return self.result.losses


def run(config: ml_collections.ConfigDict, workdir: str, load_lpips=None,
        final_samples: bool = True) -> TrainOutcome:
  """Train or resume the run in `workdir`, then write the final samples, grids and metrics.

  Args:
    config: the run's config.
    workdir: the run's directory (created if missing; locked while this runs).
    load_lpips: replaces the LPIPS weight loader (tests use random weights).
    final_samples: write training.final_samplers' samples once training is done.

  Raises:
    Preempted: the teacher this run trains first was stopped by a preemption notice (its
      checkpoint is saved); a preemption of this run's own training returns with `preempted` set.
  """
  workdir = os.path.abspath(workdir)
  # The teacher's nested call joins the job its distillation opened: one table, at the very end.
  with phases.job(workdir):
    return _run(config, workdir, load_lpips, final_samples)


def _run(config: ml_collections.ConfigDict, workdir: str, load_lpips, final_samples: bool
         ) -> TrainOutcome:
  """`run`'s work, inside its job: each phase that can take long is timed by name."""
  # ---- Checks and the whole experiment, before any compilation or any write. ----
  with phases.phase('experiment build'):
    exp = experiment.build(config, workdir, load_lpips)
  # Only training reads batches of training.batch_size: sampling a run on another device count works.
  sharding.check_batch(config.training.batch_size, exp.mesh)
  final = _check_samplers(exp)
  # A dataset that is not prepared says how to prepare it before anything is written (the embedded
  # digits are built, and a folder dataset converted, here on first use).
  with phases.phase('dataset preparation'):
    data.prepared_builder(config.data)
  teacher_to_train = _teacher_to_train(config, workdir) if exp.method.uses_teacher() else None
  rundir.prepare(workdir)
  with rundir.locked(workdir):
    config_utils.check_workdir(config, workdir, exp.method.schedule_needs_num_steps())
    if teacher_to_train is not None:
      with phases.scope('teacher'):
        _train_teacher(config, teacher_to_train)
    grids = evaluators.create('grid', exp, every=config.training.sample_every)
    with phases.phase('frozen inputs load'):
      frozen = exp.load_frozen()
    experiment.log_parameter_overview(exp)
    return _train(exp, frozen, grids, final if final_samples else {})


def _train(exp: experiment.Experiment, frozen: dict, grids, final: dict) -> TrainOutcome:
  """Training, then the final samples."""
  config, workdir = exp.config, exp.workdir

  def record_config():
    # Only once the state is restored or created: a launch that fails before (e.g. a checkpoint of
    # another model) must leave the record of the run that is there.
    if jax.process_index() == 0:
      config_utils.save_config(config, workdir)

  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  try:
    result = trainer.train(exp, frozen, writer, hooks=(grids.hook(frozen, writer),),
                           on_state_ready=record_config)
    samples = {}
    if final and not result.preempted:
      with phases.phase('metric setup'):  # The digits classifier: trained, or read from its cache.
        scorer = image_metrics.training_scorer(config)
      samples = evaluators.create('samples', exp, config.sampling.num_samples, scorer, writer).run(
          inference.params_of_state(exp, result.state, frozen), final, result.step)
  finally:
    writer.close()
  return TrainOutcome(result, exp, frozen, samples)


def _check_samplers(exp: experiment.Experiment) -> dict[str, Any]:
  """Every sampler the config names, checked before anything trains or is written, each error naming
  its field; returns training.final_samplers' samplers by name ('' is the method's default)."""
  method, config = exp.method, exp.config
  final = {name or method.default_sampler: method.sampler(name, 'training.final_samplers')
           for name in config.training.final_samplers}
  method.sampler(config.sampling.sampler, 'sampling.sampler')  # What --mode=sample will use.
  if config.eval.samplers:
    for name in config_utils.eval_samplers(config):
      method.sampler(name, 'eval.samplers')
  return final


def _teacher_to_train(config: ml_collections.ConfigDict, workdir: str) -> teacher.TeacherRun | None:
  """The teacher run to train first, or None to distil the one there, checked before anything is
  written: teacher.train_if_missing trains a missing or unfinished teacher, which must be of the
  student's network (by its saved config, else by teacher.config's); otherwise the teacher must be
  there, of the student's network and finished (unless teacher.allow_unfinished)."""
  found = teacher.find(config, workdir)
  if found.finished or not config.teacher.train_if_missing:
    teacher.check_usable(config, found)
    teacher.check_finished(config, found)
    return None
  if not config.teacher.config:
    raise TeacherError('teacher.train_if_missing=True needs teacher.config (the EDM config file).')
  if found.saved_config is not None:
    teacher.check_fits(config, found.saved_config, found.workdir)
  else:  # A teacher of another network would be refused only after all its training.
    teacher.check_fits(config, config_utils.load_config_file(config.teacher.config).to_dict(),
                       found.workdir, f'The teacher config {config.teacher.config}')
  return found


def _train_teacher(config: ml_collections.ConfigDict, found: teacher.TeacherRun) -> None:
  teacher_config = config_utils.load_config_file(config.teacher.config)
  teacher_config.mesh = config.mesh  # The teacher trains on the same devices.
  if found.saved_config is not None:
    teacher_config.allow_other_config = False
  logging.info('Training the EDM teacher into %s (config %s) first.', found.workdir,
               config.teacher.config)
  outcome = run(teacher_config, found.workdir)
  if outcome.preempted:
    # The whole job stops: distilling the half-trained teacher would make a worse student that a
    # relaunch then takes as finished. The relaunch finishes the teacher first.
    raise Preempted(f'Preemption notice while training the teacher in {found.workdir}: its '
                    f'checkpoint of step {outcome.step} is saved. Relaunch the same command to '
                    'finish the teacher, then the distillation.')

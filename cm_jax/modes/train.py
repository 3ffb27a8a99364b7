r"""`--mode=train` (the default): train or resume a run, then write its final samples and metrics.

  python launch.py --config=configs/digits_cd.py --workdir=runs/digits

A method that distils a teacher run (config.teacher) with teacher.train_if_missing trains that
teacher first, into teacher.workdir, with teacher.config: a finished teacher is reused.
"""

import dataclasses
import logging
import os
from typing import Any

import jax
import ml_collections
from clu import metric_writers

from cm_jax import config_utils, evaluators, experiment, inference, sharding, teacher, trainer
from cm_jax.errors import TeacherError
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
    workdir: the run's directory (created if missing).
    load_lpips: replaces the LPIPS weight loader (tests use random weights).
    final_samples: write training.final_samplers' samples once training is done.
  """
  workdir = os.path.abspath(workdir)
  # ---- Checks and the whole experiment, before any compilation. ----
  exp = experiment.build(config, workdir, load_lpips)
  # Only training reads batches of training.batch_size: sampling a run on another device count works.
  sharding.check_batch(config.training.batch_size, exp.mesh)
  config_utils.check_workdir(config, workdir, exp.method.schedule_needs_num_steps())
  if exp.method.uses_teacher():
    _train_teacher_if_missing(config, workdir)
  final = _final_samplers(exp) if final_samples else {}
  grids = evaluators.create('grid', exp, every=config.training.sample_every)
  frozen = exp.load_frozen()
  if jax.process_index() == 0:
    config_utils.save_config(config, workdir)
  experiment.log_parameter_overview(exp)

  # ---- Training, then the final samples. ----
  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  try:
    result = trainer.train(exp, frozen, writer, hooks=(grids.hook(frozen, writer),))
    samples = {}
    if final and not result.preempted:
      scorer = image_metrics.training_scorer(config)
      samples = evaluators.create('samples', exp, config.sampling.num_samples, scorer, writer).run(
          inference.params_of_state(exp, result.state, frozen), final, result.step)
  finally:
    writer.close()
  return TrainOutcome(result, exp, frozen, samples)


def _final_samplers(exp: experiment.Experiment) -> dict[str, Any]:
  """training.final_samplers by name ('' is the method's default), checked before training."""
  names = [name or exp.method.default_sampler for name in exp.config.training.final_samplers]
  return {name: exp.method.sampler(name, 'training.final_samplers') for name in names}


def _train_teacher_if_missing(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Trains the teacher run first (teacher.train_if_missing) when it is missing or unfinished."""
  found = teacher.find(config, workdir)
  if found.finished or not config.teacher.train_if_missing:
    return  # Loading it checks it and says what to do when it is missing.
  if not config.teacher.config:
    raise TeacherError('teacher.train_if_missing=True needs teacher.config (the EDM config file).')
  teacher_config = config_utils.load_config_file(config.teacher.config)
  teacher_config.mesh = config.mesh  # The teacher trains on the same devices.
  if found.saved_config is not None:
    teacher_config.allow_other_config = False
  logging.info('Training the EDM teacher into %s (config %s) first.', found.workdir,
               config.teacher.config)
  run(teacher_config, found.workdir)

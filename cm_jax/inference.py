"""Running a trained model: its newest params restored without the training state, samplers and
editors over batches sharded on the mesh, the same results on any number of devices and processes.
"""

import copy
import dataclasses
import logging
import os
from typing import Any, Callable

import jax
import ml_collections
import numpy as np

from cm_jax import checkpointing, config_utils, data, experiment, methods, networks, sharding
from cm_jax.errors import ConfigError, WorkdirError
from cm_jax.experiment import Experiment, TrainState


# --------------------------------------------------------------------------------------------------
# A trained run, restored for inference.
# --------------------------------------------------------------------------------------------------
def restore_config(config: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
  """A copy of the config to restore the run with: it trains and loads nothing inference does not
  need (no teacher training; a CD run's teacher from the run's saved config; no LPIPS weights)."""
  config = copy.deepcopy(config)
  with config.unlocked():
    config.teacher.train_if_missing = False
    if not config.teacher.workdir:
      saved = config_utils.read_saved_config(workdir) or {}
      config.teacher.workdir = saved.get('teacher', {}).get('workdir', '')
    if config.consistency.distance == 'lpips':
      # The training distance plays no part in inference; this skips loading the LPIPS weights.
      config.consistency.distance = 'l2'
  return config


@dataclasses.dataclass
class RestoredRun:
  """A run's newest params and EMA copies (no optimizer state) and what its samplers read."""
  exp: Experiment
  state: TrainState
  step: int

  def params(self, source: str = methods.OWN_PARAMS):
    """The params a sampler or editor runs: the run's own (sampling.ema_index), or a frozen input
    of the method (e.g. a CD run's teacher), loaded on first use."""
    if source == methods.OWN_PARAMS:
      return eval_params(self.state, self.exp.config.sampling.ema_index)
    return self.exp.load_frozen(lambda name: name == source)[source]


# What must match between the config and the run it restores.
_RUN_FIELDS = ('method', 'model', 'noise', 'data.name', 'data.image_size', 'data.num_channels')


def check_run_matches(config: ml_collections.ConfigDict, workdir: str) -> None:
  """The config must describe the network the workdir holds (restoring would fail less clearly)."""
  saved = config_utils.read_saved_config(workdir)
  if saved is None:
    return
  ignore = tuple(f'model.{name}' for name in networks.RUNTIME_FIELDS)
  diffs = config_utils.config_differences(saved, config, ignore=ignore, only=_RUN_FIELDS)
  if diffs:
    listed = '; '.join(f'{k}: {a!r} in the workdir, {b!r} now' for k, (a, b) in diffs.items())
    raise WorkdirError(f'{workdir} holds a run of another model ({listed}). Sample, edit or '
                       'evaluate it with the config (and overrides) it was trained with.')


def restore(config: ml_collections.ConfigDict, workdir: str) -> RestoredRun:
  """The run in `workdir` for inference; raises ConfigError when there is nothing to restore and
  WorkdirError when the config describes another model."""
  check_run_matches(config, workdir)
  exp = experiment.build(restore_config(config, workdir), workdir)
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(ckpt_dir):
    raise ConfigError(f'No checkpoints in {workdir}: train first with '
                      f'`python launch.py --config=<config> --workdir={workdir}`.')
  ckpt = checkpointing.Checkpointer(ckpt_dir, read_only=True)
  abstract = checkpointing.with_shardings(exp.abstract_state, exp.state_shardings)
  try:
    restored = ckpt.restore_latest({'params': abstract.params, 'ema_params': abstract.ema_params})
  finally:
    # Also when nothing restores: a manager left open has TensorStore callbacks that, at exit,
    # find its event loop closed and print a traceback each.
    ckpt.close()
  if restored is None:
    raise ConfigError(f'No restorable checkpoint in {ckpt_dir}.')
  step, items, _ = restored
  state = TrainState(items['params'], None, items['ema_params'], {})
  eval_params(state, config.sampling.ema_index)  # A wrong EMA index fails before anything samples.
  return RestoredRun(exp, state, step)


def eval_params(state: TrainState, ema_index: int):
  """The EMA copy to sample from; -1 is the online params."""
  if ema_index < 0 or not state.ema_params:
    return state.params
  if ema_index >= len(state.ema_params):
    raise ConfigError(f'sampling.ema_index={ema_index} but the run keeps {len(state.ema_params)} EMA '
                      'copies (training.ema_decays); use -1 for the online params.')
  return state.ema_params[ema_index]


# --------------------------------------------------------------------------------------------------
# Samplers over the mesh.
# --------------------------------------------------------------------------------------------------
class ShardedSampler:
  """Draws samples from `sample_fn(params, rng, labels, shape)` in batches sharded over a mesh.

  Compiled once per instance: call it again with other params (of the same structure) for free.
  Batch b uses the key fold_in(PRNGKey(seed), b) (and, when class-conditional, labels drawn from
  fold_in(key, 1)); the compiled batch is padded to a multiple of the devices and processes, and
  since JAX's random bits do not depend on the array's sharding or on rows appended after them, the
  samples are the same on any number of devices.
  """

  def __init__(self, sample_fn, mesh: jax.sharding.Mesh, image_shape,
               batch_size: int, num_classes: int = 0):
    self.mesh, self.batch_size, self.num_classes = mesh, batch_size, num_classes
    self.padded = sharding.padded_batch_size(batch_size, mesh)
    shape = (self.padded,) + tuple(image_shape)
    self._jitted = jax.jit(lambda params, key, labels: sample_fn(params, key, labels, shape),
                           out_shardings=sharding.batch_sharding(mesh))

  def __call__(self, params, num: int, seed: int, labels: np.ndarray | None = None
               ) -> tuple[np.ndarray, np.ndarray | None]:
    """(`num` uint8 NHWC samples on every process, their int labels or None)."""
    base = jax.random.PRNGKey(seed)
    outputs, out_labels = [], []
    for b in range(-(-num // self.batch_size)):
      key = jax.random.fold_in(base, b)
      batch_labels = None
      if self.num_classes > 0:
        if labels is not None:
          chosen = np.asarray(labels)[b * self.batch_size:(b + 1) * self.batch_size]
          batch_labels = np.resize(chosen, self.padded)
        else:
          batch_labels = np.asarray(jax.random.randint(jax.random.fold_in(key, 1), (self.padded,), 0,
                                                       self.num_classes))
        out_labels.append(batch_labels[:self.batch_size])
        batch_labels = sharding.put_batch(batch_labels.astype(np.int32), self.mesh)
      images = self._jitted(params, key, batch_labels)
      outputs.append(data.to_uint8(sharding.gather(images))[:self.batch_size])
    images = np.concatenate(outputs)[:num]
    return images, (np.concatenate(out_labels)[:num] if out_labels else None)


# The params a sampler or editor runs, by source (methods.OWN_PARAMS or a frozen input's name).
ParamsOf = Callable[[str], Any]


def params_of_state(exp: Experiment, state: TrainState, frozen: dict) -> ParamsOf:
  """ParamsOf for a run in training: its EMA copy (sampling.ema_index) or its frozen inputs."""
  own = exp.config.sampling.ema_index
  return lambda source: eval_params(state, own) if source == methods.OWN_PARAMS else frozen[source]


def sample_images(exp: Experiment, params_of: ParamsOf, name: str, sampler: methods.Sampler,
                  num: int, seed: int, batch_size: int, labels: np.ndarray | None = None
                  ) -> tuple[np.ndarray, np.ndarray | None]:
  """`num` uint8 NHWC samples of `sampler` (called `name`) on every process, and their labels.

  Any batch size works on any mesh (see ShardedSampler): the same seed and batch size give the same
  samples on any number of devices. The compiled sampler is kept on `exp` for the next call.
  """
  key = (name, batch_size)
  if key not in exp.compiled_samplers:
    exp.compiled_samplers[key] = ShardedSampler(sampler.fn, exp.mesh, exp.image_shape, batch_size,
                                                exp.config.model.num_classes)
  return exp.compiled_samplers[key](params_of(sampler.params), num, seed, labels)


# --------------------------------------------------------------------------------------------------
# Any function over input arrays, in batches sharded over the mesh (editing).
# --------------------------------------------------------------------------------------------------
def run_batched(fn: Callable, params, arrays: dict[str, np.ndarray], batch_size: int, seed: int,
                mesh: jax.sharding.Mesh, num_draws: int = 1) -> np.ndarray:
  """fn(params, key, batch) over `arrays` in batches split over the mesh; the outputs (float) in order.

  Draw d of batch b uses the key fold_in(fold_in(PRNGKey(seed), d), b); batches are padded to a
  multiple of the devices and processes by rows that are dropped, so the result does not depend on
  the number of devices. Returns [num_draws, N, ...].
  """
  num = len(next(iter(arrays.values())))
  batch_size = min(batch_size, num)  # A few inputs are not padded to a whole configured batch.
  padded = sharding.padded_batch_size(batch_size, mesh)
  jitted = jax.jit(fn, out_shardings=sharding.batch_sharding(mesh))
  return np.stack([_run_draw(jitted, params, arrays, num, batch_size, padded,
                             jax.random.fold_in(jax.random.PRNGKey(seed), draw), mesh)
                   for draw in range(num_draws)])


def _run_draw(jitted, params, arrays, num, batch_size, padded, base, mesh) -> np.ndarray:
  outputs = []
  for b in range(-(-num // batch_size)):
    rows = slice(b * batch_size, min((b + 1) * batch_size, num))
    batch = {}
    for name, array in arrays.items():
      chunk = array[rows]
      pad = np.zeros((padded - chunk.shape[0],) + chunk.shape[1:], chunk.dtype)
      batch[name] = sharding.put_batch(np.concatenate([chunk, pad]), mesh)
    out = jitted(params, jax.random.fold_in(base, b), batch)
    outputs.append(sharding.gather(out)[:rows.stop - rows.start])
  return np.concatenate(outputs)

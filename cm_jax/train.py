"""The generic experiment loop: mesh, input, state, update step, checkpoints, samples, metrics.

Reads top to bottom. The method (EDM, CD, CT) enters only through `methods.Method`: a loss, extra
state (the target network) and samplers.
"""

import dataclasses
import logging
import os
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from clu import metric_writers, periodic_actions

from cm_jax import checkpointing, config_utils, data, methods, sharding
from cm_jax import teacher as teacher_lib
from cm_jax.errors import ConfigError, NonFiniteLossError
from cm_jax.models import Preconditioned
from cm_jax.networks import get_network


@flax.struct.dataclass
class TrainState:
  params: Any
  opt_state: Any
  ema_params: tuple
  extra: dict  # Method-specific trained pytrees, e.g. {'target_params': ...} for CD/CT.

  def items(self) -> dict:
    return {'params': self.params, 'opt_state': self.opt_state, 'ema_params': self.ema_params,
            'extra': self.extra}


def make_optimizer(training) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The optimizer chain and its learning-rate schedule (linear warmup, then constant or cosine)."""
  warmup = max(int(training.warmup_steps), 0)
  if training.lr_decay == 'constant':
    after = optax.constant_schedule(training.lr)
  elif training.lr_decay == 'cosine':
    # Decays to lr_end_factor * lr at training.num_steps and stays there. It depends on num_steps:
    # raising num_steps to extend a finished run changes the rate of the steps still to come.
    after = optax.cosine_decay_schedule(training.lr, max(training.num_steps - warmup, 1),
                                        alpha=training.lr_end_factor)
  else:
    raise ConfigError(f'training.lr_decay={training.lr_decay!r}: use constant or cosine.')
  if warmup > 0:
    schedule = optax.join_schedules([optax.linear_schedule(0.0, training.lr, warmup), after], [warmup])
  else:
    schedule = after
  optimizers = {'adam': optax.adam, 'radam': optax.radam}
  if training.optimizer not in optimizers:
    raise ConfigError(f'training.optimizer={training.optimizer!r}: use one of {sorted(optimizers)}.')
  chain = []
  if training.grad_clip > 0:
    chain.append(optax.clip_by_global_norm(training.grad_clip))
  chain.append(optimizers[training.optimizer](schedule, b1=training.b1, b2=training.b2,
                                              eps=training.eps))
  if training.weight_decay > 0:
    chain.append(optax.add_decayed_weights(-training.lr * training.weight_decay))
  return optax.chain(*chain), schedule


def image_shape_of(config) -> tuple[int, int, int]:
  return (config.data.image_size, config.data.image_size, config.data.num_channels)


@dataclasses.dataclass
class Experiment:
  """Everything built from a config before anything is compiled."""
  config: ml_collections.ConfigDict
  workdir: str
  mesh: jax.sharding.Mesh
  model: Preconditioned
  method: methods.Method
  tx: optax.GradientTransformation
  lr_schedule: optax.Schedule
  abstract_state: TrainState
  state_shardings: TrainState
  # Compiled samplers of sample_images, by (sampler name, batch size).
  samplers: dict = dataclasses.field(default_factory=dict, repr=False)

  @property
  def image_shape(self):
    return image_shape_of(self.config)

  def init_state_fn(self, params=None):
    """A function rng -> TrainState; with `params`, the state starts from them (CD from a teacher)."""
    decays = tuple(self.config.training.ema_decays)

    def init(rng):
      p = self.model.init(rng, self.image_shape) if params is None else params
      return TrainState(params=p, opt_state=self.tx.init(p), ema_params=tuple(p for _ in decays),
                        extra=self.method.init_extra(p))
    return init


def build_experiment(config, workdir: str, load_lpips=None) -> Experiment:
  config_utils.validate(config)
  mesh = sharding.make_mesh(config.mesh)
  network = get_network(config.model, config.data.image_size, config.data.num_channels)
  model = Preconditioned(network, config.model)
  method = methods.build(config, model, image_shape_of(config), load_lpips)
  tx, lr_schedule = make_optimizer(config.training)
  exp = Experiment(config, workdir, mesh, model, method, tx, lr_schedule, None, None)
  exp.abstract_state = jax.eval_shape(exp.init_state_fn(), jax.random.PRNGKey(0))
  exp.state_shardings = sharding.tree_shardings(exp.abstract_state, mesh)
  return exp


# --------------------------------------------------------------------------------------------------
# The update step.
# --------------------------------------------------------------------------------------------------
def make_train_step(exp: Experiment, frozen_shardings):
  method, tx = exp.method, exp.tx
  decays = tuple(exp.config.training.ema_decays)
  base_key = jax.random.PRNGKey(exp.config.seed)

  def train_step(state: TrainState, frozen, batch, step):
    rng = jax.random.fold_in(base_key, step)
    loss_fn = lambda p: method.loss_fn(p, state.extra, frozen, batch, rng, step)
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema_params = tuple(
        jax.tree.map(lambda e, p, d=d: d * e + (1.0 - d) * p, ema, params)
        for d, ema in zip(decays, state.ema_params))
    extra, extra_aux = method.update_extra(state.extra, params, step)
    new_state = TrainState(params, opt_state, ema_params, extra)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    # A non-finite step leaves the state as it was, so what is saved is always the last good state.
    new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
    metrics = {'loss': loss, 'grad_norm': grad_norm, 'finite': finite,
               'lr': exp.lr_schedule(step), **aux, **extra_aux}
    return new_state, metrics

  batch_sh = sharding.batch_sharding(exp.mesh)
  return jax.jit(train_step,
                 in_shardings=(exp.state_shardings, frozen_shardings,
                               {'image': batch_sh, 'label': batch_sh},
                               sharding.replicated(exp.mesh)),
                 out_shardings=(exp.state_shardings, sharding.replicated(exp.mesh)),
                 donate_argnums=(0,))


# --------------------------------------------------------------------------------------------------
# Samples and sample grids.
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
      outputs.append(data.to_uint8(gather(images))[:self.batch_size])
    images = np.concatenate(outputs)[:num]
    return images, (np.concatenate(out_labels)[:num] if out_labels else None)


def sample_images(exp: Experiment, params, sampler: str, num: int, seed: int, batch_size: int,
                  labels: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None, int]:
  """`num` samples of a named sampler as uint8 NHWC on every process: (images, labels, NFE).

  Any batch size works on any mesh (see ShardedSampler): the same seed and batch size give the same
  samples on any number of devices. The compiled sampler is kept on `exp` for the next call.
  """
  key = (sampler, batch_size)
  if key not in exp.samplers:
    fn, nfe = exp.method.sampler(sampler)
    exp.samplers[key] = (ShardedSampler(fn, exp.mesh, exp.image_shape, batch_size,
                                        exp.config.model.num_classes), nfe)
  draw, nfe = exp.samplers[key]
  images, labels = draw(params, num, seed, labels)
  return images, labels, nfe


def gather(x: jax.Array) -> np.ndarray:
  """A global array on every process as numpy."""
  if jax.process_count() == 1:
    return np.asarray(x)
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def image_grid(images: np.ndarray, columns: int | None = None) -> np.ndarray:
  """uint8 NHWC -> one HWC uint8 grid with a 1-pixel border."""
  n, h, w, c = images.shape
  columns = columns or int(np.ceil(np.sqrt(n)))
  rows = -(-n // columns)
  grid = np.full((rows * (h + 1) + 1, columns * (w + 1) + 1, c), 255, np.uint8)
  for i, img in enumerate(images):
    r, col = divmod(i, columns)
    grid[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + col * (w + 1):1 + col * (w + 1) + w] = img
  return grid


def save_png(path: str, grid: np.ndarray, upscale: int = 1) -> None:
  from PIL import Image
  if upscale > 1:
    grid = np.repeat(np.repeat(grid, upscale, axis=0), upscale, axis=1)
  image = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  image.save(path)


def write_samples(directory: str, images: np.ndarray, labels: np.ndarray | None) -> str:
  """The reference evaluator's format: samples_{N}x{H}x{W}x{C}.npz with arr_0 (and arr_1 labels)."""
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, 'samples_{}x{}x{}x{}.npz'.format(*images.shape))
  tmp = path + '.tmp.npz'
  arrays = [images] if labels is None else [images, labels.astype(np.int64)]
  np.savez(tmp, *arrays)
  os.replace(tmp, path)  # Never leave a half-written result behind.
  return path


def upscale_for(image_size: int) -> int:
  return max(1, 64 // image_size)


# --------------------------------------------------------------------------------------------------
# The loop.
# --------------------------------------------------------------------------------------------------
def restore_or_init(exp: Experiment, ckpt: checkpointing.Checkpointer, frozen) -> tuple[TrainState, int]:
  abstract = checkpointing.with_shardings(exp.abstract_state, exp.state_shardings)
  restored = ckpt.restore_latest(abstract.items())
  if restored is not None:
    step, items, _ = restored
    logging.info('Resuming from step %d in %s.', step, ckpt.directory)
    return TrainState(**items), step
  rng = jax.random.PRNGKey(exp.config.seed)
  # The state is created already sharded: each device computes only its shards (out_shardings), so
  # no device ever holds a full copy of a model that needs FSDP to fit.
  teacher_params = frozen.get('teacher_params')  # CD: the student starts from the teacher.
  if teacher_params is None:
    init = jax.jit(exp.init_state_fn(), out_shardings=exp.state_shardings).lower(rng)
    args = (rng,)
  else:
    # An argument, not a closure: a closed-over array would be baked into the program as a constant.
    init = jax.jit(lambda key, params: exp.init_state_fn(params)(key),
                   in_shardings=(sharding.replicated(exp.mesh), exp.state_shardings.params),
                   out_shardings=exp.state_shardings).lower(rng, teacher_params)
    args = (rng, teacher_params)
  # Init runs once: on XLA:CPU, compiling its ~100 random draws unoptimised takes 5x less time and
  # gives the same bits (threefry is integer arithmetic).
  options = {'xla_backend_optimization_level': 0} if jax.default_backend() == 'cpu' else None
  return init.compile(compiler_options=options)(*args), 0


def compile_train_step(exp: Experiment, frozen_shardings, state: TrainState, frozen):
  """The update step compiled ahead of the loop; returns after every process has compiled it.

  Processes finish compiling at different times, and the first collective of the step would wait
  for the slowest (gloo on CPU gives up after 30 s). A compiled step also never retraces: an input
  of another shape or sharding is an error instead of a silent recompile.
  """
  size = exp.config.training.batch_size
  batch = {'image': jax.ShapeDtypeStruct((size,) + exp.image_shape, jnp.float32),
           'label': jax.ShapeDtypeStruct((size,), jnp.int32)}
  step = jax.ShapeDtypeStruct((), jnp.int32)
  compiled = make_train_step(exp, frozen_shardings).lower(state, frozen, batch, step).compile()
  sharding.barrier('train_step_compiled')
  return compiled


def fetch_metrics(pending: list) -> tuple[list[int], dict[str, np.ndarray]]:
  """Per-step metrics since the last fetch, as one host transfer ({name: [steps]})."""
  steps = [s for s, _ in pending]
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[m for _, m in pending])
  return steps, jax.device_get(stacked)


def check_finite(steps: list[int], metrics: dict, last_saved: int | None, workdir: str) -> None:
  bad = np.flatnonzero(~metrics['finite'])
  if bad.size:
    i = int(bad[0])
    raise NonFiniteLossError(
        f'The loss or gradient became non-finite at step {steps[i]} (loss={metrics["loss"][i]}). '
        f'Training stopped; the last good checkpoint (step {last_saved}) is kept in {workdir}. '
        'Lower training.lr, enable training.grad_clip, or use model.dtype=float32, then relaunch '
        'the same command to resume.')


def frozen_inputs(exp: Experiment, teacher_params=None) -> tuple[dict, dict]:
  """The step's frozen pytrees (the CD teacher, the LPIPS weights) and their shardings."""
  frozen, shardings = {}, {}
  if teacher_params is not None:
    frozen['teacher_params'] = teacher_params
    shardings['teacher_params'] = sharding.tree_shardings(teacher_params, exp.mesh)
  if 'distance_params' in exp.method.frozen_keys():
    dist_params = exp.method.cm_loss.distance.params
    shardings['distance_params'] = jax.tree.map(lambda _: sharding.replicated(exp.mesh), dist_params)
    frozen['distance_params'] = jax.device_put(dist_params, shardings['distance_params'])
  return frozen, shardings


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, load_lpips=None) -> dict:
  """Train (or resume) the run in `workdir` to config.training.num_steps; returns final outputs."""
  workdir = os.path.abspath(workdir)
  # ---- Checks and the whole experiment, before any compilation. ----
  exp = build_experiment(config, workdir, load_lpips)
  # Only training reads batches of training.batch_size: sampling a run on another device count works.
  sharding.check_batch(config.training.batch_size, exp.mesh)
  config_utils.check_workdir(config, workdir)
  teacher_params = (teacher_lib.load_teacher(config, workdir, exp) if config.method == 'cd'
                    else None)
  frozen, frozen_shardings = frozen_inputs(exp, teacher_params)
  pipeline = data.InputPipeline(config.data, config.training.batch_size, config.seed,
                                sharding.batch_sharding(exp.mesh), split=config.data.split)
  if jax.process_index() == 0:
    config_utils.save_config(config, workdir)

  # ---- State: restored from the workdir, or created already sharded. ----
  training = config.training
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, 'checkpoints'), training.checkpoint_every,
                                    training.keep_checkpoints)
  writer = None
  try:
    state, start_step = restore_or_init(exp, ckpt, frozen)
    # A finished run (relaunched for its final samples) compiles no step.
    train_step = (compile_train_step(exp, frozen_shardings, state, frozen)
                  if start_step < training.num_steps else None)

    # ---- Metrics. ----
    writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
    report = periodic_actions.ReportProgress(num_train_steps=training.num_steps, writer=writer,
                                             every_steps=training.log_every)
    logging.info('%s run: steps %d -> %d, global batch %d on %d devices (%s).', config.method,
                 start_step, training.num_steps, training.batch_size, jax.device_count(),
                 dict(exp.mesh.shape))

    # ---- The loop. ----
    with ckpt.watch_sigterm():
      step, history, preempted = _loop(exp, state, frozen, train_step, pipeline, ckpt, writer,
                                        [report], start_step)
  finally:
    ckpt.close()  # Finishes an async save even when the loop raised: no checkpoint is lost.
    if writer is not None:
      writer.flush()
  step, state = step
  return {'state': state, 'step': step, 'preempted': preempted, 'losses': history,
          'experiment': exp, 'frozen': frozen, 'writer': writer}


def _loop(exp: Experiment, state: TrainState, frozen, train_step, pipeline, ckpt, writer, hooks,
          start_step: int):
  config, training = exp.config, exp.config.training
  pending, last_saved, history = [], ckpt.latest_step(), []
  step = start_step
  while step < training.num_steps:
    batch = pipeline.get_batch(step)
    with jax.profiler.StepTraceAnnotation('train', step_num=step):
      state, metrics = train_step(state, frozen, batch, jnp.asarray(step, jnp.int32))
    pending.append((step, metrics))
    step += 1
    for hook in hooks:
      hook(step)
    is_last = step == training.num_steps
    preempted = ckpt.reached_preemption(step)
    save = ckpt.should_save(step) or is_last or preempted
    if step % training.log_every == 0 or save:
      steps, host = fetch_metrics(pending)
      check_finite(steps, host, last_saved, exp.workdir)  # Before saving: only good states land.
      writer.write_scalars(step, {k: float(np.mean(v)) for k, v in host.items() if k != 'finite'})
      history.extend(zip(steps, host['loss'].tolist()))
      pending = []
    if save:
      ckpt.save(step, state.items(), {'step': step, 'method': config.method},
                force=is_last or preempted)
      last_saved = step
    if preempted:
      logging.warning('Preemption signal at step %d: checkpoint saved; exiting.', step)
      return (step, state), history, True
    if training.sample_every and step % training.sample_every == 0 and not is_last:
      write_grids(exp, state, frozen, writer, step)
  return (step, state), history, False


def eval_params(state: TrainState, ema_index: int):
  """The EMA copy to sample from; -1 is the online params."""
  if ema_index < 0 or not state.ema_params:
    return state.params
  if ema_index >= len(state.ema_params):
    raise ConfigError(f'sampling.ema_index={ema_index} but the run keeps {len(state.ema_params)} EMA '
                      'copies (training.ema_decays); use -1 for the online params.')
  return state.ema_params[ema_index]


def write_grids(exp: Experiment, state: TrainState, frozen, writer, step: int,
                samplers: tuple[str, ...] | None = None) -> dict:
  samplers = samplers or (exp.method.default_sampler(),)
  paths = {}
  for name in samplers:
    params = frozen['teacher_params'] if name == 'teacher_heun' else eval_params(
        state, exp.config.sampling.ema_index)
    num = exp.config.training.num_grid_samples
    images, _, nfe = sample_images(exp, params, name, num, exp.config.sampling.seed, num)
    grid = image_grid(images)
    path = os.path.join(exp.workdir, 'samples', f'grid_{name}_nfe{nfe}_step{step}.png')
    if jax.process_index() == 0:
      save_png(path, grid, upscale_for(exp.config.data.image_size))
    writer.write_images(step, {f'samples/{name}': grid[None]})
    paths[name] = path
  return paths

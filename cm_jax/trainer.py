"""The generic update step and training loop. The method enters only through `Method`'s hooks: a
loss, extra trained pytrees and their update, frozen inputs and initial params.

Reads top to bottom: the step; state restored or created already sharded; the step compiled ahead;
the loop (input, step, metrics, non-finite guard, checkpoints, preemption, periodic hooks).
"""

import dataclasses
import logging
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from clu import metric_writers, periodic_actions

from cm_jax import checkpointing, data, phases, sharding
from cm_jax.errors import NonFiniteLossError
from cm_jax.experiment import Experiment, TrainState, trainable, untrainable

# A periodic hook: fn(state, step, report), e.g. sample grids every training.sample_every steps; it
# may time its work with `report.timed(name)` (clu's ReportProgress), so the log shows where time goes.
Hook = Callable[[TrainState, int, periodic_actions.ReportProgress], None]


# --------------------------------------------------------------------------------------------------
# The update step.
# --------------------------------------------------------------------------------------------------
def make_train_step(exp: Experiment, frozen_shardings):
  method, tx = exp.method, exp.tx
  decays = tuple(exp.config.training.ema_decays)
  base_key = jax.random.PRNGKey(exp.config.seed)

  def train_step(state: TrainState, frozen, batch, step):
    rng = jax.random.fold_in(base_key, step)
    # The params, and any extra pytrees the method trains with them (Method.trained_extra).
    trained = trainable(method, state.params, state.extra)

    def loss_fn(trained):
      params, extra = untrainable(method, trained, state.extra)
      return method.loss(params, extra, frozen, batch, rng, step)
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(trained)
    updates, opt_state = tx.update(grads, state.opt_state, trained)
    params, extra = untrainable(method, optax.apply_updates(trained, updates), state.extra)
    ema_params = tuple(
        jax.tree.map(lambda e, p, d=d: d * e + (1.0 - d) * p, ema, params)
        for d, ema in zip(decays, state.ema_params))
    extra, extra_aux = method.update_extra(extra, params, step)
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


def frozen_shardings_of(frozen: dict) -> dict:
  """The shardings the frozen inputs were placed with (the step takes them as they are)."""
  return jax.tree.map(lambda x: x.sharding, frozen)


# --------------------------------------------------------------------------------------------------
# State: restored, or created already sharded.
# --------------------------------------------------------------------------------------------------
def restore_or_init(exp: Experiment, ckpt: checkpointing.Checkpointer) -> tuple[TrainState, int]:
  abstract = checkpointing.with_shardings(exp.abstract_state, exp.state_shardings)
  restored = ckpt.restore_latest(abstract.items())
  if restored is not None:
    step, items, _ = restored
    logging.info('Resuming from step %d in %s.', step, ckpt.directory)
    return TrainState(**items), step
  rng = jax.random.PRNGKey(exp.config.seed)
  # The state is created already sharded: each device computes only its shards (out_shardings), so
  # no device ever holds a full copy of a model that needs FSDP to fit.
  start = exp.method.initial_weights(exp.resources)
  if start is None:
    init = jax.jit(exp.init_state_fn(), out_shardings=exp.state_shardings).lower(rng)
    args = (rng,)
  else:
    # Arguments, not closures: a closed-over array would be baked into the program as a constant.
    ema = start.params if start.ema is None else start.ema
    init = jax.jit(lambda key, params, ema: exp.init_state_fn(params, ema)(key),
                   in_shardings=(sharding.replicated(exp.mesh), exp.state_shardings.params,
                                 exp.state_shardings.params),
                   out_shardings=exp.state_shardings).lower(rng, start.params, ema)
    args = (rng, start.params, ema)
  # Init runs once: on XLA:CPU, compiling its ~100 random draws unoptimised takes 5x less time and
  # gives the same bits (threefry is integer arithmetic).
  options = {'xla_backend_optimization_level': 0} if jax.default_backend() == 'cpu' else None
  return init.compile(compiler_options=options)(*args), 0


def compile_train_step(exp: Experiment, state: TrainState, frozen: dict):
  """The update step compiled ahead of the loop; returns after every process has compiled it.

  Processes finish compiling at different times, and the first collective of the step would wait
  for the slowest (gloo on CPU gives up after 30 s). A compiled step also never retraces: an input
  of another shape or sharding is an error instead of a silent recompile.
  """
  size = exp.config.training.batch_size
  batch = {'image': jax.ShapeDtypeStruct((size,) + exp.image_shape, jnp.float32),
           'label': jax.ShapeDtypeStruct((size,), jnp.int32)}
  step = jax.ShapeDtypeStruct((), jnp.int32)
  step_fn = make_train_step(exp, frozen_shardings_of(frozen))
  compiled = step_fn.lower(state, frozen, batch, step).compile()
  sharding.barrier('train_step_compiled')
  return compiled


# --------------------------------------------------------------------------------------------------
# The loop.
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class TrainResult:
  state: TrainState
  step: int
  preempted: bool
  losses: list[tuple[int, float]]  # (step, loss) of the steps this call ran.


def fetch_metrics(pending: list) -> tuple[list[int], dict[str, np.ndarray]]:
  """Per-step metrics since the last fetch, as one host transfer ({name: [steps]})."""
  steps = [s for s, _ in pending]
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[m for _, m in pending])
  return steps, jax.device_get(stacked)


def check_finite(steps: list[int], metrics: dict, last_saved: int | None, workdir: str,
                 config) -> None:
  """Raise NonFiniteLossError at the first non-finite step, saying what is kept and how to go on
  (`config`: the run's, so that the advice names only options that are not on already)."""
  bad = np.flatnonzero(~metrics['finite'])
  if not bad.size:
    return
  i = int(bad[0])
  if last_saved is None:
    kept, resumes = f'no checkpoint was saved yet in {workdir}', 'to start again with them'
  else:
    kept = f'the last good checkpoint (step {last_saved}) is kept in {workdir}'
    resumes = f'to resume from step {last_saved} with them'
  t = config.training
  # Only what can change on resumption: a lower rate, and float32 where it is not on already.
  changes = [f'--config.training.lr={t.lr / 10:.3g}']
  if config.model.get('dtype', 'float32') != 'float32':
    changes.append('--config.model.dtype=float32')
  message = (f'The loss or gradient became non-finite at step {steps[i]} '
             f'(loss={metrics["loss"][i]}). Training stopped; {kept}. Relaunch the same command '
             f'with {" ".join(changes)} --config.allow_other_config=True {resumes}.')
  if t.grad_clip <= 0:
    # Clipping adds a stage to the optimizer, whose saved state then no longer fits.
    message += ' Enabling gradient clipping (--config.training.grad_clip=1.0) needs a new --workdir.'
  raise NonFiniteLossError(message)


def train(exp: Experiment, frozen: dict, writer: metric_writers.MetricWriter,
          hooks: tuple[Hook, ...] = (), on_state_ready: Callable[[], None] | None = None
          ) -> TrainResult:
  """Train (or resume) the run in exp.workdir to training.num_steps.

  `frozen` holds the method's frozen inputs (Experiment.load_frozen); `hooks` run after every step
  but the last (each decides itself whether to act); `on_state_ready` runs once the state is
  restored or created (the train mode records the config then).
  """
  config, training = exp.config, exp.config.training
  pipeline = data.InputPipeline(config.data, training.batch_size, config.seed,
                                sharding.batch_sharding(exp.mesh), split=config.data.split)
  ckpt = checkpointing.Checkpointer(os.path.join(exp.workdir, 'checkpoints'),
                                    training.checkpoint_every, training.keep_checkpoints)
  try:
    with phases.phase('state restore or init'):
      state, start_step = restore_or_init(exp, ckpt)
    if on_state_ready is not None:
      on_state_ready()
    # A finished run (relaunched for its final samples) compiles no step.
    train_step = None
    if start_step < training.num_steps:
      with phases.phase('train step compile'):
        train_step = compile_train_step(exp, state, frozen)
    report = periodic_actions.ReportProgress(num_train_steps=training.num_steps, writer=writer,
                                             every_steps=training.log_every)
    logging.info('%s run: steps %d -> %d, global batch %d on %d devices (%s).', config.method,
                 start_step, training.num_steps, training.batch_size, jax.device_count(),
                 dict(exp.mesh.shape))
    with ckpt.watch_sigterm(), phases.phase('training loop') as loop:
      result = _loop(exp, state, frozen, train_step, pipeline, ckpt, writer, report, hooks,
                     start_step)
      loop.steps = result.step - start_step
      return result
  finally:
    try:
      ckpt.close()  # Finishes an async save even when the loop raised: no checkpoint is lost.
    finally:  # Also when that save failed (a WorkdirError): the input workers stop.
      pipeline.close()
      writer.flush()


def _loop(exp: Experiment, state: TrainState, frozen, train_step, pipeline, ckpt, writer, report,
          hooks, start_step: int) -> TrainResult:
  training = exp.config.training
  pending, last_saved, history = [], ckpt.latest_step(), []
  step = start_step
  # Read ahead from start_step: the reader keeps no state of its own, so a resumed run continues on
  # exactly the batches an uninterrupted one sees (`train` closes it, stopping its workers).
  batches = pipeline.batches(start_step, training.num_steps)
  while step < training.num_steps:
    batch = next(batches)
    with jax.profiler.StepTraceAnnotation('train', step_num=step):
      state, metrics = train_step(state, frozen, batch, jnp.asarray(step, jnp.int32))
    pending.append((step, metrics))
    step += 1
    report(step)
    is_last = step == training.num_steps
    preempted = ckpt.reached_preemption(step)
    save = ckpt.should_save(step) or is_last or preempted
    if step % training.log_every == 0 or save:
      steps, host = fetch_metrics(pending)
      # Before saving: only good states land.
      check_finite(steps, host, last_saved, exp.workdir, exp.config)
      writer.write_scalars(step, {k: float(np.mean(v)) for k, v in host.items() if k != 'finite'})
      history.extend(zip(steps, host['loss'].tolist()))
      pending = []
    if save:
      ckpt.save(step, state.items(), {'step': step, 'method': exp.config.method},
                force=is_last or preempted)
      last_saved = step
    if preempted:
      logging.warning('Preemption signal at step %d: checkpoint saved; exiting.', step)
      return TrainResult(state, step, True, history)
    if not is_last:
      for hook in hooks:
        hook(state, step, report)
  return TrainResult(state, step, False, history)

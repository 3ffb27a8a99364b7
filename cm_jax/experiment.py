"""An experiment: everything built from a config before anything is compiled.

The mesh, the network with its preconditioning, the method (by name, cm_jax.methods), the optimizer,
and the train state's abstract shapes and shardings. Also the loaders of what a method needs from
outside its run (`RunResources`: a teacher, LPIPS weights), placed on the mesh.
"""

import dataclasses
import logging
from typing import Any, Callable

import flax
import jax
import ml_collections
import optax

from cm_jax import config_utils, methods, sharding, teacher
from cm_jax.errors import choose
from cm_jax.models import Preconditioned
from cm_jax.networks import get_network


@flax.struct.dataclass
class TrainState:
  params: Any
  opt_state: Any
  ema_params: tuple
  extra: dict  # The method's trained pytrees beyond these, e.g. {'target_params': ...} for CD/CT.

  def items(self) -> dict:
    return {'params': self.params, 'opt_state': self.opt_state, 'ema_params': self.ema_params,
            'extra': self.extra}


def trainable(method: methods.Method, params, extra: dict):
  """What the optimizer updates: the params, with the extra entries the method trains beside them
  (Method.trained_extra). Without such entries it is the params themselves, so the optimizer state of
  every other method keeps the layout its checkpoints have."""
  names = method.trained_extra()
  if not names:
    return params
  return {'params': params, 'extra': {name: extra[name] for name in names}}


def untrainable(method: methods.Method, trained, extra: dict) -> tuple[Any, dict]:
  """(params, extra) from `trainable`'s tree, the untrained extra entries taken from `extra`."""
  if not method.trained_extra():
    return trained, extra
  return trained['params'], {**extra, **trained['extra']}


_DECAYS = ('constant', 'cosine')
_OPTIMIZERS = {'adam': optax.adam, 'radam': optax.radam}


def make_optimizer(training) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The optimizer chain and its learning-rate schedule (linear warmup, then constant or cosine)."""
  warmup = max(int(training.warmup_steps), 0)
  choose(dict.fromkeys(_DECAYS), training.lr_decay, 'training.lr_decay')
  if training.lr_decay == 'constant':
    after = optax.constant_schedule(training.lr)
  else:
    # Decays to lr_end_factor * lr at training.num_steps and stays there. It depends on num_steps:
    # raising num_steps to extend a finished run changes the rate of the steps still to come.
    after = optax.cosine_decay_schedule(training.lr, max(training.num_steps - warmup, 1),
                                        alpha=training.lr_end_factor)
  if warmup > 0:
    schedule = optax.join_schedules([optax.linear_schedule(0.0, training.lr, warmup), after], [warmup])
  else:
    schedule = after
  optimizer = choose(_OPTIMIZERS, training.optimizer, 'training.optimizer')
  chain = []
  if training.grad_clip > 0:
    chain.append(optax.clip_by_global_norm(training.grad_clip))
  chain.append(optimizer(schedule, b1=training.b1, b2=training.b2, eps=training.eps))
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
  resources: 'RunResources'
  # Compiled samplers (cm_jax.inference), by (sampler name, batch size).
  compiled_samplers: dict = dataclasses.field(default_factory=dict, repr=False)

  @property
  def image_shape(self):
    return image_shape_of(self.config)

  def init_state_fn(self, params=None, ema=None):
    """A function rng -> TrainState; with `params` (and `ema`, else the EMA copies start as params),
    the state starts from them (e.g. a teacher's)."""
    decays = tuple(self.config.training.ema_decays)

    def init(rng):
      p = self.model.init(rng, self.image_shape) if params is None else params
      e = p if ema is None else ema
      extra = self.method.init_extra(p)
      return TrainState(params=p, opt_state=self.tx.init(trainable(self.method, p, extra)),
                        ema_params=tuple(e for _ in decays), extra=extra)
    return init

  def load_frozen(self, names: Callable[[str], bool] = lambda name: True) -> dict:
    """The method's frozen inputs (those whose name `names` accepts), loaded and placed."""
    loaders = self.method.frozen_inputs(self.resources)
    return {name: load() for name, load in loaders.items() if names(name)}


class RunResources:
  """What a method may ask for from outside its run, loaded once and placed on the mesh."""

  def __init__(self, config, workdir: str, mesh, abstract_params, load_lpips=None):
    self._config, self._workdir, self._mesh = config, workdir, mesh
    self._abstract_params, self._load_lpips = abstract_params, load_lpips
    self._loaded = {}

  def provide(self, **loaded) -> None:
    """Use these instead of loading them (e.g. teacher_params: random weights in a benchmark)."""
    self._loaded.update({name.removesuffix('_params'): value for name, value in loaded.items()})

  def _once(self, name: str, load: Callable[[], Any]):
    if name not in self._loaded:
      self._loaded[name] = load()
    return self._loaded[name]

  def teacher_params(self, online: bool = False):
    return self._once('teacher_online' if online else 'teacher', lambda: teacher.load_params(
        self._config, self._workdir, self._abstract_params, self._mesh, online))

  def lpips_params(self):
    def load():
      from cm_jax.evaluation import lpips  # pylint: disable=g-import-not-at-top  # Heavy; on demand.
      params = (self._load_lpips or lpips.load_lpips)()
      return jax.device_put(params, sharding.replicated(self._mesh))
    return self._once('lpips', load)


def build(config: ml_collections.ConfigDict, workdir: str, load_lpips=None) -> Experiment:
  """Checks the config and builds the experiment; raises ConfigError before anything compiles.

  `load_lpips` replaces the LPIPS weight loader (tests and benchmarks use random weights).
  """
  config_utils.validate(config)
  method_cls = methods.get(config.method)
  mesh = sharding.make_mesh(config.mesh)
  network = get_network(config.model, config.data.image_size, config.data.num_channels)
  model = Preconditioned(network, config.noise, config.model.num_classes)
  method = method_cls(config, model, image_shape_of(config))  # Checks its named choices.
  method_cls.check_config(config)
  tx, lr_schedule = make_optimizer(config.training)
  exp = Experiment(config, workdir, mesh, model, method, tx, lr_schedule, None, None, None)
  exp.abstract_state = jax.eval_shape(exp.init_state_fn(), jax.random.PRNGKey(0))
  exp.state_shardings = sharding.tree_shardings(exp.abstract_state, mesh)
  exp.resources = RunResources(config, workdir, mesh, exp.abstract_state.params, load_lpips)
  return exp


def log_parameter_overview(exp: Experiment) -> None:
  """The network's parameters, per tensor and in total, in the log (process 0)."""
  from clu import parameter_overview  # pylint: disable=g-import-not-at-top
  if jax.process_index() == 0:
    overview = parameter_overview.get_parameter_overview(exp.abstract_state.params,
                                                         include_stats=False, max_lines=40)
    logging.info('Network parameters (first 40 tensors):\n%s', overview)

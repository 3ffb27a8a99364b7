"""What a training method is to the rest of cm_jax: the `Method` protocol and its samplers.

A method is one class in one file of this package, registered by name (`methods.register`). The
generic step and loop (cm_jax.trainer) know only this interface:

  check_config(config)         refuse settings the method cannot use, before anything is built
  frozen_inputs(resources)     the step's read-only pytrees (a teacher, LPIPS weights), as loaders
  initial_weights(resources)   where the online params and EMA copies start (None: random init)
  init_extra / update_extra    pytrees beside params, optimizer state and EMA (a target net)
  trained_extra()              which of those the optimizer trains with the params (sCM's w_phi)
  loss(...)                    the objective, a pure function of pytrees, a batch, a key and the step
  samplers()                   the samplers the method offers, by name

and the inference side (sampling, editing, evaluation) also asks it for a consistency function to
edit with and for the time-point grid of a time search.
"""

import dataclasses
from typing import Any, Callable, ClassVar, Protocol

import jax
import numpy as np

from cm_jax import karras, sampling
from cm_jax.errors import ConfigError
from cm_jax.models import Preconditioned

# fn(params, rng, labels or None, shape) -> images in [-1, 1].
SampleFn = Callable[..., jax.Array]
# The frozen input holding a distillation teacher's params.
TEACHER = 'teacher_params'
# The params a sampler runs: the run's own (an EMA copy or the online params, sampling.ema_index).
OWN_PARAMS = 'own'


@dataclasses.dataclass(frozen=True)
class InitialWeights:
  """Where a new run's weights start: the online params, and the EMA copies (None: as params)."""
  params: Any
  ema: Any = None


@dataclasses.dataclass(frozen=True)
class Sampler:
  """A named way to draw samples: its function, its network evaluations, and whose params it runs
  (OWN_PARAMS or the name of a frozen input, e.g. TEACHER). `info` is recorded with the samples."""
  fn: SampleFn
  nfe: int
  params: str = OWN_PARAMS
  info: dict = dataclasses.field(default_factory=dict)


class Resources(Protocol):
  """Loaders of what a method may need from outside its own run (cm_jax.experiment provides them)."""

  def teacher_params(self, online: bool = False) -> Any:
    """The teacher run's EMA copy teacher.ema_index (or, `online`, its online params), sharded like
    the run's params."""

  def lpips_params(self) -> Any:
    """LPIPS weights, replicated over the mesh."""


class Method:
  """The base of every method: EDM-style defaults that a method overrides where it differs."""
  name: ClassVar[str]
  default_sampler: ClassVar[str]
  # Whose denoiser encodes images into noise (editing's interpolation of inputs): OWN_PARAMS, a
  # frozen input's name (a teacher), or None when the method has no PF-ODE to encode with.
  encoder: ClassVar[str | None] = OWN_PARAMS

  def __init__(self, config, model: Preconditioned, image_shape: tuple[int, int, int]):
    self.config, self.model, self.image_shape = config, model, tuple(image_shape)

  @classmethod
  def check_config(cls, config) -> None:
    """Raise ConfigError for settings of this method's sections that cannot work."""

  # ---- Training. ----
  def frozen_inputs(self, resources: Resources) -> dict[str, Callable[[], Any]]:
    """{name: loader} of the step's read-only pytrees; a loader runs only when the input is needed."""
    del resources
    return {}

  def initial_weights(self, resources: Resources) -> InitialWeights | None:
    """The weights a new run starts from, or None for the network's random initialisation."""
    del resources
    return None

  def uses_teacher(self) -> bool:
    """Whether the run reads a teacher run (config.teacher); the train mode trains a missing one
    first when teacher.train_if_missing is set."""
    return False

  def schedule_needs_num_steps(self) -> bool:
    """Whether the method's schedules depend on training.num_steps (then it cannot change mid-run)."""
    return False

  def init_extra(self, params) -> dict:
    del params
    return {}

  def trained_extra(self) -> tuple[str, ...]:
    """Names of `init_extra` entries that are trained with the params: the loss is differentiated
    in them too and the optimizer updates them (e.g. sCM's adaptive weighting network). They are not
    averaged into the EMA copies, which are the network's alone."""
    return ()

  def loss(self, params, extra: dict, frozen: dict, batch: dict, rng: jax.Array, step: jax.Array
           ) -> tuple[jax.Array, dict]:
    raise NotImplementedError

  def update_extra(self, extra: dict, params, step: jax.Array) -> tuple[dict, dict]:
    del params, step
    return extra, {}

  # ---- Inference. ----
  def samplers(self) -> dict[str, Callable[[], Sampler]]:
    """{name: factory} of the samplers this method offers (factories may raise ConfigError)."""
    raise NotImplementedError

  def sampler(self, name: str = '', field: str = 'sampling.sampler') -> Sampler:
    """The sampler of a name ('' is the method's default); a ConfigError names `field`."""
    name = name or self.default_sampler
    factories = self.samplers()
    if name not in factories:
      raise ConfigError(f'{field} has {name!r}, which is not a sampler of {self.name} runs: use one '
                        f'of {", ".join(map(repr, factories))}.')
    return factories[name]()

  def labels_of(self, batch_labels):
    return batch_labels if self.config.model.num_classes > 0 else None

  def edit_consistency_fn(self, params, labels) -> sampling.ConsistencyFn:
    """The consistency function editing runs: here the PF-ODE of the denoiser, solved to sigma_min."""
    n = self.config.noise
    return sampling.ode_consistency_fn(self.model.denoiser_fn(params, labels),
                                       self.config.sampling.num_steps, n.sigma_min, n.rho)

  def edit_nfe_per_step(self) -> int:
    return sampling.ode_consistency_nfe(self.config.sampling.num_steps)

  def time_grid(self) -> np.ndarray | None:
    """The grid of noise levels whose indices a time-point search picks from, or None."""
    return None

  def multistep_fn(self, sigmas) -> SampleFn:
    """Multistep consistency sampling over `sigmas` (possibly traced), for methods with a time grid."""
    raise ConfigError(f'A {self.name} run has no multistep consistency sampler.')

  def multistep_sampler(self, sigmas, info: dict | None = None) -> Sampler:
    """The Sampler of `multistep_fn` over checked `sigmas`."""
    raise ConfigError(f'A {self.name} run has no multistep consistency sampler.')

  def ode_sampler(self, params_name: str, solver: str) -> Sampler:
    """EDM's deterministic sampler over sampling.num_steps Karras levels of a denoiser's PF-ODE."""
    s, n = self.config.sampling, self.config.noise

    def fn(params, rng, labels, shape):
      denoiser = self.model.denoiser_fn(params, labels)
      if s.ode_clip_denoised:
        denoiser = sampling.clipped(denoiser)
      return sampling.edm_sample(denoiser, rng, shape, s.num_steps, n, solver)
    return Sampler(fn, karras.ode_nfe(s.num_steps, solver), params_name)

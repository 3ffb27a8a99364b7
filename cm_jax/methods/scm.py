"""Continuous-time consistency models (sCM: Lu & Song 2024, "Simplifying, Stabilizing and Scaling
Continuous-Time Consistency Models", arXiv 2410.11081): sCT and sCD in TrigFlow.

The loss is cm_jax.trigflow.ScmLoss (Alg. 1): the tangent dF_theta-/dt is one native jax.jvp through
the whole network (attention and dropout included, with the forward's dropout key), fused with the
forward whose output carries the gradient. sCT takes dx_t/dt from the pair (x0, z); sCD from a
frozen EDM teacher read as a TrigFlow model (cm_jax.models: the same network, F = -net). The
adaptive weighting w_phi(t) is a small network trained beside the params (Method.trained_extra).

The attention of cm_jax's networks is XLA einsum + softmax, which jax.jvp differentiates; cuDNN's
fused attention (jax.nn.dot_product_attention(implementation='cudnn')) is a custom_vjp without a
forward-mode rule and must stay out of networks that sCM trains.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from cm_jax import karras, sampling, trigflow
from cm_jax.errors import ConfigError
from cm_jax.methods.base import OWN_PARAMS, TEACHER, InitialWeights, Method, Sampler
from cm_jax.networks.adaptive_weight import AdaptiveWeight

# The extra trained pytree of the adaptive weighting network.
ADAPTIVE_WEIGHT = 'adaptive_weight'
_JVP_DTYPES = {'': None, 'float32': jnp.float32}


class SCM(Method):
  """What sCT and sCD share; a subclass says where dx_t/dt comes from (`teacher_velocity`)."""
  default_sampler = 'multistep'
  encoder = None  # A consistency model has no PF-ODE of its own (sCD encodes with its teacher's).

  def __init__(self, config, model, image_shape):
    super().__init__(config, model, image_shape)
    self.scm_loss = trigflow.ScmLoss.from_config(config.scm, config.noise)  # Checks tangent_norm.
    self.head = AdaptiveWeight(config.noise.sigma_data, config.scm.adaptive_weight_features)
    jvp_dtype = _JVP_DTYPES.get(config.scm.jvp_dtype, 'unknown')
    if jvp_dtype == 'unknown':
      raise ConfigError(f'scm.jvp_dtype={config.scm.jvp_dtype!r} is not one of '
                        f'{", ".join(map(repr, _JVP_DTYPES))}.')
    # A float32 copy of the network for the JVP of a bfloat16 model (FastGen's precision_amp_jvp).
    self.jvp_model = None
    if jvp_dtype is not None and config.model.dtype != 'float32':
      self.jvp_model = dataclasses.replace(model, network=model.network.clone(dtype=jvp_dtype))

  @classmethod
  def check_config(cls, config) -> None:
    s, n = config.scm, config.noise
    if not s.p_std > 0:
      raise ConfigError(f'scm.p_std={s.p_std} must be positive.')
    if s.tangent_warmup_steps < 0:
      raise ConfigError(f'scm.tangent_warmup_steps={s.tangent_warmup_steps} must be >= 0 (0: no '
                        'warm-up).')
    if not s.tangent_norm_const > 0 and s.tangent_norm in ('rms', 'l2'):
      raise ConfigError(f'scm.tangent_norm_const={s.tangent_norm_const} must be positive (the '
                        'paper uses 0.1).')
    if s.adaptive_weight and s.adaptive_weight_features < 2:
      raise ConfigError(f'scm.adaptive_weight_features={s.adaptive_weight_features} must be >= 2.')
    if s.guidance_scale != 1.0:
      raise ConfigError(f'scm.guidance_scale={s.guidance_scale}: classifier-free guidance needs a '
                        'teacher with an unconditional mode (trained with label dropout), which '
                        "cm_jax's EDM runs do not train yet; leave it at 1.0.")
    t_max = float(trigflow.time_from_sigma(n.sigma_max, n.sigma_data))
    times = [t_max] + [float(t) for t in s.multistep_times]
    if not all(a > b > 0 for a, b in zip(times, times[1:])):
      raise ConfigError(f'scm.multistep_times={tuple(s.multistep_times)} must decrease from below '
                        f't_max = arctan(sigma_max / sigma_data) = {t_max:.4f} and stay above 0.')

  # ---- Training. ----
  def init_extra(self, params) -> dict:
    del params
    if not self.config.scm.adaptive_weight:
      return {}
    t = jnp.ones((1,), jnp.float32)
    return {ADAPTIVE_WEIGHT: self.head.init(jax.random.PRNGKey(self.config.seed), t)['params']}

  def trained_extra(self) -> tuple[str, ...]:
    return (ADAPTIVE_WEIGHT,) if self.config.scm.adaptive_weight else ()

  def teacher_velocity(self, frozen: dict, labels):
    """dx_t/dt(x_t, t) of the PF-ODE, or None for sCT's conditional velocity of the pair."""
    raise NotImplementedError

  def loss(self, params, extra, frozen, batch, rng, step):
    labels = self.labels_of(batch['label'])
    loss_rng, dropout_rng = jax.random.split(rng)
    # One dropout key for the forward and its JVP: theta- sees the masks theta sees (App. A).
    velocity_fn = lambda p, x_t, t: self.model.trigflow(p, x_t, t, labels, train=True,
                                                        rng=dropout_rng)
    log_weight = None
    if self.config.scm.adaptive_weight:
      log_weight = lambda t: self.head.apply({'params': extra[ADAPTIVE_WEIGHT]}, t)
    tangent_fn = None
    if self.jvp_model is not None:
      frozen_params = jax.lax.stop_gradient(params)
      tangent_fn = lambda x_t, t: self.jvp_model.trigflow(frozen_params, x_t, t, labels, train=True,
                                                          rng=dropout_rng)
    return self.scm_loss(velocity_fn, params, batch['image'], loss_rng, step,
                         self.teacher_velocity(frozen, labels), log_weight, tangent_fn)

  # ---- Inference. ----
  def t_max(self) -> float:
    n = self.config.noise
    return float(trigflow.time_from_sigma(n.sigma_max, n.sigma_data))

  def multistep_times(self) -> list[float]:
    """sampling.sigmas as TrigFlow times, else (t_max,) + scm.multistep_times (the paper's 2-step
    is t_max, 1.1)."""
    n, s = self.config.noise, self.config.sampling
    if len(s.sigmas):
      sigmas = sampling.check_time_points(s.sigmas, n.sigma_min, 'sampling.sigmas')
      return [float(trigflow.time_from_sigma(sigma, n.sigma_data)) for sigma in sigmas]
    return [self.t_max()] + [float(t) for t in self.config.scm.multistep_times]

  def samplers(self):
    multistep = lambda: self.multistep_times()
    return {'onestep': lambda: self.times_sampler([self.t_max()]),
            'multistep': lambda: self.times_sampler(multistep(), {'times': multistep()})}

  def times_sampler(self, times, info: dict | None = None) -> Sampler:
    """TrigFlow multistep sampling over `times` (trigflow.multistep_sample); one NFE per time."""
    return Sampler(self._times_fn(times), len(times), OWN_PARAMS, info or {})

  def _times_fn(self, times):
    sd, clip = self.config.noise.sigma_data, self.config.sampling.clip_denoised
    return lambda params, rng, labels, shape: trigflow.multistep_sample(
        lambda x, t: self.model.trigflow_consistency(params, x, t, labels), rng, shape, times, sd,
        clip)

  # The time search (sampling.search_steps) picks sigmas on the Karras grid of sampling.num_steps
  # levels; the samples are TrigFlow's at t = arctan(sigma / sigma_data).
  def time_grid(self) -> np.ndarray:
    n = self.config.noise
    return np.asarray(karras.karras_sigmas(self.config.sampling.num_steps, n.sigma_min, n.sigma_max,
                                           n.rho), np.float32)

  def multistep_fn(self, sigmas):
    return self._times_fn(trigflow.time_from_sigma(jnp.asarray(sigmas, jnp.float32),
                                                   self.config.noise.sigma_data))

  def multistep_sampler(self, sigmas, info: dict | None = None) -> Sampler:
    sigmas = sampling.check_time_points(sigmas, self.config.noise.sigma_min)
    times = [float(trigflow.time_from_sigma(s, self.config.noise.sigma_data)) for s in sigmas]
    return self.times_sampler(times, info)

  def edit_consistency_fn(self, params, labels):
    """f in EDM units, as the editors want it: f_edm(x, sigma) = f(cos(t) x, t), t = arctan(sigma / sd)."""
    sd = self.config.noise.sigma_data

    def f(x, sigma):
      t = trigflow.time_from_sigma(sigma, sd)
      return self.model.trigflow_consistency(params, trigflow.bcast(jnp.cos(t), x) * x, t, labels)
    return f

  def edit_nfe_per_step(self) -> int:
    return 1


class SCT(SCM):
  """sCT: dx_t/dt = cos(t) z - sin(t) x0 of the pair. With a teacher run set (teacher.workdir or
  teacher.config) the network starts from its EMA, as the paper's CIFAR-10 sCT; from scratch
  otherwise (then the tangent warm-up starts it as a diffusion model)."""
  name = 'sct'

  def uses_teacher(self) -> bool:
    return bool(self.config.teacher.workdir or self.config.teacher.config)

  def initial_weights(self, resources):
    return InitialWeights(resources.teacher_params()) if self.uses_teacher() else None

  def teacher_velocity(self, frozen, labels):
    del frozen, labels
    return None


class SCD(SCM):
  """sCD: dx_t/dt = sd F_teacher(x_t / sd, t), the frozen EDM teacher's PF-ODE in TrigFlow time; the
  student starts from the teacher's EMA (App. G.2: "We always initialize the CM from the EMA
  parameters of the teacher")."""
  name = 'scd'
  encoder = TEACHER

  @classmethod
  def check_config(cls, config) -> None:
    super().check_config(config)
    if not config.teacher.config and not config.teacher.workdir:
      raise ConfigError('An scd run needs its teacher: set teacher.config (the EDM config file) '
                        'and/or teacher.workdir (a finished EDM run).')

  def uses_teacher(self) -> bool:
    return True

  def frozen_inputs(self, resources):
    return {TEACHER: resources.teacher_params}

  def initial_weights(self, resources):
    return InitialWeights(resources.teacher_params())

  def teacher_velocity(self, frozen, labels):
    sd = self.config.noise.sigma_data
    teacher = frozen[TEACHER]
    return lambda x_t, t: sd * self.model.trigflow(teacher, x_t, t, labels)

  def samplers(self):
    return {**super().samplers(), 'teacher_heun': lambda: self.ode_sampler(TEACHER, 'heun')}

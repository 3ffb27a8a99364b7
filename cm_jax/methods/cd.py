"""Consistency distillation (CM paper Alg. 2): the lower point of a pair is one ODE step of a frozen
EDM teacher, and the student starts from the teacher's weights."""

from cm_jax import consistency
from cm_jax.errors import ConfigError, choose
from cm_jax.methods.base import TEACHER, InitialWeights
from cm_jax.methods.consistency_model import ConsistencyModel


# teacher.student_init: every student copy from the teacher's EMA, or the online params from its
# online params and the EMA copies from its EMA.
STUDENT_INITS = ('ema', 'online_and_ema')


class CD(ConsistencyModel):
  name = 'cd'
  encoder = TEACHER  # Inputs are encoded into noise by the teacher's PF-ODE.

  @classmethod
  def check_config(cls, config) -> None:
    super().check_config(config)
    if not config.teacher.config and not config.teacher.workdir:
      raise ConfigError('A cd run needs its teacher: set teacher.config (the EDM config file) and/or '
                        'teacher.workdir (a finished EDM run).')

  def __init__(self, config, model, image_shape):
    super().__init__(config, model, image_shape)
    # Checked now, not when the step is traced.
    consistency.teacher_ode_step(None, config.consistency.teacher_solver)
    choose(dict.fromkeys(STUDENT_INITS), config.teacher.student_init, 'teacher.student_init')

  def uses_teacher(self) -> bool:
    return True

  def frozen_inputs(self, resources):
    return {TEACHER: resources.teacher_params, **super().frozen_inputs(resources)}

  def initial_weights(self, resources):
    # The student starts from the teacher (CM Sec. 5): every copy from its EMA (openai/
    # consistency_models), or the online params from its online params (consistency_models_cifar10).
    ema = resources.teacher_params()
    if self.config.teacher.student_init == 'online_and_ema':
      return InitialWeights(resources.teacher_params(online=True), ema)
    return InitialWeights(ema)

  def ode_step(self, frozen, labels):
    return consistency.teacher_ode_step(self.model.denoiser_fn(frozen[TEACHER], labels),
                                        self.config.consistency.teacher_solver)

  def samplers(self):
    return {**super().samplers(), 'teacher_heun': lambda: self.ode_sampler(TEACHER, 'heun')}

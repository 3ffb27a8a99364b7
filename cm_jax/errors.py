"""Errors a user can cause, raised before anything is compiled.

Each message says what went wrong and what to do about it.
"""


class ConfigError(ValueError):
  """A config value is missing, unknown, of the wrong type or inconsistent."""


class DatasetNotFoundError(FileNotFoundError):
  """A dataset is not prepared where the config says it is."""


class TeacherError(ValueError):
  """The teacher run for distillation is missing or does not match."""


class WorkdirError(ValueError):
  """The workdir holds a run that does not match the requested one."""


class PretrainedWeightsNotFoundError(FileNotFoundError):
  """A converted pretrained-network file (Inception, LPIPS) is not where it is looked for."""


class NonFiniteLossError(FloatingPointError):
  """Training produced a non-finite loss; the last good checkpoint is kept."""


# What launch.py reports as a one-line error instead of a traceback.
USER_ERRORS = (ConfigError, DatasetNotFoundError, TeacherError, WorkdirError, NonFiniteLossError,
               PretrainedWeightsNotFoundError)

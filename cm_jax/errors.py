"""Errors a user can cause, raised before anything is compiled, and the lookup of a named choice.

Each message says what went wrong and what to do about it.
"""

from typing import Mapping, TypeVar

_T = TypeVar('_T')


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


class ConversionError(ValueError):
  """A checkpoint to convert (cm_jax.convert) cannot be read, or does not fit the config."""


class NonFiniteLossError(FloatingPointError):
  """Training produced a non-finite loss; the last good checkpoint is kept."""


class Preempted(Exception):
  """A preemption notice (SIGTERM) stopped training after a checkpoint was saved, in a run this run
  depends on (its teacher): relaunching the same command resumes it."""


# What launch.py exits with after a preemption notice: the checkpoint is saved and relaunching the same
# command resumes (75 is EX_TEMPFAIL of sysexits.h, "temporary failure; try again"), so schedulers and
# `&&` chains can tell a stopped run from a finished one (0) and from a failed one (1).
PREEMPTED_EXIT_CODE = 75

# What launch.py reports as a one-line error instead of a traceback.
USER_ERRORS = (ConfigError, DatasetNotFoundError, TeacherError, WorkdirError, NonFiniteLossError,
               PretrainedWeightsNotFoundError, ConversionError)


def choose(table: Mapping[str, _T], value: str, field: str) -> _T:
  """table[value], or a ConfigError naming the field and every valid value.

  Each named choice of the config (a method, a distance, a schedule, a solver, ...) is a dict at the
  place that uses it; this is the one way they are looked up, so the valid values are listed once.
  """
  if value not in table:
    raise ConfigError(f'{field}={value!r} is not one of {", ".join(map(repr, table))}.')
  return table[value]

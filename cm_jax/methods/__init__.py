"""Training methods, one class per file, by name (config.method).

Adding a method: write `cm_jax/methods/<name>.py` with a subclass of `base.Method` (see its docstring
for the hooks) and add one line to `_REGISTERED` below; or, from outside the package, decorate the
class with `@methods.register`.
"""

from cm_jax.errors import choose
from cm_jax.methods.base import OWN_PARAMS, TEACHER, InitialWeights, Method, Resources, Sampler
from cm_jax.methods.cd import CD
from cm_jax.methods.ct import CT
from cm_jax.methods.ect import ECT
from cm_jax.methods.edm import EDM
from cm_jax.methods.scm import SCD, SCT

__all__ = ['OWN_PARAMS', 'TEACHER', 'InitialWeights', 'Method', 'Resources', 'Sampler', 'get', 'names',
           'register']

_REGISTERED: dict[str, type[Method]] = {cls.name: cls for cls in (EDM, CD, CT, ECT, SCD, SCT)}


def register(cls: type[Method]) -> type[Method]:
  """Makes a Method subclass available as config.method = cls.name."""
  _REGISTERED[cls.name] = cls
  return cls


def get(name: str) -> type[Method]:
  return choose(_REGISTERED, name, 'method')


def names() -> tuple[str, ...]:
  return tuple(_REGISTERED)

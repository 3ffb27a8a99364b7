"""Writing files so that a reader never sees half of one: a temporary file, then a rename."""

import json
import os
from typing import IO, Any, Callable

import numpy as np


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO], Any], binary: bool = False) -> str:
  """Calls write(file) on a temporary file beside `path`, then renames it to `path`.

  An interrupted write leaves `path` as it was (and no temporary file behind).
  """
  path = os.fspath(path)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  # The pid keeps two writers apart; a plain open keeps the permissions the umask gives.
  tmp = f'{path}.{os.getpid()}.tmp'
  try:
    with open(tmp, 'wb' if binary else 'w') as f:
      write(f)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  return path


def write_json(path: str | os.PathLike[str], value: Any) -> str:
  return atomic_write(path, lambda f: json.dump(value, f, indent=2, sort_keys=True))


def write_npz(path: str | os.PathLike[str], *args: np.ndarray, **kwargs: np.ndarray) -> str:
  return atomic_write(path, lambda f: np.savez(f, *args, **kwargs), binary=True)

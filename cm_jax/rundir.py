"""A training run's directory on disk: created and probed writable before anything compiles, and
locked against a second launch training into it at the same time.

The lock is the file `<workdir>/lock` (JSON: host, pid, start time), created by process 0 with
O_EXCL and removed when the train mode returns or raises. A lock left by a process that no longer
runs on this host (kill -9, a crash) is stale: the next launch takes it over with a warning. A lock
of a live process, or of another host (whose processes cannot be checked from here), refuses the
launch with one line saying whose it is and what to do.
"""

import contextlib
import errno
import json
import logging
import os
import socket
import time
from typing import Iterator

import jax

from cm_jax import sharding
from cm_jax.errors import WorkdirError

LOCK_NAME = 'lock'
# Orbax writes paths up to ~70 characters below the checkpoint directory (`<step>.orbax-checkpoint-
# tmp-<timestamp>/opt_state/ocdbt.process_<i>/d/<32 hex digits>`): the probe file sits this deep,
# so a path too long for the filesystem fails here instead of in the first save, after training.
_PROBE_DEPTH = 160


def prepare(workdir: str) -> None:
  """Create `workdir` and its `checkpoints/` folder and check that they are writable.

  Every process probes (each writes its own Orbax files); all raise if any fails.

  Raises:
    WorkdirError: the workdir is a file, cannot be created, or cannot be written (permissions, a
      read-only or full filesystem, a path too long), naming the path.
  """
  sharding.raise_if_any('workdir_probe', _probe_error(os.path.abspath(workdir)), WorkdirError)


def _probe_error(workdir: str) -> str | None:
  """What keeps a run from writing into `workdir`, or None."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    return f'--workdir={workdir} is a file, not a directory: pass a directory (new or of a run).'
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  try:
    os.makedirs(ckpt_dir, exist_ok=True)
  except OSError as error:
    hint = ('use a shorter --workdir path' if error.errno == errno.ENAMETOOLONG else
            'pass a --workdir that can be created and written')
    return f'Cannot create the run directory {ckpt_dir} ({_reason(error)}): {hint}.'
  name = f'.write_probe-{socket.gethostname()}-{os.getpid()}'
  probe_dir = os.path.join(ckpt_dir, name)
  probe = os.path.join(probe_dir, 'p' * max(_PROBE_DEPTH - len(name) - 1, 1))
  try:
    os.makedirs(probe_dir, exist_ok=True)
    with open(probe, 'w') as f:
      f.write('probe')
  except OSError as error:
    hint = ('use a shorter --workdir path' if error.errno == errno.ENAMETOOLONG else
            'make it writable or pass another --workdir')
    return f'Cannot write checkpoints into {ckpt_dir} ({_reason(error)}): {hint}.'
  finally:
    with contextlib.suppress(OSError):
      os.remove(probe)
    with contextlib.suppress(OSError):
      os.rmdir(probe_dir)
  return None


def _reason(error: OSError) -> str:
  return error.strerror or type(error).__name__


# --------------------------------------------------------------------------------------------------
# The lock.
# --------------------------------------------------------------------------------------------------
def lock_path(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), LOCK_NAME)


@contextlib.contextmanager
def locked(workdir: str) -> Iterator[None]:
  """Hold the workdir's lock (process 0) while the body runs; every process raises if it is taken.

  Raises:
    WorkdirError: another launch holds the lock.
  """
  path = lock_path(workdir)
  error, mine = None, None
  if jax.process_index() == 0:
    try:
      mine = _acquire(path)
    except WorkdirError as refused:
      error = str(refused)
  sharding.raise_if_any('workdir_lock', error, WorkdirError)
  try:
    yield
  finally:
    if mine is not None:
      _release(path, mine)


def _holder() -> dict:
  return {'host': socket.gethostname(), 'pid': os.getpid(),
          'since': time.strftime('%Y-%m-%d %H:%M:%S'), 'token': f'{time.time_ns()}'}


def _acquire(path: str) -> dict:
  """Create the lock file for this process; take over a stale one; refuse a live one."""
  me = _holder()
  for _ in range(2):  # The second try follows the removal of a stale lock.
    try:
      fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      held = _read(path)
      if not _is_stale(held):
        raise WorkdirError(_refusal(path, held)) from None
      logging.warning('Taking over the stale lock %s of pid %s on %s (since %s): that process no '
                      'longer runs.', path, held.get('pid'), held.get('host'), held.get('since'))
      with contextlib.suppress(FileNotFoundError):
        os.remove(path)
      continue
    with os.fdopen(fd, 'w') as f:
      json.dump(me, f)
    return me
  # Another launch took the stale lock over between our removal and our creation.
  raise WorkdirError(_refusal(path, _read(path)))


def _read(path: str) -> dict:
  try:
    with open(path) as f:
      held = json.load(f)
    return held if isinstance(held, dict) else {}
  except (OSError, ValueError):
    return {}  # Being written by its holder this instant, or damaged: treated as held.


def _is_stale(held: dict) -> bool:
  """A lock of a process of this host that no longer exists."""
  if held.get('host') != socket.gethostname() or not isinstance(held.get('pid'), int):
    return False  # Another host's processes cannot be checked from here.
  try:
    os.kill(held['pid'], 0)
  except ProcessLookupError:
    return True
  except PermissionError:
    return False  # It exists, under another user.
  return False


def _refusal(path: str, held: dict) -> str:
  who = f'pid {held.get("pid", "?")} on {held.get("host", "?")}, since {held.get("since", "?")}'
  if held.get('host') == socket.gethostname() and held.get('pid') == os.getpid():
    return (f'{os.path.dirname(path)} is already being trained by this process (the teacher and '
            'the student need their own workdirs).')
  return (f'{os.path.dirname(path)} is locked by another launch ({who}): wait for it to finish or '
          f'stop it, or use another --workdir. If that launch is not running, remove {path}.')


def _release(path: str, mine: dict) -> None:
  """Remove the lock file if it is still this launch's."""
  if _read(path).get('token') == mine['token']:
    with contextlib.suppress(FileNotFoundError):
      os.remove(path)

"""Where a job's time goes: named phases with their wall and process CPU time, one table at the end.

The train mode opens a job around all it does (`job(workdir)`); the code below it times its work
with `phase(name)`, which is a no-op outside a job (--mode=sample runs the same evaluators untimed).
A train-mode call made inside another (the teacher a distillation trains first) joins the job that
is open, under `scope('teacher')`: its phases are named `teacher: <name>` in that job's table, and
only the outermost call prints the table and writes <workdir>/phases.json (process 0).

A phase counts its own time: a phase opened inside another (the sample grids inside the training
loop) is taken out of the outer one's row, so the rows never overlap and sum to at most the total;
what no phase covers (checks, the lock, logging, writers) is the `other` row. CPU time is
time.process_time: all of this process's threads (XLA's thread pool too, so it can exceed the
wall time), not its child processes. JAX dispatches asynchronously: device work a phase starts but
does not wait for is counted in the phase that next waits for it (the loop fetches its metrics and
the samplers their images, so the training loop and each sampling phase hold their own work).
"""

import contextlib
import dataclasses
import logging
import os
import time
from typing import Callable, Iterator

import jax

from cm_jax import files

# (wall seconds, process CPU seconds), both from clocks that only move forward.
Clock = Callable[[], tuple[float, float]]


def process_clock() -> tuple[float, float]:
  return time.perf_counter(), time.process_time()


@dataclasses.dataclass
class Phase:
  """A named phase's own time, summed over its `count` entries; `steps` when it counts them (the
  training loop), for its time per step."""
  name: str
  wall_s: float = 0.0
  cpu_s: float = 0.0
  count: int = 0
  steps: int | None = None


class PhaseHandle:
  """What a `phase` block gets: set `steps` to the steps it ran, for the table's time per step."""

  def __init__(self):
    self.steps: int | None = None


@dataclasses.dataclass
class _Open:
  """A phase or scope being timed: where it started and how much of it its inner phases took."""
  start: tuple[float, float]
  inner_wall: float = 0.0
  inner_cpu: float = 0.0


class Recorder:
  """The phases of one job, in the order they were first entered, from its creation to `finish`."""

  def __init__(self, clock: Clock = process_clock):
    self._clock = clock
    self._start = clock()
    self._end: tuple[float, float] | None = None
    self._rows: dict[str, Phase] = {}
    self._scopes: dict[str, Phase] = {}
    self._open: list[_Open] = []  # Phases being timed, innermost last.
    self._prefix: list[str] = []

  def _name(self, name: str) -> str:
    return ''.join(f'{p}: ' for p in self._prefix) + name

  @contextlib.contextmanager
  def phase(self, name: str) -> Iterator[PhaseHandle]:
    """Times the block as `name` (prefixed by the open scopes); a name entered again adds up."""
    full = self._name(name)
    row = self._rows.setdefault(full, Phase(full))
    handle, opened = PhaseHandle(), _Open(self._clock())
    self._open.append(opened)
    try:
      yield handle
    finally:
      wall, cpu = self._elapsed(opened.start)
      self._open.pop()
      if self._open:  # The outer phase's own time excludes this one.
        self._open[-1].inner_wall += wall
        self._open[-1].inner_cpu += cpu
      # max: float rounding must not make an own time slightly negative.
      row.wall_s += max(0.0, wall - opened.inner_wall)
      row.cpu_s += max(0.0, cpu - opened.inner_cpu)
      row.count += 1
      if handle.steps is not None:
        row.steps = (row.steps or 0) + handle.steps

  @contextlib.contextmanager
  def scope(self, name: str) -> Iterator[None]:
    """Prefixes the phases of the block with `name: `; its whole time is the scope's subtotal."""
    full = self._name(name)
    start = self._clock()
    self._prefix.append(name)
    try:
      yield
    finally:
      self._prefix.pop()
      wall, cpu = self._elapsed(start)
      scope = self._scopes.setdefault(full, Phase(full))
      scope.wall_s += wall
      scope.cpu_s += cpu
      scope.count += 1

  def finish(self) -> None:
    self._end = self._clock()

  def _elapsed(self, start: tuple[float, float]) -> tuple[float, float]:
    now = self._clock()
    return now[0] - start[0], now[1] - start[1]

  def summary(self) -> dict:
    """The JSON record: the total, each phase's own time and share of the total wall time, the time
    no phase covers (`other`) and each scope's subtotal (`scopes`, already inside the phases)."""
    end = self._end or self._clock()
    wall, cpu = end[0] - self._start[0], end[1] - self._start[1]

    def record(row: Phase) -> dict:
      out = {'name': row.name, 'wall_s': row.wall_s, 'cpu_s': row.cpu_s,
             'share': row.wall_s / wall if wall > 0 else 0.0, 'count': row.count}
      if row.steps is not None:
        out['steps'] = row.steps
        out['s_per_step'] = row.wall_s / row.steps if row.steps else None
      return out
    rows = list(self._rows.values())
    other = Phase('other', max(0.0, wall - sum(r.wall_s for r in rows)),
                  max(0.0, cpu - sum(r.cpu_s for r in rows)), 1)
    return {'total': {'wall_s': wall, 'cpu_s': cpu}, 'phases': [record(r) for r in rows],
            'other': record(other), 'scopes': [record(s) for s in self._scopes.values()]}

  def table(self) -> str:
    """The summary as a markdown table: phases, `other`, the total, then each scope's subtotal."""
    summary = self.summary()
    total = {'name': 'total', **summary['total'], 'share': 1.0}
    scopes = [{**s, 'name': f'{s["name"]} (whole, in the rows above)'} for s in summary['scopes']]
    lines = [('phase', 'wall s', 'CPU s', 'share')]
    for record in summary['phases'] + [summary['other'], total] + scopes:
      lines.append((_label(record), f'{record["wall_s"]:.1f}', f'{record["cpu_s"]:.1f}',
                    f'{100 * record["share"]:.1f}%'))
    widths = [max(len(line[i]) for line in lines) for i in range(4)]

    def row(cells):
      return '| ' + ' | '.join([cells[0].ljust(widths[0])] +
                               [c.rjust(w) for c, w in zip(cells[1:], widths[1:])]) + ' |'
    rule = '|' + '|'.join(['-' * (widths[0] + 2)] + ['-' * (w + 1) + ':' for w in widths[1:]]) + '|'
    return '\n'.join([row(lines[0]), rule] + [row(cells) for cells in lines[1:]])


def _label(record: dict) -> str:
  """The phase's name, with its steps and time per step, or how often it ran when more than once."""
  label = record['name']
  if record.get('steps'):
    label += f' ({record["steps"]} steps, {record["s_per_step"]:.3f} s/step)'
  elif record.get('count', 1) > 1:
    label += f' (x{record["count"]})'
  return label


# The job of the outermost train-mode call in progress; None between jobs.
_job: Recorder | None = None


@contextlib.contextmanager
def job(workdir: str) -> Iterator[None]:
  """Times the block as a whole job: at its end, the table goes to the log and stdout and
  <workdir>/phases.json is written (process 0). Inside a job already open, the block only joins it
  (its phases land in that job's table); a block that raises reports nothing, and each outermost job
  starts afresh."""
  global _job
  if _job is not None:
    yield
    return
  _job = Recorder()
  try:
    yield
    _job.finish()
    _report(_job, workdir)
  finally:
    _job = None


def _report(recorder: Recorder, workdir: str) -> None:
  table = recorder.table()
  logging.info('Where the time went (phases.json in %s):\n%s', workdir, table)
  if jax.process_index() != 0:
    return
  print(f'\nWhere the time went:\n{table}', flush=True)
  path = os.path.join(workdir, 'phases.json')
  try:
    files.write_json(path, recorder.summary())
  except OSError as error:  # The run's outputs are all written: a lost table must not fail it.
    logging.warning('Could not write %s: %s', path, error)


def phase(name: str) -> contextlib.AbstractContextManager[PhaseHandle]:
  """Times the block as `name` in the open job; outside a job, only runs it."""
  if _job is None:
    return contextlib.nullcontext(PhaseHandle())
  return _job.phase(name)


def scope(name: str) -> contextlib.AbstractContextManager[None]:
  """Names the phases of the block `name: <phase>` in the open job; outside a job, only runs it."""
  if _job is None:
    return contextlib.nullcontext()
  return _job.scope(name)

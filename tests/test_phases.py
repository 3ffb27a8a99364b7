"""The phase recorder on a hand-driven clock (own times, prefixes, totals, the table) and the job
around it (one report per outermost call, nested calls joining it, a fresh start each time)."""

import json
import logging

import pytest

from cm_jax import phases


class HandClock:
  """A clock that moves only when told: every time below is exact."""

  def __init__(self):
    self.wall, self.cpu = 100.0, 7.0  # Clocks need not start at 0.

  def __call__(self) -> tuple[float, float]:
    return self.wall, self.cpu

  def advance(self, wall: float, cpu: float) -> None:
    self.wall, self.cpu = self.wall + wall, self.cpu + cpu


def _distillation_like(clock: HandClock) -> phases.Recorder:
  """A build, a teacher (a 5-step loop holding two sample grids), a student loop, untimed gaps."""
  recorder = phases.Recorder(clock)
  with recorder.phase('experiment build'):
    clock.advance(2, 1)
  with recorder.scope('teacher'):
    with recorder.phase('training loop') as loop:
      clock.advance(4, 8)
      for _ in range(2):
        with recorder.phase('sample grids'):
          clock.advance(1.5, 1.5)
      clock.advance(6, 12)
      loop.steps = 5
    clock.advance(1, 1)  # The teacher's untimed work (its lock, its checks).
  with recorder.phase('training loop') as loop:
    clock.advance(3, 6)
    loop.steps = 2
  clock.advance(1.5, 0.5)
  recorder.finish()
  return recorder


def test_phases_count_their_own_time_under_the_scope_prefix():
  summary = _distillation_like(HandClock()).summary()
  rows = {p['name']: p for p in summary['phases']}
  assert list(rows) == ['experiment build', 'teacher: training loop', 'teacher: sample grids',
                        'training loop']
  # The grids are taken out of the loop that holds them: 4 + 6 s, not 13.
  teacher_loop = rows['teacher: training loop']
  assert (teacher_loop['wall_s'], teacher_loop['cpu_s']) == (10, 20)
  assert teacher_loop['s_per_step'] == 2.0
  assert (rows['teacher: sample grids']['wall_s'], rows['teacher: sample grids']['count']) == (3, 2)
  assert 'steps' not in rows['teacher: sample grids']
  assert rows['training loop']['steps'] == 2 and rows['training loop']['s_per_step'] == 1.5
  assert summary['total'] == {'wall_s': 20.5, 'cpu_s': 31.5}
  assert (summary['other']['wall_s'], summary['other']['cpu_s']) == (2.5, 1.5)
  assert sum(p['wall_s'] for p in summary['phases']) + summary['other']['wall_s'] == 20.5
  assert sum(p['share'] for p in summary['phases']) + summary['other']['share'] == pytest.approx(1)
  assert rows['experiment build']['share'] == pytest.approx(2 / 20.5)
  # The teacher's subtotal holds its phases and its untimed second.
  assert [(s['name'], s['wall_s'], s['cpu_s']) for s in summary['scopes']] == [('teacher', 14, 24)]


def test_the_table_adds_up_to_its_total():
  table = _distillation_like(HandClock()).table()
  lines = table.splitlines()
  assert lines[0].split('|')[1].strip() == 'phase' and set(lines[1]) <= set('|-:')
  cells = {line.split('|')[1].strip(): [c.strip() for c in line.split('|')[2:5]]
           for line in lines[2:]}
  assert list(cells) == ['experiment build', 'teacher: training loop (5 steps, 2.000 s/step)',
                         'teacher: sample grids (x2)', 'training loop (2 steps, 1.500 s/step)',
                         'other', 'total', 'teacher (whole, in the rows above)']
  assert cells['total'] == ['20.5', '31.5', '100.0%']
  assert cells['teacher (whole, in the rows above)'] == ['14.0', '24.0', '68.3%']
  above_total = list(cells.values())[:5]
  assert sum(float(wall) for wall, _, _ in above_total) == pytest.approx(20.5)
  assert sum(float(cpu) for _, cpu, _ in above_total) == pytest.approx(31.5)
  assert all(len(line) == len(lines[0]) for line in lines)  # Aligned columns.


def test_a_phase_that_raises_is_still_counted_and_leaves_no_prefix_behind():
  clock = HandClock()
  recorder = phases.Recorder(clock)
  with pytest.raises(RuntimeError):
    with recorder.scope('teacher'), recorder.phase('training loop'):
      clock.advance(3, 3)
      raise RuntimeError('a preemption, say')
  with recorder.phase('frozen inputs load'):
    clock.advance(1, 1)
  rows = {p['name']: p['wall_s'] for p in recorder.summary()['phases']}
  assert rows == {'teacher: training loop': 3, 'frozen inputs load': 1}


def _names(workdir) -> list[str]:
  with open(workdir / 'phases.json') as f:
    return [p['name'] for p in json.load(f)['phases']]


def test_one_report_per_outermost_job_and_each_job_starts_afresh(tmp_path, capsys):
  outer, inner = tmp_path / 'outer', tmp_path / 'outer' / 'teacher'
  outer.mkdir()
  with phases.job(str(outer)):
    with phases.phase('experiment build'):
      pass
    with phases.scope('teacher'), phases.job(str(inner)):  # The nested train-mode call.
      with phases.phase('training loop'):
        pass
  assert _names(outer) == ['experiment build', 'teacher: training loop']
  assert not (inner / 'phases.json').exists()
  printed = capsys.readouterr().out
  assert printed.count('Where the time went') == 1 and '| teacher: training loop' in printed
  with open(outer / 'phases.json') as f:
    record = json.load(f)
  assert sum(p['wall_s'] for p in record['phases']) <= record['total']['wall_s']
  assert [s['name'] for s in record['scopes']] == ['teacher']

  # A job that raises writes nothing, and the next one holds only its own phases.
  failed, second = tmp_path / 'failed', tmp_path / 'second'
  failed.mkdir()
  second.mkdir()
  with pytest.raises(RuntimeError):
    with phases.job(str(failed)), phases.scope('teacher'), phases.phase('training loop'):
      raise RuntimeError('stopped')
  assert not (failed / 'phases.json').exists()
  with phases.job(str(second)):
    with phases.phase('training loop'):
      pass
  assert _names(second) == ['training loop']


def test_phases_outside_a_job_record_nothing(tmp_path):
  # --mode=sample runs the evaluators that time their work, with no job open.
  with phases.scope('teacher'), phases.phase('onestep: sampling') as handle:
    handle.steps = 3
  with phases.job(str(tmp_path)):
    with phases.phase('training loop'):
      pass
  assert _names(tmp_path) == ['training loop']


def test_a_table_that_cannot_be_written_only_warns(tmp_path, caplog):
  blocker = tmp_path / 'a_file'
  blocker.write_text('')  # <blocker>/phases.json cannot be created.
  with caplog.at_level(logging.WARNING), phases.job(str(blocker)):
    with phases.phase('training loop'):
      pass
  assert any('Could not write' in r.getMessage() and r.levelno == logging.WARNING
             for r in caplog.records)

"""benchmarks/reference_cifar10.py's pure logic: round orders, aggregation, shims (no reference needed)."""

import sys

import pytest

from benchmarks import reference_cifar10 as ref


def test_round_orders_alternate():
  assert ref.round_orders(1) == [('ours', 'theirs')]
  assert ref.round_orders(3) == [('ours', 'theirs'), ('theirs', 'ours'), ('ours', 'theirs')]


def _run(side, rnd, wall, cpu, compile_s=10.0):
  return {'side': side, 'round': rnd, 'results': {
      'cd': {'compile_s': compile_s, 'compile_cpu_s': 2 * compile_s,
             'step': {'median_s': wall, 'cpu_median_s': cpu}}}}


def test_aggregate_medians_over_rounds_and_ratio():
  runs = [_run('ours', 1, 2.0, 4.0), _run('theirs', 1, 4.0, 8.0, 20.0),
          _run('theirs', 2, 6.0, 10.0, 20.0), _run('ours', 2, 4.0, 5.0)]
  row = ref.aggregate(runs, ['cd'])['cd']
  assert row['ours']['wall_s'] == 3.0 and row['theirs']['wall_s'] == 5.0
  assert row['ours']['per_round_wall_s'] == [2.0, 4.0]
  assert row['ratio_wall'] == pytest.approx(0.6)
  assert row['ratio_cpu'] == pytest.approx(4.5 / 9.0)
  assert row['ratio_compile'] == pytest.approx(0.5)


def test_aggregate_one_side_missing_has_no_ratio():
  row = ref.aggregate([_run('ours', 1, 2.0, 4.0)], ['cd', 'ct'])
  assert 'ratio_wall' not in row['cd'] and row['ct'] == {}


def test_geomean():
  assert ref.geomean([0.5, 2.0]) == pytest.approx(1.0)
  assert ref.geomean([]) is None


def test_markdown_report_has_ratio_row():
  runs = [_run('ours', 1, 2.0, 4.0), _run('theirs', 1, 4.0, 8.0)]
  for r in runs:
    r.update(load_avg_start=[1.0, 1.0, 1.0], load_avg_end=[2.0, 2.0, 2.0])
  result = {'batch_size': 8, 'runs': runs, 'table': ref.aggregate(runs, ['cd']),
            'machine': {'host_cpu': 'cpu', 'host_cores': 2, 'jax_version': 'x', 'flax_version': 'y'},
            'reference_commit': 'abc', 'settings': {'rounds': 1, 'steps': 1, 'warmup': 1},
            'orders': [('ours', 'theirs')], 'geomean_ratio_wall': 0.5, 'geomean_ratio_cpu': 0.5,
            'command': 'python -m benchmarks.reference_cifar10'}
  text = ref.markdown_report(result)
  assert '| cd | 2 | 4 | **0.50x** | 4 | 8 | **0.50x** |' in text


def test_prng_sequence_shim_splits_like_haiku():
  import jax  # pylint: disable=g-import-not-at-top
  seq = ref._PRNGSequence(jax.random.PRNGKey(0))  # pylint: disable=protected-access
  key, sub = jax.random.split(jax.random.PRNGKey(0))
  assert (next(seq) == sub).all()
  assert (next(seq) == jax.random.split(key)[1]).all()


def test_install_shims_stand_ins(monkeypatch):
  import jax  # pylint: disable=g-import-not-at-top
  monkeypatch.delitem(sys.modules, 'haiku', raising=False)
  monkeypatch.delitem(sys.modules, 'blobfile', raising=False)
  had_tree_map = hasattr(jax, 'tree_map')
  try:
    ref.install_shims()
    assert sys.modules['haiku'].PRNGSequence is ref._PRNGSequence  # pylint: disable=protected-access
    assert 'blobfile' in sys.modules
    assert callable(jax.tree_map)
  finally:
    if not had_tree_map and hasattr(jax, 'tree_map'):
      delattr(jax, 'tree_map')  # Other tests see jax as it is.

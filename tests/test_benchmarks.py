"""Smoke test of the benchmark harness on a tiny digits network: the schema, not the timings."""

import json
import os
import statistics

import jax
import jax.numpy as jnp
import pytest

from benchmarks import run as bench
from cm_jax import checkpointing, trainer
from configs import cifar10_cd, digits_cd, digits_edm

TRAIN_FIELDS = ('compile_s', 'lower_s', 'step', 'images_per_s', 'flops_per_step', 'flops_per_image',
                'achieved_flops_per_s', 'mfu', 'memory', 'last_loss', 'finite')
SAMPLER_FIELDS = ('nfe', 'compile_s', 'run', 'images_per_s', 'flops_per_image', 'mfu', 'memory')


def tiny_digits_cd():
  config = digits_cd.get_config()
  m = config.model
  # One resolution level: the CD step still runs 4 networks, but compiles in half the time.
  m.nf, m.ch_mult, m.num_res_blocks, m.attn_resolutions = 8, (1,), 1, ()
  config.sampling.num_steps = 3  # A 3-level teacher Heun: 5 NFE.
  return config


def test_harness_writes_the_schema_and_the_speedup_is_teacher_over_onestep(tmp_path):
  result = bench.benchmark(tiny_digits_cd(), batch_size=8, warmup=1, steps=1, sample_runs=1,
                           teacher_levels=2, profile_dir=str(tmp_path / 'profile'), profile_steps=1,
                           config_name='tiny digits_cd')
  json_path, md_path = bench.write_outputs(result, str(tmp_path / 'out.json'))
  with open(json_path) as f:
    loaded = json.load(f)  # Everything survives JSON (no numpy or jax scalars left).

  assert loaded['schema_version'] == bench.SCHEMA_VERSION
  assert loaded['settings']['methods'] == ['cd']  # The config's own method by default.
  assert loaded['machine']['backend'] == jax.default_backend()
  cd = loaded['train']['cd']
  assert all(key in cd for key in TRAIN_FIELDS)
  assert cd['distance'] == 'l2' and cd['finite']
  assert len(cd['step']['times_s']) == len(cd['step']['cpu_times_s']) == 1
  # CD: online forward + backward (~3 forwards), target, 2 teacher evaluations: ~6 forwards.
  forward = loaded['model']['forward_flops_per_image']
  assert 4.5 < cd['flops_per_image'] / forward < 7.5
  assert cd['memory']['argument_bytes'] > 0  # XLA's memory analysis is available on CPU.
  if jax.default_backend() == 'cpu':
    assert loaded['device_memory'] is None and cd['mfu'] is None

  sampling = loaded['sampling']
  assert set(sampling) == set(bench.SAMPLERS)
  assert all(key in sampling[name] for name in bench.SAMPLERS for key in SAMPLER_FIELDS)
  assert [sampling[name]['nfe'] for name in bench.SAMPLERS] == [1, 2, 5]
  teacher = sampling['teacher_heun']
  # Timed on 2 levels (3 NFE), reported per NFE at the full 5.
  assert teacher['extrapolated'] and teacher['measured_nfe'] == 3
  assert teacher['run']['median_s'] == pytest.approx(teacher['measured_run']['median_s'] * 5 / 3)
  speedup = loaded['speedup']
  assert speedup['teacher_s'] == teacher['run']['median_s']
  assert speedup['onestep_s'] == sampling['onestep']['run']['median_s']
  assert speedup['onestep_over_teacher'] == speedup['teacher_s'] / speedup['onestep_s']
  assert speedup['twostep_over_teacher'] == speedup['teacher_s'] / speedup['twostep_s']

  with open(md_path) as f:
    table = f.read()
  assert '| cd | l2 |' in table and 'One-step speed-up over the teacher' in table
  traces = [name for _, _, names in os.walk(tmp_path / 'profile' / 'cd') for name in names]
  assert any(name.endswith('.xplane.pb') for name in traces)


def test_method_variants_keep_the_network_and_swap_the_objective():
  config = cifar10_cd.get_config('lpips')
  variants = {label: bench.method_config(config, label) for label in bench.METHOD_LABELS}
  assert {label: bench.method_label(v) for label, v in variants.items()} == {
      label: label for label in bench.METHOD_LABELS}
  assert variants['cd'].to_dict() == config.to_dict()  # The config's own method is kept as is.
  assert variants['ct'].consistency.distance == 'lpips'  # CD/CT keep the config's distance.
  assert variants['ct'].consistency.scale_schedule == 'ct'
  assert variants['ict'].consistency.distance == 'pseudo_huber'
  for variant in variants.values():
    assert variant.model.to_dict() == config.model.to_dict()
  edm = digits_edm.get_config()
  cd = bench.method_config(edm, 'cd')
  assert cd.consistency.distance == 'l2' and cd.consistency.num_scales == 18
  assert bench.resolve_methods(edm, (), all_methods=False) == ['edm']
  with pytest.raises(ValueError, match='unknown'):
    bench.resolve_methods(edm, ('cd', 'lcm'), all_methods=False)


@pytest.mark.parametrize('kind, dtype, peak', [
    ('NVIDIA H100 80GB HBM3', 'bfloat16', 989.4e12), ('NVIDIA H100 PCIe', 'bfloat16', 756e12),
    ('NVIDIA A100-SXM4-40GB', 'float32', 156e12), ('TPU v5 lite', 'bfloat16', 197e12),
    ('TPU v5p', 'bfloat16', 459e12), ('cpu', 'float32', None)])
def test_peak_flops_by_device_kind(kind, dtype, peak):
  assert bench.peak_flops_per_device(kind, dtype) == peak


def test_the_jvp_of_an_scm_step_costs_one_forward():
  """sCT's step is EDM's forward and backward plus the JVP's tangent pass (its primal is the forward
  that carries the gradient), sCD's one teacher forward more: XLA's FLOP count of the lowered steps,
  on abstract weights (nothing is compiled). A separate forward and JVP would add two forwards."""
  config = tiny_digits_cd()
  base = bench.build(config, 8)
  params = checkpointing.with_shardings(base.abstract_state.params, base.state_shardings.params)
  forward = bench.forward_flops(base, params, 8)
  batch = bench.synthetic_batch(base, 8, 0)
  forwards = {}
  for label in ('edm', 'sct', 'scd'):
    exp = bench.build(bench.method_config(config, label), 8)
    exp.resources.provide(teacher_params=params)
    frozen = exp.load_frozen()
    state = jax.eval_shape(lambda p, exp=exp: exp.init_state_fn(p)(jax.random.PRNGKey(0)), params)
    step = trainer.make_train_step(exp, trainer.frozen_shardings_of(frozen))
    lowered = step.lower(state, frozen, batch, jax.ShapeDtypeStruct((), jnp.int32))
    forwards[label] = bench.xla_flops(lowered) / forward
  assert 2.8 < forwards['edm'] < 3.2, forwards
  assert 0.8 < forwards['sct'] - forwards['edm'] < 1.2, forwards
  assert 0.8 < forwards['scd'] - forwards['sct'] < 1.2, forwards


def test_an_ect_step_costs_what_a_ct_step_costs():
  """ECT's step is two forwards and one backward, as CT's: ~4 forwards, 4/3 of an EDM step. Counted
  by XLA's cost analysis of the lowered steps (no compile, no timing)."""
  config = tiny_digits_cd()
  flops = {}
  for label in ('edm', 'ct', 'ect'):
    exp = bench.build(bench.method_config(config, label), 8)
    assert bench.method_label(exp.config) == label
    params = jax.eval_shape(lambda key: exp.model.init(key, exp.image_shape), jax.random.PRNGKey(0))
    state = jax.eval_shape(lambda p: exp.init_state_fn(p)(jax.random.PRNGKey(0)), params)
    batch = {'image': jax.ShapeDtypeStruct((8,) + exp.image_shape, jax.numpy.float32),
             'label': jax.ShapeDtypeStruct((8,), jax.numpy.int32)}
    step = bench.trainer.make_train_step(exp, {})
    flops[label] = bench.xla_flops(step.lower(state, {}, batch, jax.ShapeDtypeStruct((), 'int32')))
  assert flops['ect'] == pytest.approx(flops['ct'], rel=0.05)
  assert flops['ect'] / flops['edm'] == pytest.approx(4 / 3, rel=0.1)
  assert bench.step_distance(bench.method_config(config, 'ect')) == 'l2_norm'


def test_the_fd_figure_is_a_png_with_log_ticks(tmp_path):
  from PIL import Image
  from benchmarks import fd_vs_time
  assert fd_vs_time._log_ticks(3.0, 1200.0) == [5, 10, 20, 50, 100, 200, 500, 1000]
  assert fd_vs_time._nice_ticks(0.0, 9.7) == [0, 2, 4, 6, 8]
  result = {'train': {'edm': {'step': {'median_s': 0.15}}, 'ect': {'step': {'median_s': 0.16}}}}
  assert fd_vs_time.step_seconds(result, 'ect') == 0.16
  assert fd_vs_time.step_seconds(result, 'ect', {'ect': 'edm'}) == 0.15  # --step_time_of=ect=edm.
  with pytest.raises(KeyError, match="no 'cd' step"):
    fd_vs_time.step_seconds(result, 'cd')
  curves = [{'label': 'ECT 1-step', 'colour': (0, 0, 0), 'dashed': False,
             'points': [(6.2, 900.0), (7.0, 12.0), (9.0, 7.5)]},
            {'label': 'ECT 2-step', 'colour': (0, 0, 0), 'dashed': True,
             'points': [(6.2, 60.0), (9.0, 5.1)]}]
  path = str(tmp_path / 'fig.png')
  fd_vs_time.draw_figure(curves, path, 'title', 'minutes', [(6.2, 'teacher trained')])
  with Image.open(path) as image:
    assert image.format == 'PNG' and image.size == (1100, 700)


def test_the_fd_figure_draws_the_runs_that_exist(tmp_path):
  """A figure of whatever runs exist: folders without a run or without checkpoints are named, not
  drawn (no run is scored here: that needs the digits metric)."""
  import numpy as np
  from benchmarks import fd_vs_time
  from cm_jax import checkpointing, config_utils
  from configs import digits_ect
  runs = {name: str(tmp_path / name) for name in ('cd', 'ict', 'ect')}
  for name in ('ict', 'ect'):
    os.makedirs(runs[name])
    config_utils.save_config(digits_ect.get_config(), runs[name])
  ckpt = checkpointing.Checkpointer(os.path.join(runs['ect'], 'checkpoints'), async_save=False)
  ckpt.save(250, {'params': {'w': np.zeros(2, np.float32)}}, {'step': 250})
  ckpt.close()
  found, missing = fd_vs_time.existing_runs([('CD', runs['cd']), ('iCT', runs['ict']),
                                             ('ECT', runs['ect'])])
  assert found == [('ECT', runs['ect'])]
  assert [(label, why.split(' ', 1)[1]) for label, why in missing] == [
      ('CD', 'holds no run'), ('iCT', 'has no checkpoint')]


def test_latency_times_each_sampler_on_one_image():
  exp = bench.build(tiny_digits_cd(), 8)
  params = bench.init_params(exp)
  latency = bench.bench_latency(exp, params, warmup=1, runs=3)
  assert list(latency) == ['onestep', 'twostep', 'teacher_heun']
  assert [r['nfe'] for r in latency.values()] == [1, 2, 5]
  for r in latency.values():
    assert r['output_shape'] == [1, 8, 8, 1]  # One image, whatever the run's batch (8 here).
    assert len(r['times_s']) == r['runs'] == 3  # The warm-up call is not among them.
    assert r['min_ms'] <= r['median_ms'] <= r['p90_ms']
    assert r['median_ms'] == pytest.approx(1e3 * statistics.median(r['times_s']))
  table = bench.markdown_report({**_minimal_result(), 'latency': latency})
  assert '| teacher_heun | 5 |' in table and 'latency median (ms)' in table


def _minimal_result() -> dict:
  """The fields markdown_report reads, for a result with no training step and no sampler table."""
  return {'machine': {'backend': 'cpu', 'host_cores': 2, 'num_devices': 1, 'device_kind': 'cpu',
                      'host_cpu': 'x', 'jax_version': jax.__version__, 'load_avg_start': [0.0],
                      'load_avg_end': [0.0]},
          'settings': {'steps': 1, 'sample_runs': 1, 'warmup': 1}, 'config': 'tiny',
          'config_method': 'cd', 'batch_size': 8, 'num_params': 1, 'dtype': 'float32',
          'train': {}, 'sampling': {}, 'device_memory': None, 'host_peak_rss_bytes': 0,
          'model': {'forward_flops_per_image': None}, 'notes': []}

r"""One benchmark harness: step throughput, sampling speed-up, compile time, memory and FLOPs.

  python -m benchmarks.run --config=configs/cifar10_cd.py --batch=8
  python -m benchmarks.run --config=configs/digits_cd.py --all_methods
  python -m benchmarks.run --config=configs/cifar10_cd.py:l2 --batch=512 --profile_dir=/tmp/profile
  python -m benchmarks.run --config=configs/cifar10_cd.py:l2 --batch=8 --methods=edm,cd,ct,sct,scd
  python -m benchmarks.run --config=configs/cifar10_cd.py:l2 --batch=8 --latency_runs=10

For a config and a global batch it measures, after warm-up: the training step of each method asked
for (the config's own by default; `--methods=edm,cd,ct,ict,ect,sct,scd` or `--all_methods` for
variants of the same network and data shape), the 1-step and 2-step consistency samplers and the EDM teacher's Heun
sampler (35 NFE) on the same network; the one-step speed-up over the teacher at equal batch; the
compile time of each; with --latency_runs, each sampler's latency on one image (batch 1); XLA's
memory analysis, the device's peak memory where the backend reports it and the host's peak RSS;
model FLOPs from XLA's cost analysis and, on GPU/TPU, the fraction of peak FLOP/s.

Weights are random and batches synthetic (of the config's shape): nothing is read from disk, so the
same command runs on a laptop CPU and on a pod. Writes JSON and a markdown table
(benchmarks/README.md says what each field means). No timing here is an assertion: it is a
measurement.
"""

import copy
import json
import os
import platform
import resource
import statistics
import sys
import time
from typing import Any, Callable, Sequence

# TensorFlow comes in through cm_jax.data (TFDS); keep it quiet and off the accelerators.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import ml_collections
import numpy as np

from cm_jax import experiment, files, karras, methods, sharding, trainer
from configs import cifar10_ct, cifar10_ict, default

SCHEMA_VERSION = 1
METHOD_LABELS = ('edm', 'cd', 'ct', 'ict', 'ect', 'sct', 'scd')
SAMPLERS = ('onestep', 'twostep', 'teacher_heun')
# A sampler call expected to take longer than this is timed once, without warm-up (see bench_sampling).
LONG_CALL_S = 30.0

# --------------------------------------------------------------------------------------------------
# Peak FLOP/s per chip, for the model-FLOPs utilisation (MFU).
# --------------------------------------------------------------------------------------------------
# Dense (no sparsity) peaks from the vendors' datasheets: NVIDIA H100 (SXM, PCIe, NVL), H200 and A100
# datasheets; Google Cloud TPU system-architecture pages (v4, v5e, v5p, v6e). The 'float32' entry is
# the rate JAX's default matmul/conv precision runs float32 at: TF32 tensor cores on NVIDIA Ampere and
# later, one bfloat16 pass on TPU. Matched in order against the lower-cased device_kind, so more
# specific names come first. A device not listed gets no MFU (achieved FLOP/s is still reported).
PEAK_FLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ('h100 pcie', {'bfloat16': 756e12, 'float32': 378e12}),
    ('h100 nvl', {'bfloat16': 835e12, 'float32': 418e12}),
    ('h100', {'bfloat16': 989.4e12, 'float32': 494.7e12}),  # SXM ('NVIDIA H100 80GB HBM3').
    ('h200', {'bfloat16': 989.4e12, 'float32': 494.7e12}),
    ('a100', {'bfloat16': 312e12, 'float32': 156e12}),
    ('tpu v4', {'bfloat16': 275e12, 'float32': 275e12}),
    ('tpu v5 lite', {'bfloat16': 197e12, 'float32': 197e12}),
    ('tpu v5e', {'bfloat16': 197e12, 'float32': 197e12}),
    ('tpu v5p', {'bfloat16': 459e12, 'float32': 459e12}),
    ('tpu v5', {'bfloat16': 459e12, 'float32': 459e12}),
    ('tpu v6 lite', {'bfloat16': 918e12, 'float32': 918e12}),
    ('tpu v6e', {'bfloat16': 918e12, 'float32': 918e12}),
)


def peak_flops_per_device(device_kind: str, dtype: str) -> float | None:
  kind = device_kind.lower()
  for name, peaks in PEAK_FLOPS:
    if name in kind:
      return peaks[dtype]
  return None


# --------------------------------------------------------------------------------------------------
# Method variants of one config: same network and data shape, another objective.
# --------------------------------------------------------------------------------------------------
def method_label(config: ml_collections.ConfigDict) -> str:
  """'edm', 'cd', 'ct', 'ict' (a ct run with the iCT curriculum), 'ect', 'sct' or 'scd'."""
  if config.method == 'ct' and config.consistency.scale_schedule == 'ict':
    return 'ict'
  return config.method


def method_config(config: ml_collections.ConfigDict, label: str) -> ml_collections.ConfigDict:
  """`config` with its method swapped for `label`; the config itself when it already is that method.

  Only `method`, `consistency`, `ect`, `scm` and the teacher's bookkeeping change. CD uses the
  paper's CIFAR-10 settings (N = 18, Heun teacher step, mu = 0), CT those of configs/cifar10_ct.py,
  iCT those of configs/cifar10_ict.py, ECT ECT's CIFAR-10 run (configs/default.py `ect`); CD and CT
  keep the config's distance when it has one (else L2), iCT uses its pseudo-Huber. sCT and sCD use
  configs/default.py's `scm` section (every stabiliser on, the adaptive weighting included) on the
  config's network as it is. The cost of a step does not depend on the values of N, mu or ECT's
  stage.
  """
  if label not in METHOD_LABELS:
    raise ValueError(f'Unknown method {label!r}: use one of {", ".join(METHOD_LABELS)}.')
  variant = copy.deepcopy(config)
  if label == method_label(config):
    return variant
  distance = config.consistency.distance if config.method in ('cd', 'ct') else 'l2'
  random_teacher = '(benchmark: random teacher)'  # Never loaded: weights are random.
  if distance == 'pseudo_huber' and label != 'ict':
    distance = 'l2'  # The paper's CD/CT never used it; keep them as published.
  if label == 'edm':
    variant.method = 'edm'
  elif label == 'cd':
    variant.method = 'cd'
    variant.consistency = default.get_config().consistency
    variant.consistency.distance = distance  # Defaults: N = 18, Heun, mu = 0, as the paper's CD.
    if not variant.teacher.config and not variant.teacher.workdir:
      variant.teacher.config = random_teacher
  elif label == 'ect':
    variant.method = 'ect'
    variant.ect = default.get_config().ect
    if not variant.teacher.config and not variant.teacher.workdir:
      variant.teacher.config = random_teacher  # ECT starts from it; the benchmark from random weights.
  elif label == 'ct':
    variant.method = 'ct'
    variant.consistency = cifar10_ct.get_config(distance).consistency
  elif label in ('sct', 'scd'):
    variant.method = label
    variant.scm = default.get_config().scm
    if label == 'scd' and not variant.teacher.config and not variant.teacher.workdir:
      variant.teacher.config = '(benchmark: random teacher)'  # Never loaded: weights are random.
  else:
    variant.method = 'ct'
    variant.consistency = default.get_config().consistency
    cifar10_ict.ict_consistency(variant.consistency)
  return variant


def random_lpips_loader(config) -> Callable[[], Any] | None:
  """LPIPS with random weights: the pretrained ones need not be present, and timing ignores values."""
  if config.method not in ('cd', 'ct') or config.consistency.distance != 'lpips':
    return None
  from cm_jax.evaluation import lpips  # pylint: disable=g-import-not-at-top
  return lambda: lpips.random_lpips_params(config.seed)


# --------------------------------------------------------------------------------------------------
# Measuring: compile, cost and memory analysis, timed calls.
# --------------------------------------------------------------------------------------------------
def compile_timed(jitted, *args, compiler_options=None):
  """(lowered, compiled, times): tracing and XLA compilation timed apart (wall and CPU seconds)."""
  start = time.perf_counter()
  lowered = jitted.lower(*args)
  traced, traced_cpu = time.perf_counter(), time.process_time()
  compiled = lowered.compile(compiler_options=compiler_options)
  done, done_cpu = time.perf_counter(), time.process_time()
  return lowered, compiled, {'lower_s': traced - start, 'compile_s': done - traced,
                             'compile_cpu_s': done_cpu - traced_cpu}


def xla_flops(stage) -> float | None:
  """The flop count of a Lowered or Compiled; cost_analysis() is a dict in jax 0.10, a list before."""
  try:
    cost = stage.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return None  # Some backends do not implement it.
  if not cost:
    return None
  costs = cost if isinstance(cost, (list, tuple)) else [cost]
  flops = [float(c['flops']) for c in costs if c and c.get('flops', -1) >= 0]
  return sum(flops) if flops else None


def memory_analysis(compiled) -> dict | None:
  """XLA's buffer assignment of one executable, per device (available on CPU as well)."""
  try:
    stats = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if stats is None:
    return None
  fields = {'argument_bytes': 'argument_size_in_bytes', 'output_bytes': 'output_size_in_bytes',
            'alias_bytes': 'alias_size_in_bytes', 'temp_bytes': 'temp_size_in_bytes',
            'generated_code_bytes': 'generated_code_size_in_bytes',
            'peak_bytes': 'peak_memory_in_bytes'}
  out = {name: int(getattr(stats, attr)) for name, attr in fields.items() if hasattr(stats, attr)}
  # What the executable holds at once: inputs, outputs not aliased to (donated) inputs, scratch.
  out['total_bytes'] = (out['argument_bytes'] + out['output_bytes'] - out['alias_bytes'] +
                        out['temp_bytes'])
  return out


def device_memory() -> dict | None:
  """The allocator's counters of local device 0 (GPU/TPU); None where the backend has none (CPU)."""
  stats = jax.local_devices()[0].memory_stats()
  if not stats:
    return None
  return {key: int(stats[key]) for key in ('peak_bytes_in_use', 'bytes_in_use', 'bytes_limit')
          if key in stats}


def host_peak_rss_bytes() -> int:
  # ru_maxrss is KiB on Linux, bytes on macOS.
  scale = 1 if sys.platform == 'darwin' else 1024
  return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale


class Stopwatch:
  """Wall time and this process's CPU time (all threads) of each timed call.

  On a shared CPU the wall time grows with the other processes' load while the CPU time barely moves,
  so both are kept: CPU seconds / cores in use is what the call costs on an idle machine.
  """

  def __init__(self):
    self.wall_s, self.cpu_s = [], []

  def __enter__(self):
    self._wall, self._cpu = time.perf_counter(), time.process_time()
    return self

  def __exit__(self, *exc):
    self.wall_s.append(time.perf_counter() - self._wall)
    self.cpu_s.append(time.process_time() - self._cpu)


def summarize(times_s: Sequence[float], cpu_s: Sequence[float] = ()) -> dict:
  summary = {'times_s': list(times_s), 'median_s': statistics.median(times_s),
             'mean_s': statistics.fmean(times_s), 'min_s': min(times_s)}
  if cpu_s:
    summary.update(cpu_times_s=list(cpu_s), cpu_median_s=statistics.median(cpu_s))
  return summary


def utilisation(flops: float | None, seconds: float, peak: float | None) -> tuple:
  """(achieved FLOP/s over all devices, MFU); MFU is None without a peak for the device."""
  if not flops:
    return None, None
  achieved = flops / seconds
  return achieved, (achieved / (peak * jax.device_count()) if peak else None)


# --------------------------------------------------------------------------------------------------
# Inputs: random weights, synthetic batches.
# --------------------------------------------------------------------------------------------------
def init_params(exp: experiment.Experiment):
  """Random network params, created sharded; init compiled unoptimised on CPU as the trainer does."""
  rng = jax.random.PRNGKey(exp.config.seed)
  init = jax.jit(lambda key: exp.model.init(key, exp.image_shape),
                 out_shardings=exp.state_shardings.params)
  options = {'xla_backend_optimization_level': 0} if jax.default_backend() == 'cpu' else None
  return init.lower(rng).compile(compiler_options=options)(rng)


def global_array(values: np.ndarray, sharding_: jax.sharding.Sharding) -> jax.Array:
  # Every process holds the same host array; each puts only its own shards (multi-host safe).
  return jax.make_array_from_callback(values.shape, sharding_, lambda index: values[index])


def synthetic_batch(exp: experiment.Experiment, batch_size: int, seed: int) -> dict:
  """A training batch of the config's shape: images uniform in [-1, 1], random labels."""
  rng = np.random.default_rng(seed)
  images = rng.uniform(-1.0, 1.0, (batch_size,) + exp.image_shape).astype(np.float32)
  num_classes = exp.config.model.num_classes or max(exp.config.data.num_classes, 1)
  labels = rng.integers(0, num_classes, batch_size).astype(np.int32)
  batch_sh = sharding.batch_sharding(exp.mesh)
  return {'image': global_array(images, batch_sh), 'label': global_array(labels, batch_sh)}


def build(config: ml_collections.ConfigDict, batch_size: int) -> experiment.Experiment:
  config = copy.deepcopy(config)
  config.training.batch_size = batch_size  # build_experiment checks it divides over the devices.
  return experiment.build(config, workdir='', load_lpips=random_lpips_loader(config))


# --------------------------------------------------------------------------------------------------
# The training step of one method.
# --------------------------------------------------------------------------------------------------
def step_distance(config: ml_collections.ConfigDict) -> str | None:
  """The distance a consistency step computes (None for EDM)."""
  if config.method in ('cd', 'ct'):
    return config.consistency.distance
  if config.method == 'ect':
    return 'pseudo_huber' if config.ect.huber_c > 0 else 'l2_norm'
  return None


def bench_train_step(exp: experiment.Experiment, params, batch: dict, warmup: int, steps: int,
                     peak: float | None, profile_dir: str = '', profile_steps: int = 0) -> dict:
  """Compile the real train step (trainer.make_train_step), then time `steps` calls after `warmup`."""
  rng = jax.random.PRNGKey(exp.config.seed)
  # A jit output is a fresh buffer, so the donated state never aliases `params` (teacher, samplers).
  state = jax.jit(lambda p: exp.init_state_fn(p)(rng), out_shardings=exp.state_shardings)(params)
  # A random teacher = the student's init, as in a real CD run.
  exp.resources.provide(teacher_params=params)
  frozen = exp.load_frozen()
  step_fn = trainer.make_train_step(exp, trainer.frozen_shardings_of(frozen))
  step_numbers = [jnp.asarray(i, jnp.int32) for i in range(warmup + steps + profile_steps)]
  lowered, compiled, compile_times = compile_timed(step_fn, state, frozen, batch, step_numbers[0])

  watch = Stopwatch()
  for i in range(warmup + steps):
    with watch:
      state, metrics = compiled(state, frozen, batch, step_numbers[i])
      jax.block_until_ready((state, metrics))
  timed = summarize(watch.wall_s[warmup:], watch.cpu_s[warmup:])
  if profile_dir and profile_steps:
    with jax.profiler.trace(profile_dir):
      for i in range(warmup + steps, warmup + steps + profile_steps):
        with jax.profiler.StepTraceAnnotation('train', step_num=i):
          state, metrics = compiled(state, frozen, batch, step_numbers[i])
      jax.block_until_ready((state, metrics))

  batch_size = batch['image'].shape[0]
  flops = xla_flops(lowered)
  achieved, mfu = utilisation(flops, timed['median_s'], peak)
  c = exp.config.consistency
  return {
      'method': exp.config.method,
      'distance': step_distance(exp.config),
      'num_scales_schedule': c.scale_schedule if exp.config.method in ('cd', 'ct') else None,
      **compile_times,
      'warmup_steps': warmup,
      'step': timed,
      'images_per_s': batch_size / timed['median_s'],
      'flops_per_step': flops,
      'flops_per_image': flops / batch_size if flops else None,
      'xla_compiled_flops_per_step': xla_flops(compiled),
      'achieved_flops_per_s': achieved,
      'mfu': mfu,
      'memory': memory_analysis(compiled),
      'device_memory_after': device_memory(),
      'last_loss': float(metrics['loss']),
      'finite': bool(metrics['finite']),
  }


# --------------------------------------------------------------------------------------------------
# Sampling: 1-step, 2-step and the teacher's Heun on the same network.
# --------------------------------------------------------------------------------------------------
def sampler_method(config: ml_collections.ConfigDict, model, teacher_levels: int) -> methods.Method:
  """A CD method over the config whose samplers are the real ones (methods.Method.sampler).

  The consistency samplers use the config's time points when it is a consistency run, the paper's
  CIFAR-10 2-step ts = (0, 11, 17) on N = 18 otherwise; 'teacher_heun' runs `teacher_levels` Karras
  levels (the config's sampling.num_steps when 0: 18 levels = 35 NFE).
  """
  config = copy.deepcopy(config)
  if config.method not in ('cd', 'ct', 'ect'):
    config.consistency = default.get_config().consistency
    config.sampling.ts, config.sampling.sigmas = (0, 11, 17), ()
  if teacher_levels:
    config.sampling.num_steps = teacher_levels
  return methods.get('cd')(config, model, experiment.image_shape_of(config))


def bench_sampler(exp: experiment.Experiment, fn: Callable, nfe: int, params, labels, batch_size: int,
                  warmup: int, runs: int, forward_flops: float | None, peak: float | None) -> dict:
  """Compile one sampler as inference.ShardedSampler jits it, then time `runs` calls after `warmup`."""
  shape = (batch_size,) + exp.image_shape
  jitted = jax.jit(lambda p, key, batch_labels: fn(p, key, batch_labels, shape),
                   out_shardings=sharding.batch_sharding(exp.mesh))
  keys = [jax.random.PRNGKey(i) for i in range(warmup + runs)]
  _, compiled, compile_times = compile_timed(jitted, params, keys[0], labels)
  watch = Stopwatch()
  for key in keys:
    with watch:
      jax.block_until_ready(compiled(params, key, labels))
  timed = summarize(watch.wall_s[warmup:], watch.cpu_s[warmup:])
  # XLA counts a fori_loop body once, so sampler FLOPs are the forward's times the NFE.
  flops = forward_flops * nfe if forward_flops else None
  achieved, mfu = utilisation(flops, timed['median_s'], peak)
  return {
      'nfe': nfe, **compile_times, 'warmup_runs': warmup, 'run': timed,
      'images_per_s': batch_size / timed['median_s'],
      'flops_per_image': flops / batch_size if flops else None,
      'achieved_flops_per_s': achieved, 'mfu': mfu,
      'memory': memory_analysis(compiled), 'device_memory_after': device_memory(),
  }


def bench_latency(exp: experiment.Experiment, params, warmup: int, runs: int) -> dict:
  """Batch-1 latency of the 1-step, 2-step and teacher Heun samplers: median, 90th percentile and
  minimum of `runs` calls after `warmup`, the compile timed apart.

  The paper's "real-time" promise is about one image, which throughput at a large batch does not
  show (a batch-1 call is launch- and latency-bound). One image does not split over devices, so the
  call is jitted without shardings (on a multi-device mesh it runs replicated).
  """
  method = sampler_method(exp.config, exp.model, 0)
  labels = jnp.zeros((1,), jnp.int32) if exp.config.model.num_classes > 0 else None
  shape = (1,) + exp.image_shape
  results = {}
  for name, source in (('onestep', 'onestep'), ('twostep', 'multistep'),
                       ('teacher_heun', 'teacher_heun')):
    sampler = method.sampler(source)
    jitted = jax.jit(lambda p, key, batch_labels, fn=sampler.fn: fn(p, key, batch_labels, shape))
    _, compiled, compile_times = compile_timed(jitted, params, jax.random.PRNGKey(0), labels)
    watch = Stopwatch()
    for i in range(warmup + runs):
      with watch:
        images = jax.block_until_ready(compiled(params, jax.random.PRNGKey(i), labels))
    wall = watch.wall_s[warmup:]
    results[name] = {
        'nfe': sampler.nfe, **compile_times, 'warmup_runs': warmup, 'runs': runs,
        'output_shape': list(images.shape),
        'times_s': list(wall), 'median_ms': 1e3 * statistics.median(wall),
        'p90_ms': 1e3 * float(np.percentile(wall, 90)), 'min_ms': 1e3 * min(wall),
    }
  return results


def forward_flops(exp: experiment.Experiment, params, batch_size: int) -> float | None:
  """FLOPs of one denoiser call on a batch (XLA cost analysis of the unoptimised HLO)."""
  x = jax.ShapeDtypeStruct((batch_size,) + exp.image_shape, jnp.float32)
  sigma = jax.ShapeDtypeStruct((batch_size,), jnp.float32)
  labels = (jax.ShapeDtypeStruct((batch_size,), jnp.int32) if exp.config.model.num_classes > 0
            else None)
  forward = jax.jit(lambda p, x, s, l: exp.model.denoise(p, x, s, l))
  return xla_flops(forward.lower(params, x, sigma, labels))


def bench_sampling(exp: experiment.Experiment, params, batch_size: int, fwd: float | None, warmup: int,
                   runs: int, teacher_warmup: int | None, teacher_runs: int | None,
                   teacher_levels: int, peak: float | None) -> tuple[dict, dict, list[str]]:
  """(per-sampler results, {'speedup', 'teacher_warmup', 'teacher_runs'}, notes).

  `fwd` is one denoiser call's FLOPs at this batch.

  With teacher_runs/teacher_warmup None, the teacher is timed like the other samplers unless one call
  is expected (from the 1-step time per NFE) to take over LONG_CALL_S: then once, without warm-up.
  """
  notes = []
  method = sampler_method(exp.config, exp.model, teacher_levels)
  full_nfe = karras.ode_nfe(exp.config.sampling.num_steps, 'heun')
  labels = None
  if exp.config.model.num_classes > 0:
    values = np.random.default_rng(1).integers(0, exp.config.model.num_classes, batch_size)
    labels = global_array(values.astype(np.int32), sharding.batch_sharding(exp.mesh))
  results = {}
  for name, source in (('onestep', 'onestep'), ('twostep', 'multistep')):
    sampler = method.sampler(source)
    results[name] = bench_sampler(exp, sampler.fn, sampler.nfe, params, labels, batch_size, warmup,
                                  runs, fwd, peak)
  teacher_sampler = method.sampler('teacher_heun')
  fn, nfe = teacher_sampler.fn, teacher_sampler.nfe
  expected_s = results['onestep']['run']['median_s'] * nfe
  long_call = expected_s > LONG_CALL_S
  if teacher_warmup is None:
    teacher_warmup = 0 if long_call else warmup
  if teacher_runs is None:
    teacher_runs = 1 if long_call else runs
  if long_call:
    notes.append(f'teacher_heun: one call is ~{expected_s:.0f} s here, so it was timed '
                 f'{teacher_runs}x after {teacher_warmup} warm-up call(s) (compile is timed apart, '
                 'so the first call is no compile).')
  results['teacher_heun'] = bench_sampler(exp, fn, nfe, params, labels, batch_size, teacher_warmup,
                                          teacher_runs, fwd, peak)
  twostep_sigmas = method.multistep_sigmas()
  results['twostep']['sigmas'] = [s for s in twostep_sigmas if s > exp.config.noise.sigma_min]
  teacher = results['teacher_heun']
  teacher['measured_nfe'] = teacher['nfe']
  teacher['extrapolated'] = teacher['nfe'] != full_nfe
  if teacher['extrapolated']:
    # The levels of one sampler cost the same, so time per NFE carries over to the full grid.
    scale = full_nfe / teacher['nfe']
    measured = teacher['run']
    teacher['run'] = summarize([t * scale for t in measured['times_s']],
                               [t * scale for t in measured['cpu_times_s']])
    teacher['measured_run'], teacher['nfe'] = measured, full_nfe
    teacher['images_per_s'] = batch_size / teacher['run']['median_s']
    if teacher['flops_per_image']:
      teacher['flops_per_image'] *= scale  # Achieved FLOP/s and MFU are per-NFE rates: unchanged.
    notes.append(f'teacher_heun timed at {teacher["measured_nfe"]} NFE ({teacher_levels} levels) and '
                 f'extrapolated per NFE to {full_nfe} NFE.')
  onestep_s = results['onestep']['run']['median_s']
  twostep_s = results['twostep']['run']['median_s']
  teacher_s = teacher['run']['median_s']
  speedup = {'teacher_nfe': teacher['nfe'], 'teacher_s': teacher_s, 'onestep_s': onestep_s,
             'twostep_s': twostep_s, 'onestep_over_teacher': teacher_s / onestep_s,
             'twostep_over_teacher': teacher_s / twostep_s}
  return results, {'speedup': speedup, 'teacher_warmup': teacher_warmup,
                   'teacher_runs': teacher_runs}, notes


# --------------------------------------------------------------------------------------------------
# The whole benchmark.
# --------------------------------------------------------------------------------------------------
def machine_info() -> dict:
  device = jax.devices()[0]
  cpu = platform.processor() or platform.machine()
  if os.path.exists('/proc/cpuinfo'):
    with open('/proc/cpuinfo') as f:
      cpu = next((line.split(':', 1)[1].strip() for line in f if line.startswith('model name')), cpu)
  return {'backend': jax.default_backend(), 'device_kind': device.device_kind,
          'num_devices': jax.device_count(), 'num_processes': jax.process_count(),
          'host_cpu': cpu, 'host_cores': os.cpu_count(), 'jax_version': jax.__version__,
          'python': platform.python_version(), 'platform': platform.platform()}


def resolve_methods(config, names: Sequence[str], all_methods: bool) -> list[str]:
  if all_methods:
    return list(METHOD_LABELS)
  labels = [n.strip() for n in names if n.strip()] or [method_label(config)]
  unknown = [n for n in labels if n not in METHOD_LABELS]
  if unknown:
    raise ValueError(f'--methods={",".join(names)}: unknown {unknown}; use some of '
                     f'{",".join(METHOD_LABELS)}.')
  return labels


def benchmark(config: ml_collections.ConfigDict, batch_size: int, methods_to_time: Sequence[str] = (),
              all_methods: bool = False, warmup: int = 1, steps: int | None = None,
              sample_runs: int | None = None, teacher_runs: int | None = None,
              teacher_warmup: int | None = None, teacher_levels: int = 0, sampling: bool = True,
              profile_dir: str = '', profile_steps: int = 2, config_name: str = '',
              latency_runs: int = 0) -> dict:
  """Run the benchmark; returns the JSON-ready result (see benchmarks/README.md for the fields).

  `steps` and `sample_runs` default to 3 on CPU, 10 elsewhere. The teacher's Heun is timed like the
  other samplers, or once without warm-up when one call would be long (a 35-NFE CIFAR-10 batch takes
  over a minute on a 2-core CPU); `teacher_runs`/`teacher_warmup` override that. `latency_runs` > 0
  also times each sampler on one image (bench_latency).
  """
  on_cpu = jax.default_backend() == 'cpu'
  steps = steps if steps is not None else (3 if on_cpu else 10)
  sample_runs = sample_runs if sample_runs is not None else (3 if on_cpu else 10)
  labels = resolve_methods(config, methods_to_time, all_methods)
  if (min(steps, sample_runs, 1 if teacher_runs is None else teacher_runs) < 1
      or min(warmup, teacher_levels, 0 if teacher_warmup is None else teacher_warmup) < 0):
    raise ValueError('steps, sample_runs and teacher_runs must be >= 1; warmup, teacher_warmup and '
                     'teacher_levels >= 0.')
  load_start = os.getloadavg()
  started = time.perf_counter()

  base = build(config, batch_size)
  peak = peak_flops_per_device(jax.devices()[0].device_kind, config.model.dtype)
  start = time.perf_counter()
  params = init_params(base)
  jax.block_until_ready(params)
  init_s = time.perf_counter() - start
  batch = synthetic_batch(base, batch_size, config.seed)
  notes = ['Random weights and synthetic batches; times exclude data loading.']

  forward = forward_flops(base, params, batch_size)  # Cheap: lowered, never compiled.
  train_results = {}
  for label in labels:
    exp = build(method_config(config, label), batch_size) if label != method_label(config) else base
    if exp.config.method in ('cd', 'ct') and exp.config.consistency.distance == 'lpips':
      notes.append(f'{label}: LPIPS with random weights (cm_jax.evaluation.lpips.random_lpips_params); '
                   'the cost does not depend on the weight values.')
    result = bench_train_step(exp, params, batch, warmup, steps, peak,
                              os.path.join(profile_dir, label) if profile_dir else '', profile_steps)
    # The step's cost in network forwards (EDM ~3: forward + backward; CD ~6 plus the distance).
    result['forward_equivalents'] = (result['flops_per_step'] / forward
                                     if result['flops_per_step'] and forward else None)
    train_results[label] = result
  if 'edm' in train_results:
    # Each step's cost in EDM steps on the same network and batch (sCM's should be ~4/3: the JVP's
    # tangent adds about one forward to EDM's forward + backward).
    edm = train_results['edm']
    for result in train_results.values():
      result['step_over_edm'] = result['step']['median_s'] / edm['step']['median_s']
      result['step_cpu_over_edm'] = result['step']['cpu_median_s'] / edm['step']['cpu_median_s']

  sampling_results, speedup = {}, {}
  if sampling:
    sampling_results, extra, sampling_notes = bench_sampling(
        base, params, batch_size, forward, warmup, sample_runs, teacher_warmup, teacher_runs,
        teacher_levels, peak)
    speedup = extra['speedup']
    teacher_warmup, teacher_runs = extra['teacher_warmup'], extra['teacher_runs']
    notes += sampling_notes

  latency = bench_latency(base, params, warmup, latency_runs) if latency_runs > 0 else {}

  machine = machine_info()
  machine['load_avg_start'] = list(load_start)
  machine['load_avg_end'] = list(os.getloadavg())
  return {
      'schema_version': SCHEMA_VERSION,
      'config': config_name,
      'config_method': method_label(config),
      'machine': machine,
      'batch_size': batch_size,
      'per_device_batch': batch_size // jax.device_count(),
      'image_shape': list(base.image_shape),
      'dtype': config.model.dtype,
      'num_params': int(sum(x.size for x in jax.tree.leaves(params))),
      'settings': {'warmup': warmup, 'steps': steps, 'sample_runs': sample_runs,
                   'teacher_runs': teacher_runs, 'teacher_warmup': teacher_warmup,
                   'teacher_levels': teacher_levels, 'methods': labels,
                   'compilation_cache_dir': jax.config.jax_compilation_cache_dir or None},
      'init_s': init_s,
      'model': {'forward_flops_per_image': forward / batch_size if forward else None},
      'train': train_results,
      'sampling': sampling_results,
      'speedup': speedup,
      'latency': latency,
      'peak_flops_per_device': peak,
      'device_memory': device_memory(),
      'host_peak_rss_bytes': host_peak_rss_bytes(),
      'profile_dir': profile_dir or None,
      'total_s': time.perf_counter() - started,
      'notes': notes,
  }


# --------------------------------------------------------------------------------------------------
# Reports: JSON and a markdown table.
# --------------------------------------------------------------------------------------------------
def _num(value, fmt: str = '.3g', scale: float = 1.0) -> str:
  return '-' if value is None else format(value * scale, fmt)


def markdown_report(result: dict) -> str:
  """The result as markdown: a training-step table, a sampler table, the speed-up, memory, notes."""
  m, s = result['machine'], result['settings']
  cores = f', {m["host_cores"]} cores' if m['backend'] == 'cpu' else ''
  gib = 2 ** -30
  lines = [
      f'### {result["config"] or result["config_method"]} at batch {result["batch_size"]}',
      '',
      f'Machine: {m["num_devices"]} x {m["device_kind"]} ({m["backend"]} backend; host '
      f'{m["host_cpu"]}{cores}), jax {m["jax_version"]}; load average {m["load_avg_start"][0]:.2f} '
      f'at start, {m["load_avg_end"][0]:.2f} at end. {result["num_params"]:,} params, '
      f'{result["dtype"]}. Times are medians of {s["steps"]} steps / {s["sample_runs"]} sampler calls '
      f'after {s["warmup"]} warm-up; "CPU" columns are this process\'s CPU seconds (all threads).',
      '',
      '| step | distance | compile (s) | step (s) | step CPU (s) | images/s | GFLOP/image '
      '| forwards | achieved GFLOP/s | MFU | XLA memory (GiB) | step / EDM step (CPU) |',
      '|---|---|---|---|---|---|---|---|---|---|---|---|',
  ]
  for label, r in result['train'].items():
    total = (r['memory'] or {}).get('total_bytes')
    lines.append(
        f'| {label} | {r["distance"] or "-"} | {r["compile_s"]:.1f} | {r["step"]["median_s"]:.3g} '
        f'| {r["step"]["cpu_median_s"]:.3g} | {r["images_per_s"]:.3g} | {_num(r["flops_per_image"], ".3g", 1e-9)} '
        f'| {_num(r["forward_equivalents"], ".1f")} '
        f'| {_num(r["achieved_flops_per_s"], ".3g", 1e-9)} | {_num(r["mfu"], ".1%")} '
        f'| {_num(total, ".2f", gib)} | {_num(r.get("step_over_edm"), ".2f")} '
        f'({_num(r.get("step_cpu_over_edm"), ".2f")}) |')
  if result['sampling']:
    sp = result['speedup']
    lines += [
        '',
        '| sampler | NFE | compile (s) | time per batch (s) | CPU per batch (s) | images/s '
        '| 1-step speed-up over it | MFU |',
        '|---|---|---|---|---|---|---|---|',
    ]
    for name, r in result['sampling'].items():
      mark = ' (extrapolated)' if r.get('extrapolated') else ''
      lines.append(
          f'| {name} | {r["nfe"]} | {r["compile_s"]:.1f} | {r["run"]["median_s"]:.3g}{mark} '
          f'| {r["run"]["cpu_median_s"]:.3g} | {r["images_per_s"]:.3g} '
          f'| {r["run"]["median_s"] / sp["onestep_s"]:.3g}x | {_num(r["mfu"], ".1%")} |')
    lines += ['', f'One-step speed-up over the teacher\'s Heun {sp["teacher_nfe"]} NFE at equal '
              f'batch: **{sp["onestep_over_teacher"]:.1f}x** (2-step: '
              f'{sp["twostep_over_teacher"]:.1f}x).']
  if result.get('latency'):
    lines += ['', '| sampler at batch 1 | NFE | compile (s) | latency median (ms) | p90 (ms) | min (ms) '
              '| runs |', '|---|---|---|---|---|---|---|']
    for name, r in result['latency'].items():
      lines.append(f'| {name} | {r["nfe"]} | {r["compile_s"]:.1f} | {r["median_ms"]:.3g} '
                   f'| {r["p90_ms"]:.3g} | {r["min_ms"]:.3g} | {r["runs"]} |')
  device_peak = (result['device_memory'] or {}).get('peak_bytes_in_use')
  peak_text = (f'{device_peak * gib:.2f} GiB' if device_peak is not None
               else f'not reported by the {m["backend"]} backend')
  lines += ['', f'Peak device memory: {peak_text}; host peak RSS '
            f'{result["host_peak_rss_bytes"] * gib:.2f} GiB. One forward: '
            f'{_num(result["model"]["forward_flops_per_image"], ".3g", 1e-9)} GFLOP/image.', '']
  lines += [f'- {note}' for note in result['notes']]
  return '\n'.join(lines) + '\n'


def default_out_path(config_name: str, batch_size: int) -> str:
  path, _, variant = config_name.partition(':')
  stem = os.path.splitext(os.path.basename(path))[0] + (f'_{variant}' if variant else '')
  return os.path.join('benchmarks', 'results', f'{stem}_b{batch_size}_{jax.default_backend()}.json')


def write_outputs(result: dict, out_path: str,
                  report: Callable[[dict], str] = markdown_report) -> tuple[str, str]:
  """Write the JSON and, next to it, `report(result)` (same name, .md); returns both paths."""
  files.atomic_write(out_path, lambda f: json.dump(result, f, indent=2))
  md_path = os.path.splitext(out_path)[0] + '.md'
  files.atomic_write(md_path, lambda f: f.write(report(result)))
  return out_path, md_path


# --------------------------------------------------------------------------------------------------
# Command line.
# --------------------------------------------------------------------------------------------------
def main(argv) -> None:
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  flag_values = flags.FLAGS
  try:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    tf.config.set_visible_devices([], 'GPU')  # TF (TFDS) must not take GPU memory from JAX.
  except ImportError:
    pass
  from cm_jax.errors import USER_ERRORS  # pylint: disable=g-import-not-at-top
  config = flag_values.config
  config_name = config_flags.get_config_filename(flag_values['config'])
  batch_size = flag_values.batch or config.training.batch_size
  try:
    result = benchmark(
        config, batch_size, flag_values.methods.split(',') if flag_values.methods else (),
        flag_values.all_methods, flag_values.warmup, flag_values.steps, flag_values.sample_runs,
        flag_values.teacher_runs, flag_values.teacher_warmup, flag_values.teacher_levels,
        not flag_values.skip_sampling, flag_values.profile_dir, flag_values.profile_steps,
        config_name, flag_values.latency_runs)
  except (ValueError, *USER_ERRORS) as error:  # Raised before compiling: say what to change.
    sys.exit(f'{type(error).__name__}: {error}')
  result['command'] = ' '.join(['python -m benchmarks.run'] + sys.argv[1:])
  if jax.process_index() == 0:
    paths = write_outputs(result, flag_values.out or default_out_path(config_name, batch_size))
    print(markdown_report(result))
    print('Wrote', *paths)


def define_flags() -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file('config', None, 'Config file (path.py or path.py:variant).',
                                  lock_config=False)
  flags.DEFINE_integer('batch', 0, 'Global batch (split over all devices); 0: the config\'s.')
  flags.DEFINE_string('methods', '', 'Training steps to time, e.g. edm,cd,ct,ict,ect,sct,scd; '
                      'default: the config\'s method.')
  flags.DEFINE_bool('all_methods', False, 'Time edm, cd, ct, ict, ect, sct and scd on the '
                    'config\'s network.')
  flags.DEFINE_integer('warmup', 1, 'Untimed calls of each step and sampler before timing.')
  flags.DEFINE_integer('steps', None, 'Timed training steps (default 3 on CPU, 10 elsewhere).')
  flags.DEFINE_integer('sample_runs', None, 'Timed calls of each consistency sampler (default 3 on '
                       'CPU, 10 elsewhere).')
  flags.DEFINE_integer('teacher_runs', None, 'Timed teacher Heun calls (default: as --sample_runs, '
                       'or 1 when one call is expected to take over 30 s).')
  flags.DEFINE_integer('teacher_warmup', None, 'Untimed teacher Heun calls (default: as --warmup, '
                       'or 0 when one call is expected to take over 30 s).')
  flags.DEFINE_integer('teacher_levels', 0, 'Time the teacher Heun on this many Karras levels '
                       '(2L-1 NFE) and extrapolate per NFE to the full sampler; 0: run it in full.')
  flags.DEFINE_bool('skip_sampling', False, 'Time only the training steps.')
  flags.DEFINE_integer('latency_runs', 0, 'If > 0, also time the 1-step, 2-step and teacher Heun '
                       'samplers on one image (batch 1), this many calls after --warmup: latency.')
  flags.DEFINE_string('out', '', 'JSON output path (a .md table is written next to it); default '
                      'benchmarks/results/<config>_b<batch>_<backend>.json.')
  flags.DEFINE_string('profile_dir', '', 'If set, a jax.profiler trace of --profile_steps extra '
                      'steps of each method is written under DIR/<method> (TensorBoard/XProf).')
  flags.DEFINE_integer('profile_steps', 2, 'Steps traced per method with --profile_dir.')
  flags.mark_flags_as_required(['config'])


if __name__ == '__main__':
  from absl import app  # pylint: disable=g-import-not-at-top
  define_flags()
  app.run(main)

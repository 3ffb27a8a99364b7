r"""Side-by-side CPU timing of our CIFAR-10 steps and the reference JAX code's (openai/consistency_models_cifar10).

  git clone https://github.com/openai/consistency_models_cifar10 /tmp/consistency_models_cifar10
  python -m benchmarks.reference_cifar10 --reference=/tmp/consistency_models_cifar10
  python -m benchmarks.reference_cifar10 --reference=... --rounds=2 --steps=3 --kinds=forward,edm,cd,ct \
      --out=benchmarks/results/reference_cifar10_b8_cpu.json

The same network (CIFAR-10 NCSN++, 56,395,651 parameters: BigGAN blocks with FIR resampling, Fourier
noise embedding, attention at 16x16, dropout 0), float32, batch 8, random weights and one synthetic
batch, on both sides. Four kinds of call are timed:

- `forward`: one denoiser call D(x, sigma) in eval mode (ours: `Model.denoise`; theirs:
  `jcm.models.utils.get_denoiser_fn`), params an argument of the jitted function.
- `edm`: an EDM training step (ours: `method_config(config, 'edm')`; theirs: `losses.get_step_fn`
  over `losses.get_score_matching_loss_fn` with its KVE SDE).
- `cd`: a CD step, L2 distance, Heun teacher step, N = 18, target = the online params (mu = 0); the
  teacher is a random copy of the network (theirs: `get_consistency_loss_fn(..., solver='heun',
  dsm_target=False, loss_norm='l2')` over `get_step_fn`, as configs/cifar10_ve_cd.py with l2).
- `ct`: a CT step, L2, Euler step from the data (dsm_target), the adaptive N(k)/mu(k) schedule and a
  target network (theirs: configs/cifar10_ve_ct_adaptive.py with l2; `StateWithTarget`).

Ours is built with benchmarks/run.py's own harness (`build`, `method_config`, `init_params`,
`synthetic_batch`, `bench_train_step`) from configs/cifar10_cd.py:l2 with model.dtype = float32: the
real `trainer.make_train_step`, with its shardings, donation, non-finite guard and EMA. Theirs is the
reference's own `get_step_fn` called directly, `jax.pmap`'d over the one CPU device with
axis_name='batch' as its train.py does (its `pmean` needs the axis; one step per call, no scan, as
`n_jitted_steps = 1` in its CD/CT configs). Both are compiled ahead of time (`lower().compile()`,
timed apart) and each call is timed to `block_until_ready`.

Both sides use the same network settings, RAdam and one EMA. The reference's own EDM teacher config
(cifar10_k_ve.py) trains with Adam and dropout 0.13; here its EDM step runs on the CD config's
network (dropout 0, RAdam) so that both sides do the same work.

Rounds: round 1 runs ours then theirs, round 2 theirs then ours, and so on; each side of each round
runs in a fresh subprocess (no shared caches, allocator state or compiled code). The reported figure
of each side and kind is the median over rounds of the per-round medians; the ratio is ours / theirs.

Import shims for the reference (it targets jax 0.4 and imports modules it does not use here); the
reference's files are not changed:

1. `haiku`: a stand-in module with only `PRNGSequence` (next() = split the key, keep one half, as
   haiku's), which its losses and model utils use to draw keys. dm-haiku itself does not import with
   jax 0.10.
2. `blobfile`: an empty stand-in (imported by jcm.checkpoints/jcm.utils for file I/O, not called here).
3. `jax.tree_map`, removed from jax, is set to `jax.tree_util.tree_map` (its get_step_fn calls it).
4. Its network is initialised here with `flax.core.pop(variables, 'params')` instead of
   `mutils.init_model`, whose `variables.pop('params')` expects the FrozenDict of flax < 0.7.
5. Its configs are read from <reference>/configs with that folder imported as the `configs` package
   for the time of the import (our own `configs` package is put back afterwards).

Writes JSON and a markdown table next to it (same name, .md). No timing here is an assertion.
"""

import copy
import importlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import types
from typing import Sequence

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

KINDS = ('forward', 'edm', 'cd', 'ct')
SIDES = ('ours', 'theirs')
BATCH = 8


# --------------------------------------------------------------------------------------------------
# Pure logic: round orders, aggregation, report (tests/test_reference_benchmark.py).
# --------------------------------------------------------------------------------------------------
def round_orders(rounds: int) -> list[tuple[str, str]]:
  """Round 1 ours then theirs, round 2 theirs then ours, alternating."""
  return [SIDES if r % 2 == 0 else SIDES[::-1] for r in range(rounds)]


def aggregate(runs: Sequence[dict], kinds: Sequence[str]) -> dict:
  """{kind: {side: {...medians over rounds...}, 'ratio_wall', 'ratio_cpu'}} from the per-run results.

  Each run is {'side', 'round', 'results': {kind: {'compile_s', 'compile_cpu_s', 'step': {'median_s',
  'cpu_median_s'}}}}. A side's figure is the median over rounds of its per-round medians.
  """
  table = {}
  for kind in kinds:
    row = {}
    for side in SIDES:
      found = [run['results'][kind] for run in runs if run['side'] == side and kind in run['results']]
      if not found:
        continue
      row[side] = {
          'rounds': len(found),
          'wall_s': statistics.median(r['step']['median_s'] for r in found),
          'cpu_s': statistics.median(r['step']['cpu_median_s'] for r in found),
          'compile_s': statistics.median(r['compile_s'] for r in found),
          'compile_cpu_s': statistics.median(r['compile_cpu_s'] for r in found),
          'per_round_wall_s': [r['step']['median_s'] for r in found],
          'per_round_cpu_s': [r['step']['cpu_median_s'] for r in found],
      }
    if 'ours' in row and 'theirs' in row:
      row['ratio_wall'] = row['ours']['wall_s'] / row['theirs']['wall_s']
      row['ratio_cpu'] = row['ours']['cpu_s'] / row['theirs']['cpu_s']
      row['ratio_compile'] = row['ours']['compile_s'] / row['theirs']['compile_s']
    table[kind] = row
  return table


def markdown_report(result: dict) -> str:
  m = result['machine']
  loads = ', '.join(f'{run["side"]} r{run["round"]}: {run["load_avg_start"][0]:.1f} -> '
                    f'{run["load_avg_end"][0]:.1f}' for run in result['runs'])
  lines = [
      f'### CIFAR-10 NCSN++ at batch {result["batch_size"]}, float32: ours against the reference JAX '
      'code',
      '',
      f'Machine: {m["host_cpu"]}, {m["host_cores"]} cores, jax {m["jax_version"]}, flax '
      f'{m["flax_version"]}; reference commit {result["reference_commit"] or "unknown"}. '
      f'{result["settings"]["rounds"]} rounds (orders: '
      f'{"; ".join(" then ".join(o) for o in result["orders"])}), each side in a fresh process, '
      f'{result["settings"]["steps"]} timed calls after {result["settings"]["warmup"]} warm-up per '
      f'kind; figures are medians over rounds of per-round medians. Load average (1 min) per run: '
      f'{loads}.',
      '',
      '| call | ours (s) | theirs (s) | ours / theirs | ours CPU (s) | theirs CPU (s) | ours / theirs '
      '(CPU) | compile ours (s) | compile theirs (s) |',
      '|---|---|---|---|---|---|---|---|---|',
  ]
  for kind, row in result['table'].items():
    if 'ratio_wall' not in row:
      continue
    o, t = row['ours'], row['theirs']
    lines.append(f'| {kind} | {o["wall_s"]:.3g} | {t["wall_s"]:.3g} | **{row["ratio_wall"]:.2f}x** '
                 f'| {o["cpu_s"]:.3g} | {t["cpu_s"]:.3g} | **{row["ratio_cpu"]:.2f}x** '
                 f'| {o["compile_s"]:.1f} | {t["compile_s"]:.1f} |')
  if result.get('geomean_ratio_cpu'):
    lines += ['', f'Geometric mean of the step ratios (edm, cd, ct): wall '
              f'{result["geomean_ratio_wall"]:.2f}x, CPU {result["geomean_ratio_cpu"]:.2f}x.']
  lines += ['', f'Command: `{result["command"]}`', '']
  return '\n'.join(lines) + '\n'


def geomean(values: Sequence[float]) -> float | None:
  values = [v for v in values if v]
  if not values:
    return None
  return float(statistics.geometric_mean(values))


# --------------------------------------------------------------------------------------------------
# One call kind, timed the harness's way (compile apart, then warm-up + timed calls).
# --------------------------------------------------------------------------------------------------
def time_compiled(jitted, args_fn, warmup: int, steps: int, carry=None) -> dict:
  """Compile `jitted` on args_fn(None), then call warmup + steps times; `carry(out, args) -> args` feeds
  a step's output state into the next call (None: same args every call)."""
  import jax  # pylint: disable=g-import-not-at-top
  from benchmarks import run  # pylint: disable=g-import-not-at-top
  args = args_fn()
  _, compiled, times = run.compile_timed(jitted, *args)
  watch = run.Stopwatch()
  for _ in range(warmup + steps):
    with watch:
      out = compiled(*args)
      jax.block_until_ready(out)
    if carry is not None:
      args = carry(out, args)
  return {**times, 'step': run.summarize(watch.wall_s[warmup:], watch.cpu_s[warmup:])}


# --------------------------------------------------------------------------------------------------
# Ours.
# --------------------------------------------------------------------------------------------------
def run_ours(kinds: Sequence[str], warmup: int, steps: int) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from benchmarks import run  # pylint: disable=g-import-not-at-top
  from configs import cifar10_cd  # pylint: disable=g-import-not-at-top

  config = cifar10_cd.get_config('l2')
  config.model.dtype = 'float32'
  base = run.build(config, BATCH)
  params = run.init_params(base)
  batch = run.synthetic_batch(base, BATCH, config.seed)
  results = {'num_params': int(sum(x.size for x in jax.tree.leaves(params)))}
  for kind in kinds:
    if kind == 'forward':
      sigma = jnp.linspace(0.002, 80.0, BATCH, dtype=jnp.float32)
      forward = jax.jit(lambda p, x, s: base.model.denoise(p, x, s, None))
      results[kind] = time_compiled(forward, lambda: (params, batch['image'], sigma), warmup, steps)
    else:
      exp = run.build(run.method_config(config, kind), BATCH)
      r = run.bench_train_step(exp, params, batch, warmup, steps, None)
      results[kind] = {key: r[key] for key in ('lower_s', 'compile_s', 'compile_cpu_s', 'step',
                                                'flops_per_step', 'memory', 'last_loss', 'finite')}
  return results


# --------------------------------------------------------------------------------------------------
# Theirs: the reference's jcm package behind the import shims of the module docstring.
# --------------------------------------------------------------------------------------------------
class _PRNGSequence:
  """haiku.PRNGSequence as jcm uses it: built from a key, next() splits off a fresh subkey."""

  def __init__(self, key_or_seed):
    import jax  # pylint: disable=g-import-not-at-top
    self._key = (jax.random.PRNGKey(key_or_seed) if isinstance(key_or_seed, int) else key_or_seed)

  def __iter__(self):
    return self

  def __next__(self):
    import jax  # pylint: disable=g-import-not-at-top
    self._key, subkey = jax.random.split(self._key)
    return subkey

  @property
  def internal_state(self):
    return self._key


def install_shims() -> None:
  """Shims 1-3 of the module docstring."""
  import jax  # pylint: disable=g-import-not-at-top
  haiku = types.ModuleType('haiku')
  haiku.PRNGSequence = _PRNGSequence
  sys.modules.setdefault('haiku', haiku)
  sys.modules.setdefault('blobfile', types.ModuleType('blobfile'))
  if not hasattr(jax, 'tree_map'):
    jax.tree_map = jax.tree_util.tree_map


def reference_config(reference: str, name: str):
  """<reference>/configs/<name>.py's get_config(), its folder imported as `configs` meanwhile (shim 5)."""
  ours = {k: sys.modules.pop(k) for k in list(sys.modules) if k == 'configs' or k.startswith('configs.')}
  package = types.ModuleType('configs')  # Its folder has no __init__.py: ours would win the search.
  package.__path__ = [os.path.join(reference, 'configs')]
  sys.modules['configs'] = package
  try:
    return importlib.import_module(f'configs.{name}').get_config()
  finally:
    for k in [k for k in sys.modules if k == 'configs' or k.startswith('configs.')]:
      del sys.modules[k]
    sys.modules.update(ours)


def run_theirs(reference: str, kinds: Sequence[str], warmup: int, steps: int) -> dict:
  import flax  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  install_shims()
  cd_config = reference_config(reference, 'cifar10_ve_cd')
  ct_config = reference_config(reference, 'cifar10_ve_ct_adaptive')
  for c in (cd_config, ct_config):
    c.training.loss_norm = 'l2'
  if reference not in sys.path:
    sys.path.append(reference)
  from jcm import losses, sde_lib  # pylint: disable=g-import-not-at-top
  from jcm.models import ncsnpp, utils as mutils  # pylint: disable=g-import-not-at-top,unused-import

  m = cd_config.model
  sde = sde_lib.KVESDE(t_min=m.t_min, t_max=m.t_max, N=m.num_scales, rho=m.rho, data_std=m.data_std)
  model = mutils.get_model(m.name)(config=cd_config)
  shape = (BATCH, cd_config.data.image_size, cd_config.data.image_size, cd_config.data.num_channels)
  # Shim 4: mutils.init_model's variables.pop('params') wants a FrozenDict.
  # Compiled unoptimised on CPU, as benchmarks.run.init_params does ours (init is not timed).
  init = jax.jit(lambda k1, k2: model.init({'params': k1, 'dropout': k2}, jnp.zeros((1,) + shape[1:]),
                                           jnp.zeros((1,)), train=False))
  keys = (jax.random.PRNGKey(0), jax.random.PRNGKey(1))
  options = {'xla_backend_optimization_level': 0} if jax.default_backend() == 'cpu' else None
  variables = init.lower(*keys).compile(compiler_options=options)(*keys)
  model_state, params = flax.core.pop(variables, 'params')
  results = {'num_params': int(sum(x.size for x in jax.tree.leaves(params)))}
  images = np.random.default_rng(0).uniform(-1, 1, shape).astype(np.float32)
  # As its datasets.py: a leading device axis (pmap), and the mask its losses weight by.
  batch = {'image': jnp.asarray(images)[None], 'mask': jnp.ones((1, BATCH), jnp.float32)}
  copy_tree = lambda tree: jax.tree.map(jnp.array, tree)  # Distinct buffers for each state field.
  replicate = lambda tree: jax.tree.map(lambda x: jnp.asarray(x)[None], tree)

  for kind in kinds:
    if kind == 'forward':
      sigma = jnp.linspace(0.002, 80.0, BATCH, dtype=jnp.float32)
      forward = jax.jit(lambda p, x, t: mutils.get_denoiser_fn(sde, model, p, model_state)(x, t))
      results[kind] = time_compiled(forward, lambda: (params, jnp.asarray(images), sigma), warmup, steps)
      continue
    config = ct_config if kind == 'ct' else copy.deepcopy(cd_config)
    optimizer, optimize_fn = losses.get_optimizer(config)
    if kind == 'edm':
      config.training.loss = 'dsm'
      loss_fn = losses.get_score_matching_loss_fn(sde, model, train=True)
    else:
      t = config.training
      # Its get_loss_fn restores the teacher from ref_model_path; a random copy of the network here.
      loss_fn = losses.get_consistency_loss_fn(
          sde, model, copy_tree(params), model_state, model, train=True, loss_norm=t.loss_norm,
          weighting=t.weighting, stopgrad=t.stopgrad, dsm_target=t.dsm_target, solver=t.solver)
    step_fn = losses.get_step_fn(loss_fn, train=True, optimize_fn=optimize_fn,
                                 ema_scales_fn=losses.get_ema_scales_fn(config))
    fields = dict(step=0, lr=config.optim.lr, ema_rate=config.model.ema_rate,
                  params=copy_tree(params), params_ema=copy_tree(params), model_state=model_state,
                  opt_state=optimizer.init(params), rng_state=jax.random.PRNGKey(2))
    if kind == 'ct':  # As its train.py: StateWithTarget for the *_adaptive losses.
      state = mutils.StateWithTarget(target_params=copy_tree(params), **fields)
    else:
      state = mutils.State(**fields)
    carry0 = (jax.random.PRNGKey(3)[None], replicate(state))
    p_step = jax.pmap(step_fn, axis_name='batch')  # As its train.py (there over lax.scan of steps).
    results[kind] = time_compiled(p_step, lambda: (carry0, batch), warmup, steps,
                                  carry=lambda out, args: (out[0], args[1]))
    results[kind]['last_loss'] = None
  return results


# --------------------------------------------------------------------------------------------------
# Driver: one subprocess per side and round.
# --------------------------------------------------------------------------------------------------
def child(side: str, reference: str, kinds: Sequence[str], warmup: int, steps: int, out: str) -> None:
  load_start = list(os.getloadavg())
  start_wall, start_cpu = time.perf_counter(), time.process_time()
  results = (run_ours(kinds, warmup, steps) if side == 'ours'
             else run_theirs(reference, kinds, warmup, steps))
  record = {'side': side, 'results': results, 'load_avg_start': load_start,
            'load_avg_end': list(os.getloadavg()), 'total_s': time.perf_counter() - start_wall,
            'total_cpu_s': time.process_time() - start_cpu}
  with open(out, 'w') as f:
    json.dump(record, f, indent=2, default=float)


def reference_commit(reference: str) -> str | None:
  try:
    return subprocess.run(['git', '-C', reference, 'rev-parse', 'HEAD'], capture_output=True,
                          text=True, check=True).stdout.strip() or None
  except (OSError, subprocess.CalledProcessError):
    return None


def machine_info() -> dict:
  import flax  # pylint: disable=g-import-not-at-top
  from benchmarks import run  # pylint: disable=g-import-not-at-top
  info = run.machine_info()
  info['flax_version'] = flax.__version__
  return info


def build_result(runs: Sequence[dict], kinds: Sequence[str], orders, reference: str, rounds: int,
                 warmup: int, steps: int, commit: str = '') -> dict:
  """The JSON-ready result of the child runs (also used to assemble saved child JSONs by hand)."""
  table = aggregate(runs, kinds)
  step_kinds = [k for k in ('edm', 'cd', 'ct') if 'ratio_wall' in table.get(k, {})]
  return {
      'batch_size': BATCH, 'dtype': 'float32',
      'num_params': {run_['side']: run_['results']['num_params'] for run_ in runs},
      'reference': reference, 'reference_commit': commit or reference_commit(reference),
      'machine': machine_info(),
      'settings': {'rounds': rounds, 'warmup': warmup, 'steps': steps, 'kinds': list(kinds)},
      'orders': [list(o) for o in orders], 'runs': list(runs), 'table': table,
      'geomean_ratio_wall': geomean([table[k]['ratio_wall'] for k in step_kinds]),
      'geomean_ratio_cpu': geomean([table[k]['ratio_cpu'] for k in step_kinds]),
      'command': ' '.join(['python -m benchmarks.reference_cifar10'] + sys.argv[1:]),
  }


def main(argv) -> None:
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  kinds = [k.strip() for k in f.kinds.split(',') if k.strip()]
  unknown = [k for k in kinds if k not in KINDS]
  if unknown or not kinds:
    sys.exit(f'--kinds={f.kinds}: use some of {",".join(KINDS)}.')
  reference = os.path.abspath(os.path.expanduser(f.reference))
  if not os.path.isdir(os.path.join(reference, 'jcm')):
    sys.exit(f'--reference={f.reference}: no jcm/ there; clone '
             'https://github.com/openai/consistency_models_cifar10 and pass its folder.')
  if f.child_side:
    child(f.child_side, reference, kinds, f.warmup, f.steps, f.child_out)
    return
  started = time.perf_counter()
  runs = []
  orders = round_orders(f.rounds)
  with tempfile.TemporaryDirectory() as tmp:
    for r, order in enumerate(orders, 1):
      for side in order:
        out = os.path.join(tmp, f'{side}_{r}.json')
        cmd = [sys.executable, '-m', 'benchmarks.reference_cifar10', f'--reference={reference}',
               f'--kinds={",".join(kinds)}', f'--warmup={f.warmup}', f'--steps={f.steps}',
               f'--child_side={side}', f'--child_out={out}']
        print(f'round {r}: {side} ...', flush=True)
        subprocess.run(cmd, check=True)
        with open(out) as fh:
          record = json.load(fh)
        record['round'] = r
        runs.append(record)
        summary = ', '.join(f'{k} {v["step"]["median_s"]:.3g} s ({v["step"]["cpu_median_s"]:.3g} CPU-s)'
                            for k, v in record['results'].items() if isinstance(v, dict))
        print(f'round {r}: {side}: {summary}', flush=True)
  result = build_result(runs, kinds, orders, reference, f.rounds, f.warmup, f.steps,
                        f.reference_commit)
  result['total_s'] = time.perf_counter() - started
  from benchmarks import run  # pylint: disable=g-import-not-at-top
  _, md_path = run.write_outputs(result, f.out, markdown_report)
  print(markdown_report(result))
  print('Wrote', f.out, md_path)


def define_flags() -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string('reference', None, 'A clone of openai/consistency_models_cifar10 (the folder '
                      'holding jcm/ and configs/).')
  flags.DEFINE_string('reference_commit', '', 'The reference\'s commit, for the report; default: '
                      '`git rev-parse HEAD` in --reference (an exported copy has no .git).')
  flags.DEFINE_integer('rounds', 2, 'Rounds; odd rounds run ours first, even rounds theirs first.')
  flags.DEFINE_integer('warmup', 1, 'Untimed calls of each kind before timing.')
  flags.DEFINE_integer('steps', 3, 'Timed calls of each kind per round.')
  flags.DEFINE_string('kinds', ','.join(KINDS), 'Calls to time, some of forward,edm,cd,ct.')
  flags.DEFINE_string('out', os.path.join('benchmarks', 'results', 'reference_cifar10_b8_cpu.json'),
                      'JSON output path (a .md table is written next to it).')
  flags.DEFINE_string('child_side', '', 'Internal: run one side in this process.')
  flags.DEFINE_string('child_out', '', 'Internal: where the child writes its JSON.')
  flags.mark_flags_as_required(['reference'])


if __name__ == '__main__':
  from absl import app  # pylint: disable=g-import-not-at-top
  define_flags()
  app.run(main)

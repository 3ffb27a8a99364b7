r"""`--mode=sample`: samples of a trained run, sharded over every device and process.

  python launch.py --config=configs/digits_cd.py --workdir=runs/digits --mode=sample
  python launch.py --config=configs/digits_cd.py --workdir=runs/digits --mode=sample \
      --config.sampling.sampler=onestep
  python launch.py --config=configs/digits_cd.py --workdir=runs/digits --mode=sample \
      --config.sampling.ts="(0, 5, 17)"              # or --config.sampling.sigmas="(80.0, 0.8)"
  python launch.py --config=configs/digits_cd.py --workdir=runs/digits --mode=sample \
      --config.sampling.sampler=teacher_heun        # the CD run's EDM teacher, 35 NFE
  python launch.py --config=configs/digits_cd.py --workdir=runs/digits --mode=sample \
      --config.sampling.search_steps=2              # greedy ternary search of the time points first

Samplers: 'onestep' and 'multistep' (CM Alg. 1; consistency runs), 'heun' and 'euler' (EDM runs) and
'teacher_heun' (a CD run's teacher). N samples go to
<workdir>/samples/<sampler>_nfe<k>/samples_{N}x{H}x{W}x{C}.npz (arr_0 uint8 NHWC, arr_1 labels when
class-conditional) with a grid.png beside it, and the digits metric (on the embedded dataset) to
<workdir>/metrics.json. Batch b draws its noise from fold_in(PRNGKey(sampling.seed), b), padded to a
multiple of the devices by rows that are dropped: a seed gives the same samples on any number of
devices and processes.

The search (CM paper, Sec. 6; cm_jax.evaluators.time_search) finds the time points first, then
samples with them as 'multistep_searched'.
"""

import json
import os
from typing import Any

import ml_collections

from cm_jax import evaluators, inference
from cm_jax.errors import ConfigError
from cm_jax.evaluators import image_metrics, time_search

SEARCHED = 'multistep_searched'


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Sample the run in `workdir` as config.sampling says (after the time search, if asked).

  Returns:
    {'sampler', 'nfe', 'num_samples', 'npz', 'grid', metric values...} and, after a search,
    'ts', 'sigmas' and 'search_scores'.
  """
  workdir = os.path.abspath(workdir)
  s = config.sampling
  if s.batch_size < 1 or s.num_samples < 1:
    raise ConfigError(f'sampling.batch_size={s.batch_size} and sampling.num_samples={s.num_samples} '
                      'must be >= 1.')
  searching = s.search_steps > 0
  if searching and s.sampler not in ('', 'multistep'):
    raise ConfigError(f'sampling.search_steps={s.search_steps} searches the time points of the '
                      f"'multistep' sampler, not of sampling.sampler={s.sampler!r}.")
  # First: a run of another model (or none) fails in seconds, before the metric's set-up.
  restored = inference.restore(config, workdir)
  scorer = image_metrics.training_scorer(config)
  if searching:  # Fails now, not after the samples, if the metric cannot be used.
    score = time_search.search_score_fn(config, scorer or image_metrics.scorer(config, workdir))
  exp = restored.exp
  extra = {'step': restored.step}
  if searching:
    search = evaluators.create('time_search', exp, score)
    ts, scores = search.run(restored.params(), s.search_steps, s.search_num_samples, s.seed,
                            min(s.batch_size, s.search_num_samples))
    sigmas = [float(search.grid[t]) for t in ts]
    extra.update(ts=list(ts), sigmas=sigmas, search_metric=s.search_metric,
                 search_num_samples=s.search_num_samples,
                 search_scores={json.dumps(list(k)): v for k, v in scores.items()})
    samplers = {SEARCHED: exp.method.multistep_sampler(sigmas)}
  else:
    name = s.sampler or exp.method.default_sampler
    samplers = {name: exp.method.sampler(name)}
  results = evaluators.create('samples', exp, s.num_samples, scorer).run(
      restored.params, samplers, restored.step, extra)
  return next(iter(results.values()))


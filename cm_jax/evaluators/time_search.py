"""The greedy ternary search of multistep time points (CM paper, Sec. 6) on a trained run.

Step 2's point is found by ternary search of its index on the run's N-grid, minimising a metric of
the samples (sampling.search_metric: 'digits_fd' on the embedded digits, else 'fid'), then the 3rd,
... up to sampling.search_steps steps. Every candidate samples with the same seed (common random
numbers), and all share one compiled sampler: the sigmas are an argument, not constants.
"""

import logging
import time
from typing import Callable

import jax.numpy as jnp
import numpy as np

from cm_jax import inference, sampling
from cm_jax.errors import ConfigError
from cm_jax.experiment import Experiment


def search_score_fn(config, scorer) -> Callable[[np.ndarray], float]:
  """images -> sampling.search_metric (lower is better), checked before anything samples."""
  name = config.sampling.search_metric
  if name not in scorer.search_metrics:
    raise ConfigError(f'sampling.search_metric={name!r} does not apply to data.name='
                      f'{config.data.name!r}: use one of {", ".join(map(repr, scorer.search_metrics))}.')
  return lambda images: scorer.search_score(name, images)


class TimeSearchEvaluator:
  """Searches the time points of the run's consistency function; `score` maps samples to a metric."""

  def __init__(self, exp: Experiment, score: Callable[[np.ndarray], float]):
    self.exp, self.score = exp, score
    self.grid = exp.method.time_grid()
    if self.grid is None:
      raise ConfigError(f'sampling.search_steps={exp.config.sampling.search_steps} searches '
                        f'consistency-model time points; this is a {exp.config.method} run. Leave '
                        'search_steps at 0.')

  def run(self, params, num_steps: int, num_samples: int, seed: int, batch_size: int
          ) -> tuple[tuple[int, ...], dict[tuple[int, ...], float]]:
    """(ts, {ts: score} of every candidate): `num_steps`-step time points as N-grid indices."""
    exp = self.exp
    sample_fn = lambda packed, rng, labels, shape: exp.method.multistep_fn(packed[1])(
        packed[0], rng, labels, shape)
    sampler = inference.ShardedSampler(sample_fn, exp.mesh, exp.image_shape, batch_size,
                                       exp.config.model.num_classes)

    def score(ts):
      # The trailing N-1 (eps) costs nothing (Alg. 1 skips it), so it is left out of the sigmas.
      sigmas = jnp.asarray(self.grid[list(ts[:-1])])
      images, _ = sampler((params, sigmas), num_samples, seed)
      return self.score(images)

    start = time.time()
    ts, scores = sampling.greedy_time_search(score, len(self.grid), num_steps)
    logging.info('Time search (%.0f s, %d candidates): ts=%s, score %.5g.', time.time() - start,
                 len(scores), ts, scores[ts])
    return ts, scores

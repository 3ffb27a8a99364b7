"""Evaluators: what a run measures and writes, each built from an experiment and run on its params.

  grid          sample grids during training (PNG + TensorBoard)           grid.GridEvaluator
  samples       samples npz + grid + image metrics of each sampler          samples.SamplesEvaluator
                (end of training, --mode=sample)
  time_search   the ternary search of multistep time points (CM Sec. 6)     time_search.TimeSearchEvaluator

The image metrics they score with (digits metric; FID / IS / precision-recall) are
`image_metrics.scorer(config, workdir)`; --mode=eval scores with it directly.
"""

from cm_jax.errors import choose
from cm_jax.evaluators.grid import GridEvaluator
from cm_jax.evaluators.samples import SamplesEvaluator
from cm_jax.evaluators.time_search import TimeSearchEvaluator

EVALUATORS = {'grid': GridEvaluator, 'samples': SamplesEvaluator, 'time_search': TimeSearchEvaluator}


def create(name: str, *args, **kwargs):
  """The evaluator of a name, built with the arguments of its class."""
  return choose(EVALUATORS, name, 'evaluator')(*args, **kwargs)

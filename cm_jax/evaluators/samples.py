"""Samples of each sampler: the npz (the reference evaluator's format), a grid, the image metrics,
one record in metrics.json and TensorBoard. Written when training ends and by --mode=sample."""

import logging
import time

from cm_jax import inference, methods, outputs, phases
from cm_jax.experiment import Experiment


class SamplesEvaluator:
  """`num_samples` samples of each sampler, in batches of sampling.batch_size, with sampling.seed.

  `scorer` (cm_jax.evaluators.image_metrics) scores them when given.
  """

  def __init__(self, exp: Experiment, num_samples: int, scorer=None, writer=None):
    self.exp, self.num_samples, self.scorer, self.writer = exp, num_samples, scorer, writer

  def run(self, params_of: inference.ParamsOf, samplers: dict[str, methods.Sampler], step: int,
          extra: dict | None = None) -> dict[str, dict]:
    """{sampler name: result record} after writing each sampler's outputs."""
    config, results = self.exp.config, {}
    s = config.sampling
    for name, sampler in samplers.items():
      start = time.time()
      # Timed apart in the train mode's phase table; a sampler's first call also compiles it.
      with phases.phase(f'{name}: sampling'):
        images, labels = inference.sample_images(self.exp, params_of, name, sampler,
                                                 self.num_samples, s.seed,
                                                 min(s.batch_size, self.num_samples))
      logging.info('%d %s samples (NFE %d) in %.1f s.', images.shape[0], name, sampler.nfe,
                   time.time() - start)
      scores = {}
      if self.scorer is not None:
        with phases.phase(f'{name}: metric'):
          scores = self.scorer(images)
      with phases.phase(f'{name}: writing outputs'):
        results[name] = outputs.write_sample_outputs(
            self.exp.workdir, name, sampler.nfe, images, labels, scores,
            {**(extra or {}), **sampler.info}, config.training.num_grid_samples,
            outputs.upscale_for(config.data.image_size), self.writer, step)
    return results

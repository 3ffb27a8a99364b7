"""Sample grids of a run during training: a PNG per sampler under <workdir>/samples and TensorBoard."""

import os

import jax

from cm_jax import inference, outputs, phases
from cm_jax.experiment import Experiment


class GridEvaluator:
  """Every `every` steps, a grid of training.num_grid_samples samples of each of `samplers`
  ('' is the method's default sampler), with sampling.seed: the same noise at every step."""

  def __init__(self, exp: Experiment, samplers: tuple[str, ...] = ('',), every: int = 0):
    self.exp, self.every = exp, every
    self.samplers = {name or exp.method.default_sampler: None for name in samplers}
    for name in self.samplers:
      self.samplers[name] = exp.method.sampler(name)  # A bad name fails now, not at the first grid.

  def run(self, params_of: inference.ParamsOf, step: int, writer) -> dict[str, str]:
    """Writes the grids; returns {sampler: PNG path}."""
    config, paths = self.exp.config, {}
    num = config.training.num_grid_samples
    for name, sampler in self.samplers.items():
      images, _ = inference.sample_images(self.exp, params_of, name, sampler, num,
                                          config.sampling.seed, num)
      grid = outputs.image_grid(images)
      path = os.path.join(self.exp.workdir, 'samples', f'grid_{name}_nfe{sampler.nfe}_step{step}.png')
      if jax.process_index() == 0:
        outputs.save_png(path, grid, outputs.upscale_for(config.data.image_size))
      writer.write_images(step, {f'samples/{name}': grid[None]})
      paths[name] = path
    return paths

  def hook(self, frozen: dict, writer):
    """A training-loop hook (cm_jax.trainer.Hook) that writes grids every `every` steps."""
    def hook(state, step, report):
      if self.every and step % self.every == 0:
        with report.timed('sample_grids'), phases.phase('sample grids'):
          self.run(inference.params_of_state(self.exp, state, frozen), step, writer)
    return hook

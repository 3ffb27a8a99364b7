"""Tiny configs of the real experiment files, so end-to-end tests take seconds on a CPU."""

from cm_jax.modes import train as train_mode
from configs import digits_cd, digits_edm


def shrink(config, data_dir: str, steps: int = 4):
  m = config.model
  m.nf, m.ch_mult, m.num_res_blocks, m.attn_resolutions, m.dropout = 8, (1,), 1, (), 0.0
  t = config.training
  t.batch_size, t.num_steps, t.log_every, t.checkpoint_every = 16, steps, 2, 2
  t.warmup_steps, t.num_grid_samples = 0, 16
  # A constant rate: the compiled step then does not depend on num_steps, so runs of different
  # lengths share one executable through the session's compilation cache (tests of the cosine
  # schedule set it themselves).
  t.lr_decay = 'constant'
  config.sampling.num_samples, config.sampling.batch_size, config.sampling.num_steps = 16, 16, 3
  config.data.data_dir = data_dir
  return config


def fixture_network(config):
  """The network of the converted EDM fixture (tests/fixtures/convert/edm_ncsnpp_tiny.pkl): shrink's
  as it was when the fixture was written, two levels with attention at 4x4, EDM's BigGAN blocks and
  FIR resampling (the digits network has since taken DDPM blocks and plain resampling)."""
  config.model.ch_mult, config.model.attn_resolutions = (1, 2), (4,)
  config.model.resblock_type, config.model.fir = 'biggan', True
  return config


def edm_config(data_dir: str, steps: int = 4):
  return shrink(digits_edm.get_config(), data_dir, steps)


def constant_edm_config(data_dir: str, steps: int):
  """edm_config checkpointing every 5 steps and without final samples:
  its compiled step does not depend on num_steps, so runs of any length, in the test process or in
  the processes it launches (through the shared compilation cache), compile it once."""
  config = edm_config(data_dir, steps)
  config.training.checkpoint_every = 5
  config.training.final_samplers = ()
  return config


def cd_config(data_dir: str, teacher_workdir: str, steps: int = 4):
  config = shrink(digits_cd.get_config(), data_dir, steps)
  config.teacher.workdir = teacher_workdir
  config.teacher.train_if_missing = False
  return config


def train(config, workdir: str, **kwargs) -> train_mode.TrainOutcome:
  """The train mode without its final samples (most tests look at training only)."""
  return train_mode.run(config, workdir, final_samples=False, **kwargs)

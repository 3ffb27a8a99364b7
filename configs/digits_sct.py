r"""sCT (continuous-time consistency training, Lu & Song 2024) on the embedded digits dataset, from
scratch.

  python launch.py --config=configs/digits_sct.py --workdir=runs/digits_sct

The digits network of configs/digits_edm.py with the paper's network changes (TrigFlow time
conditioning c_noise = t, positional time embedding, adaptive double normalisation) and every sCM
stabiliser on (tangent warm-up, tangent normalisation, adaptive weighting). No teacher: the tangent
warm-up starts it as a TrigFlow diffusion model (at r = 0 the loss is velocity matching). What
differs from the paper's CIFAR-10 sCT is listed in the README.

2800 steps: the CPU time of the main job's 2000 CD steps (configs/digits_cd.py), at the sCT step's
0.71 of a CD step's CPU seconds (benchmarks/results/digits_scm_b128_cpu.json).

Its README figures were measured on the earlier digits network of configs/digits_edm.py (NCSN++
with 32 channels, BigGAN blocks, FIR, attention at 4x4; commit 3b8305b) and have not been
repeated on the current one.
"""

from configs import default, digits_edm


def get_config():
  config = default.get_config()
  config.method = 'sct'
  config.model = digits_edm.get_config().model
  config.model.embedding_type = 'positional'
  config.model.adaptive_double_norm = True
  config.model.dropout = 0.1
  config.noise.time_conditioning = 'trigflow'
  s = config.scm
  s.p_mean, s.p_std = -1.0, 1.4
  s.tangent_warmup_steps = 1000
  t = config.training
  t.optimizer = 'radam'
  t.b2 = 0.99
  t.batch_size = 128
  t.num_steps = 2800
  t.lr = 1e-3
  t.warmup_steps = 100
  t.lr_decay = 'cosine'
  t.ema_decays = (0.999,)
  t.log_every = 100
  t.checkpoint_every = 1000
  t.final_samplers = ('onestep', 'multistep')
  config.scm.multistep_times = (1.1,)
  config.sampling.num_samples = 1000
  return config

r"""sCD (continuous-time consistency distillation, Lu & Song 2024) of the main job's digits teacher.

  python launch.py --config=configs/digits_scd.py --workdir=runs/digits_scd \
      --config.teacher.workdir=runs/digits/teacher

Distils the EDM teacher of configs/digits_edm.py (trained into <workdir>/teacher first when
missing, or reused) read as a TrigFlow model, the student starting from its EMA, with every sCM
stabiliser on. The teacher's network is kept as it is (EDM's c_noise = ln(sigma) / 4 with Fourier
features of scale 16), since the student starts from its weights; the paper's network changes
(configs/digits_sct.py) would need a TrigFlow teacher.

2350 steps: the CPU time of the main job's 2000 CD steps (configs/digits_cd.py), at the sCD step's
0.85 of a CD step's CPU seconds (benchmarks/results/digits_scm_b128_cpu.json). That conditioning
makes the student's time derivative large where 1-step sampling starts (README, "sCT and sCD on
digits"), and this run stays far behind CD.

Its README figures were measured on the earlier digits network of configs/digits_edm.py (NCSN++
with 32 channels, BigGAN blocks, FIR, attention at 4x4; commit 3b8305b) and have not been
repeated on the current one.
"""

from configs import default, digits_edm


def get_config():
  config = default.get_config()
  teacher = digits_edm.get_config()
  config.model, config.noise = teacher.model, teacher.noise
  config.model.dropout = 0.0  # As the paper's sCD runs.
  config.method = 'scd'
  config.teacher.config = 'configs/digits_edm.py'
  config.teacher.train_if_missing = True
  s = config.scm
  s.p_mean, s.p_std = -1.0, 1.4
  s.tangent_warmup_steps = 500
  t = config.training
  t.optimizer = 'radam'
  t.b2 = 0.99
  t.batch_size = 128
  t.num_steps = 2350
  t.lr = 2e-4
  t.lr_decay = 'cosine'
  t.ema_decays = (0.999,)
  t.log_every = 100
  t.checkpoint_every = 500
  t.final_samplers = ('onestep', 'multistep', 'teacher_heun')
  config.scm.multistep_times = (1.1,)
  config.sampling.num_samples = 1000
  return config

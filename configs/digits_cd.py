r"""The main job: consistency distillation on the embedded digits dataset, teacher included.

  python launch.py --config=configs/digits_cd.py --workdir=runs/digits

Trains the EDM teacher of configs/digits_edm.py into <workdir>/teacher (or reuses a finished one),
distils it with CD (paper Alg. 2: N = 18, Heun teacher step, mu = 0, as CIFAR-10), and writes 1-step
and 2-step samples, grids and the digits metric under <workdir> (the teacher's Heun samples, 35 NFE,
under <workdir>/teacher).
Variant `:l2` (default), `:l1` or `:pseudo_huber` picks the distance.
"""

from configs import default, digits_edm


def get_config(distance: str = 'l2'):
  config = default.get_config()
  teacher = digits_edm.get_config()
  # The student starts from the teacher's weights: the same network and preconditioning.
  config.model, config.noise = teacher.model, teacher.noise
  config.model.dropout = 0.0  # As the paper's CD runs.
  config.method = 'cd'
  config.teacher.config = 'configs/digits_edm.py'
  config.teacher.train_if_missing = True
  config.consistency.num_scales = 18
  config.consistency.teacher_solver = 'heun'
  config.consistency.target_ema = 0.0
  config.consistency.distance = distance
  config.training.optimizer = 'radam'
  # Batch 96 and 1800 steps with a cosine decay, from the 1400-step teacher (README, "A network sized
  # for 8x8 digits"): 7.25 / 5.03. From the 1600-step teacher, 2000 steps at batch 128 scored 6.53 /
  # 4.75 at 1.5x the CPU time, at batch 96 6.75 / 5.06, at batch 64 6.74 / 5.36; 1500 steps at batch
  # 128 10.5 / 5.71. At a constant rate the same steps scored worse (README).
  config.training.batch_size = 96
  config.training.num_steps = 1800
  config.training.lr = 4e-4
  config.training.lr_decay = 'cosine'
  config.training.ema_decays = (0.999,)
  config.training.log_every = 200
  config.training.checkpoint_every = 500
  # The teacher's own Heun samples are in <workdir>/teacher/samples (the teacher run writes them);
  # `--mode=sample --config.sampling.sampler=teacher_heun` samples it again from this run.
  config.training.final_samplers = ('onestep', 'multistep')
  config.sampling.ts = (0, 11, 17)  # The paper's CIFAR-10 2-step time points on the N = 18 grid.
  config.sampling.num_samples = 1000
  return config

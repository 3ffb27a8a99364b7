r"""Easy Consistency Tuning (Geng et al. 2024) on the embedded digits dataset, from an EDM teacher.

  python launch.py --config=configs/digits_ect.py --workdir=runs/digits_ect \
      --config.teacher.workdir=runs/digits/teacher

tunes the EDM teacher that the main job (configs/digits_cd.py) trained into runs/digits/teacher (or,
without teacher.workdir, trains configs/digits_edm.py into <workdir>/teacher first) into a
consistency model, and writes 1-step and 2-step samples, grids and the digits metric. No teacher
call in the step: the teacher run only provides the starting weights. From the main job's teacher
(Heun 5.37) it scored digits FD 48.7 (1-step) and 15.9 (2-step), where CD from the same teacher in
the same 2000 steps scored 8.48 and 5.42 (README, "ECT"): still improving, far from converged. Those
runs used the earlier digits network (commit 3b8305b; see configs/digits_edm.py) and have not been
repeated on the current one.

ECT's constants (configs/default.py `ect`, from locuslab/ect's CIFAR-10 run) kept: t ~ LogNormal(-1.1,
2.0), the sigmoid mapping with k = 8, b = 1, c = 0 (the L2 norm), weighting 1/(t - r), RAdam with
betas (0.9, 0.999), no gradient clipping, the same noise and dropout key for both calls, batch 128.
Changed for a run of minutes on 2 CPU cores instead of 200k steps on a GPU:
- 2000 steps, the CD stage's budget in configs/digits_cd.py (an ECT step costs a CT step, less than
  a CD step: benchmarks/results/digits_ect_b128_cpu.md).
- The stage advances every 500 steps (4 stages, t - r down to 1/16 of n(t) t), where ECT's 200k
  steps make 8 stages of 25k: the same halving of the step, compressed to the run's length.
- RAdam at 4e-4 with a cosine decay and EMA 0.999, as digits_cd (ECT's constant 1e-4 and EMA 0.9999
  average over 10k steps, longer than this whole run).
- The teacher's dropout: 0 now, 0.1 in the runs above (ECT raises EDM's 0.13 to 0.2 on CIFAR-10;
  not tuned here).
- The 2-step intermediate time is ECT's CIFAR-10 mid_t = 0.821, not tuned for 8x8 digits; between
  the steps the output is clamped to [-1, 1] (sampling.clip_denoised, as the other digits runs; ECT's
  sampler does not clamp, as configs/cifar10_ect.py).
"""

from configs import default, digits_edm


def get_config():
  config = default.get_config()
  teacher = digits_edm.get_config()
  # The network starts from the teacher's weights: the same network and preconditioning.
  config.model, config.noise = teacher.model, teacher.noise
  config.method = 'ect'
  config.teacher.config = 'configs/digits_edm.py'
  config.teacher.train_if_missing = True
  e = config.ect
  e.q = 2.0
  e.stage_images = 500 * 128
  t = config.training
  t.optimizer = 'radam'
  t.batch_size = 128
  t.num_steps = 2000
  t.lr = 4e-4
  t.lr_decay = 'cosine'
  t.grad_clip = 0.0
  t.ema_decays = (0.999,)
  t.log_every = 200
  t.checkpoint_every = 500
  t.final_samplers = ('onestep', 'multistep')
  config.sampling.sigmas = (80.0, 0.821)  # ECT's CIFAR-10 2-step: T, then mid_t = 0.821.
  config.sampling.num_samples = 1000
  return config

r"""Consistency distillation on class-conditional ImageNet 64x64 (CM paper): variants `lpips` (default), `l2`.

  python launch.py --config=configs/imagenet64_cd.py:lpips --workdir=runs/imagenet64_cd \
      --config.teacher.workdir=runs/imagenet64_edm --config.data.data_dir=/path/to/tensorflow_datasets

As openai/consistency_models' cm_train.py CD runs (scripts/launch.sh): the teacher's ADM (see
configs/imagenet64_edm.py) with dropout 0, batch 2048, 600k steps, RAdam 8e-6 without warmup, fp16 there
and bfloat16 here, EMA 0.999 / 0.9999 / 0.9999432, N = 40, Heun teacher step, fixed target EMA
mu = 0.95, uniform weighting, LPIPS with average pooling (piq's replace_pooling=True, as the
reference). The teacher is the EDM run's 0.9999432 EMA, EDM's own half-life (the reference's
edm_imagenet64_ema.pt does not say which of its EMAs it is); the student starts from it, every copy
(teacher.student_init='ema', as the reference's single-file teacher). Samples come from the
0.9999432 EMA, the copy the paper evaluates. Reference FID (LPIPS): 6.20 (1 step) / 4.70 (2 steps,
ts = 0, 22, 39), against the ADM reference batch (eval.ref_batch). LPIPS needs the converted weights
(see README, evaluation). Kept different: bfloat16 for fp16 (same exponent range as float32: no loss
scaling); the TFDS data of configs/imagenet64_edm.py.
"""

from configs import default, imagenet64_edm


def get_config(distance: str = 'lpips'):
  config = default.get_config()
  config.method = 'cd'
  imagenet64_edm.imagenet64_data(config)
  imagenet64_edm.imagenet64_adm(config)
  config.model.dropout = 0.0
  config.teacher.config = 'configs/imagenet64_edm.py'
  config.teacher.ema_index = 2
  c = config.consistency
  c.num_scales = 40
  c.teacher_solver = 'heun'
  c.target_ema = 0.95
  c.target_ema_schedule = 'fixed'
  c.distance = distance
  c.weighting = 'uniform'
  c.lpips_pooling = 'avg'
  default.paper_schedule(config, batch_size=2048, num_steps=600_000, optimizer='radam', lr=8e-6,
                         ema_decays=imagenet64_edm.EMA_DECAYS,
                         final_samplers=('onestep', 'multistep'))
  config.sampling.ts = (0, 22, 39)
  config.sampling.ema_index = 2  # 0.9999432, the copy the paper evaluates.
  config.sampling.ode_clip_denoised = True  # The teacher's Heun sampler, as the reference's.
  return config

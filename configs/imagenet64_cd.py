r"""Consistency distillation on class-conditional ImageNet 64x64 (CM paper): variants `lpips` (default), `l2`.

  python launch.py --config=configs/imagenet64_cd.py:lpips --workdir=runs/imagenet64_cd \
      --config.teacher.workdir=runs/imagenet64_edm --config.data.data_dir=/path/to/tensorflow_datasets

As openai/consistency_models' cm_train.py CD runs (scripts/launch.sh): the teacher's ADM (see
configs/imagenet64_edm.py) with dropout 0, batch 2048, 600k steps, RAdam 8e-6 without warmup, fp16 there
and bfloat16 here, EMA 0.999 / 0.9999 / 0.9999432, N = 40, Heun teacher step, fixed target EMA
mu = 0.95, uniform weighting. The teacher is the EDM run's 0.9999432 EMA, EDM's own half-life (the
reference's edm_imagenet64_ema.pt does not say which of its EMAs it is). Reference FID (LPIPS): 6.20
(1 step) / 4.70 (2 steps, ts = 0, 22, 39). LPIPS needs the converted weights (see README, evaluation).
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
  default.paper_schedule(config, batch_size=2048, num_steps=600_000, optimizer='radam', lr=8e-6,
                         ema_decays=imagenet64_edm.EMA_DECAYS,
                         final_samplers=('onestep', 'multistep'))
  config.sampling.ts = (0, 22, 39)
  config.sampling.ema_index = 1  # 0.9999, the evaluation EMA of the CIFAR-10 runs.
  return config

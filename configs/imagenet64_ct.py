r"""Consistency training on class-conditional ImageNet 64x64 as the 2023 CM paper's run.

  python launch.py --config=configs/imagenet64_ct.py --workdir=runs/imagenet64_ct \
      --config.teacher.workdir=runs/imagenet64_edm --config.data.data_dir=/path/to/tensorflow_datasets

As openai/consistency_models' scripts/launch.sh CT line: the network starts from the EDM teacher's
weights (its --teacher_model_path; here teacher.workdir, EMA copy teacher.ema_index, every copy), and
the teacher plays no other part; LPIPS with average pooling, adaptive N(k) from s0 = 2 to s1 = 200 and
mu(k) from mu0 = 0.95 (mu(0) = 0.9025, as the reference computes it), uniform weighting, dropout 0,
batch 2048, RAdam 1e-4, 800k steps, EMA 0.999 / 0.9999 / 0.9999432 (sampled from the last), fp16
there and bfloat16 here. 2-step time points (0, 106, 200) on N = 201. Reference FID: 13.0 (1 step) /
11.1 (2 steps), against the ADM reference batch (eval.ref_batch). Kept different: the TFDS data of
configs/imagenet64_edm.py.
"""

from configs import default, imagenet64_edm


def get_config(distance: str = 'lpips'):
  config = default.get_config()
  config.method = 'ct'
  imagenet64_edm.imagenet64_data(config)
  imagenet64_edm.imagenet64_adm(config)
  config.model.dropout = 0.0
  config.teacher.config = 'configs/imagenet64_edm.py'  # Starts from its weights (CT.initial_weights).
  config.teacher.ema_index = 2
  c = config.consistency
  c.scale_schedule = 'ct'
  c.start_scales = 2
  c.end_scales = 200
  c.target_ema_schedule = 'ct'
  c.target_ema = 0.95
  c.distance = distance
  c.lpips_pooling = 'avg'
  c.weighting = 'uniform'
  default.paper_schedule(config, batch_size=2048, num_steps=800_000, optimizer='radam', lr=1e-4,
                         ema_decays=imagenet64_edm.EMA_DECAYS,
                         final_samplers=('onestep', 'multistep'))
  config.sampling.ts = (0, 106, 200)
  config.sampling.ema_index = 2
  return config

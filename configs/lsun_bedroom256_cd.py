r"""Consistency distillation on LSUN 256x256 (CM paper), bedroom (default) or cat (`:cat`); LPIPS.

  python launch.py --config=configs/lsun_bedroom256_cd.py --workdir=runs/lsun_bedroom256_cd \
      --config.teacher.workdir=runs/lsun_bedroom256_edm --config.data.data_dir=/path/to/tfds
  python launch.py --config=configs/lsun_bedroom256_cd.py:cat --workdir=runs/lsun_cat256_cd \
      --config.teacher.workdir=runs/lsun_cat256_edm --config.data.data_dir=/path/to/tfds

As openai/consistency_models' LSUN CD (LPIPS) run (scripts/launch.sh): the teacher's ADM (see
configs/lsun_bedroom256_edm.py, 526,304,771 parameters) with dropout 0, batch 256, 600k steps, RAdam
1e-5 without warmup, EMA 0.9999 / 0.99994 / 0.9999432189950708, N = 40, Heun teacher step, fixed
target EMA mu = 0.95, uniform weighting, LPIPS with average pooling (piq's replace_pooling=True), fp16
there and bfloat16 here; the teacher's Heun sampler clamps its denoiser at every step, as the reference's. The student starts from
the teacher's EMA 0.9999432189950708. The L2 variant of the reference is `--config.consistency.distance=l2`
with `--config.sampling.ts="(0,18,39)"`. Reference FID (LPIPS): bedroom 7.80 (1 step) / 5.22 (2 steps,
ts = 0, 17, 39); cat 11.0 / 8.84 (the reference gives no cat time points: bedroom's are used).

Memory: params, RAdam moments, 3 EMAs, the target network and the teacher in float32 are 16.8 GB per
device when replicated; on accelerators under 80 GB use --config.mesh.fsdp=8.
"""

from configs import default, lsun_bedroom256_edm


def get_config(category: str = 'bedroom'):
  config = default.get_config()
  config.method = 'cd'
  lsun_bedroom256_edm.lsun_data(config, category)
  lsun_bedroom256_edm.lsun_adm(config)
  config.model.dropout = 0.0
  config.teacher.config = f'configs/lsun_bedroom256_edm.py:{category}'
  config.teacher.ema_index = 2
  c = config.consistency
  c.num_scales = 40
  c.teacher_solver = 'heun'
  c.target_ema = 0.95
  c.target_ema_schedule = 'fixed'
  c.distance = 'lpips'
  c.lpips_pooling = 'avg'
  c.weighting = 'uniform'
  default.paper_schedule(config, batch_size=256, num_steps=600_000, optimizer='radam', lr=1e-5,
                         ema_decays=lsun_bedroom256_edm.CM_EMA_DECAYS,
                         final_samplers=('onestep', 'multistep'))
  config.sampling.ts = (0, 17, 39)  # The reference's 2-step sampler of CD (LPIPS) on bedroom.
  config.sampling.ema_index = 2
  config.sampling.batch_size = 64
  config.sampling.ode_clip_denoised = True  # 'teacher_heun', as the reference's Heun sampler.
  return config

r"""Consistency training on LSUN 256x256 (CM paper), bedroom (default) or cat (`:cat`).

  python launch.py --config=configs/lsun_bedroom256_ct.py --workdir=runs/lsun_bedroom256_ct \
      --config.teacher.workdir=runs/lsun_bedroom256_edm --config.data.data_dir=/path/to/tfds
  python launch.py --config=configs/lsun_bedroom256_ct.py:cat --workdir=runs/lsun_cat256_ct \
      --config.teacher.workdir=runs/lsun_cat256_edm --config.data.data_dir=/path/to/tfds

As openai/consistency_models' LSUN CT run (scripts/launch.sh): the ADM of
configs/lsun_bedroom256_edm.py (526,304,771 parameters) with dropout 0, batch 256, 1M steps, RAdam
5e-5 without warmup, EMA 0.9999 / 0.99994 / 0.9999432189950708, LPIPS (average pooling, as piq's
replace_pooling=True), adaptive N(k) from s0 = 2 to
s1 = 150 and mu(k) with mu0 = 0.95, uniform weighting, fp16 there and bfloat16 here. Reference FID:
bedroom 16.0 (1 step) / 7.85 (2 steps, ts = 0, 67, 150); cat 20.7 / 11.7 (ts = 0, 62, 150).

The reference launches CT with --teacher_model_path, and its cm_train.py copies the EDM teacher's
weights into the student before training: CT there starts from the EDM teacher, not from scratch,
and so does this config (a CT run with a teacher set starts from its EMA copy teacher.ema_index).

Memory: params, RAdam moments, 3 EMAs and the target network in float32 are 14.7 GB per device when
replicated; on accelerators under 80 GB use --config.mesh.fsdp=8.
"""

from configs import default, lsun_bedroom256_edm

# The reference's 2-step time points on the final N = 151 grid (scripts/launch.sh).
TWO_STEP_TS = {'bedroom': (0, 67, 150), 'cat': (0, 62, 150)}


def get_config(category: str = 'bedroom'):
  config = default.get_config()
  config.method = 'ct'
  lsun_bedroom256_edm.lsun_data(config, category)
  lsun_bedroom256_edm.lsun_adm(config)
  config.model.dropout = 0.0
  config.teacher.config = f'configs/lsun_bedroom256_edm.py:{category}'
  config.teacher.ema_index = 2
  c = config.consistency
  c.scale_schedule = 'ct'
  c.start_scales = 2
  c.end_scales = 150
  c.target_ema_schedule = 'ct'
  c.target_ema = 0.95
  c.distance = 'lpips'
  c.lpips_pooling = 'avg'
  c.weighting = 'uniform'
  default.paper_schedule(config, batch_size=256, num_steps=1_000_000, optimizer='radam', lr=5e-5,
                         ema_decays=lsun_bedroom256_edm.CM_EMA_DECAYS,
                         final_samplers=('onestep', 'multistep'))
  config.sampling.ts = TWO_STEP_TS[category]
  config.sampling.ema_index = 2
  config.sampling.batch_size = 64
  return config

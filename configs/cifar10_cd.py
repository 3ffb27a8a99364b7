r"""Consistency distillation on CIFAR-10 (CM paper, Table 1/3): variants `lpips` (default), `l2`, `l1`.

  python launch.py --config=configs/cifar10_cd.py:lpips --workdir=runs/cifar10_cd \
      --config.teacher.workdir=runs/cifar10_edm --config.data.data_dir=/path/to/tensorflow_datasets

Batch 512, 800k steps, RAdam 4e-4 (2e-4 for L1), no warmup, N = 18, Heun teacher step, target
mu = 0, eval EMA 0.9999, dropout 0. Reference FID: 3.55 (1 step) / 2.93 (2 steps, ts = 0, 11, 17) with
LPIPS. LPIPS needs the converted weights (see README, evaluation).

As openai/consistency_models_cifar10: the student's online weights start from the teacher's online
weights and its EMA from the teacher's EMA (teacher.student_init); LPIPS max-pools and upsamples
[-1, 1] images to 224. Kept different: the EDM teacher's loss averages over pixels where the
reference sums (equivalent under Adam but for its eps; see configs/cifar10_edm.py); the network
computes in bfloat16 where the reference's does in float32 (default.paper_schedule; LPIPS stays
float32, consistency.lpips_dtype).
"""

from configs import cifar10_edm, default


def get_config(distance: str = 'lpips'):
  config = default.get_config()
  config.method = 'cd'
  cifar10_edm.cifar10_data(config)
  cifar10_edm.cifar10_ncsnpp(config.model)
  config.model.dropout = 0.0
  config.teacher.config = 'configs/cifar10_edm.py'
  config.teacher.student_init = 'online_and_ema'
  c = config.consistency
  c.num_scales = 18
  c.teacher_solver = 'heun'
  c.target_ema = 0.0
  c.distance = distance
  default.paper_schedule(config, batch_size=512, num_steps=800_000, optimizer='radam',
                         lr=2e-4 if distance == 'l1' else 4e-4, ema_decays=(0.9999,),
                         final_samplers=('onestep', 'multistep'))
  config.sampling.ts = (0, 11, 17)
  return config

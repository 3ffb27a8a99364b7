r"""Consistency training (CM paper Alg. 3, the 2023 CT) on the embedded digits dataset, no teacher.

  python launch.py --config=configs/digits_ct.py --workdir=runs/digits_ct

The paper's CIFAR-10 CT recipe (adaptive N(k) with s0 = 2, s1 = 150, mu(k) with mu0 = 0.9) on the
digits network of configs/digits_edm.py, with the L2 distance: LPIPS compares ImageNet features of
images upsampled to 224 and says little about 8x8 digits.
"""

from configs import default, digits_edm


def get_config():
  config = default.get_config()
  config.method = 'ct'
  config.model = digits_edm.get_config().model
  config.model.dropout = 0.0
  c = config.consistency
  c.scale_schedule = 'ct'
  c.start_scales = 2
  c.end_scales = 150
  c.target_ema_schedule = 'ct'
  c.target_ema = 0.9
  c.distance = 'l2'
  t = config.training
  t.optimizer = 'radam'
  t.batch_size = 128
  t.num_steps = 3000
  t.lr = 4e-4
  t.ema_decays = (0.999,)
  t.log_every = 200
  t.checkpoint_every = 1000
  t.final_samplers = ('onestep', 'multistep')
  config.sampling.ts = (0, 80, 150)  # sigma 1.85 on the final N = 151 grid.
  config.sampling.num_samples = 1000
  return config

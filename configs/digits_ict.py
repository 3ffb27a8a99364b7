r"""Improved consistency training (Song & Dhariwal 2023) on the embedded digits dataset.

  python launch.py --config=configs/digits_ict.py --workdir=runs/digits_ict

Every iCT switch of configs/cifar10_ict.py (pseudo-Huber with c = 0.00054 sqrt(64) = 0.0043, no EMA
target, 1/(sigma_{i+1} - sigma_i) weighting, discretised log-normal noise levels, exponential
curriculum s0 = 10 -> s1 = 1280 over 8 stages, Fourier scale 0.02 on c_noise = ln(sigma) / 4)
on the digits network of configs/digits_edm.py, shortened to minutes on 2 CPU cores.

Its README figures were measured on the earlier digits network of configs/digits_edm.py (NCSN++
with 32 channels, BigGAN blocks, FIR, attention at 4x4; commit 3b8305b) and have not been
repeated on the current one.
"""

from configs import cifar10_ict, default, digits_edm


def get_config():
  config = default.get_config()
  config.method = 'ct'
  config.model = digits_edm.get_config().model
  config.model.fourier_scale = 0.02  # On c_noise = ln(sigma) / 4, as configs/cifar10_ict.py.
  config.model.dropout = 0.1
  cifar10_ict.ict_consistency(config.consistency)
  t = config.training
  t.optimizer = 'radam'
  t.batch_size = 128
  t.num_steps = 3000
  t.lr = 4e-4
  t.ema_decays = (0.999,)
  t.log_every = 200
  t.checkpoint_every = 1000
  t.final_samplers = ('onestep', 'multistep')
  config.sampling.sigmas = (80.0, 0.8)  # 2-step: T, then sigma 0.8.
  config.sampling.num_samples = 1000
  return config

r"""EDM teacher on the embedded digits dataset (8x8 grey), about 3.5 minutes on 2 CPU cores.

  python launch.py --config=configs/digits_edm.py --workdir=runs/digits_edm
"""

from configs import default


def get_config():
  config = default.get_config()
  config.method = 'edm'
  # A network sized for 8x8 (README, "A network sized for 8x8 digits"): 24 channels, DDPM residual
  # blocks with plain resampling instead of BigGAN blocks with FIR filters, attention only in the
  # middle block, no dropout. Half the FLOPs and about half the CPU time per step of the NCSN++ layout
  # (nf 32, BigGAN + FIR, attention at 4x4, dropout 0.1) it replaced, and a better teacher and CD
  # model at the same step counts.
  config.model.nf = 24
  config.model.ch_mult = (1, 2)
  config.model.num_res_blocks = 1
  config.model.attn_resolutions = ()
  config.model.resblock_type = 'ddpm'
  config.model.fir = False
  config.model.dropout = 0.0
  config.training.batch_size = 128
  # 1400 steps with a cosine decay and a short EMA (README, "A network sized for 8x8 digits"): Heun
  # FD 4.02 (1600 steps: 4.50, 1200: 4.99). At this length an EMA of 0.999 still averages in weights
  # from the middle of the run (1600 steps with it: 16.6; the online weights of the same run: 4.72).
  config.training.num_steps = 1400
  config.training.lr = 2e-3
  config.training.warmup_steps = 200
  config.training.lr_decay = 'cosine'
  config.training.ema_decays = (0.99,)
  config.training.log_every = 200
  config.training.checkpoint_every = 500
  config.training.final_samplers = ('heun',)
  config.sampling.num_steps = 18  # 35 NFE, as EDM's CIFAR-10 sampler.
  config.sampling.num_samples = 1000
  return config

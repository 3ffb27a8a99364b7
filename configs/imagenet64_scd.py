r"""sCD on class-conditional ImageNet 64x64 (Lu & Song 2024, Table 4), distilling the ADM teacher of
configs/imagenet64_edm.py. The paper's sCD-S (280M params): 1-step / 2-step FID 2.97 / 2.07 (Table 8;
its best, XL: 2.44 / 1.66).

  python launch.py --config=configs/imagenet64_scd.py --workdir=runs/imagenet64_scd \
      --config.teacher.workdir=runs/imagenet64_edm --config.data.data_dir=/path/to/tensorflow_datasets

As Table 4: batch 2048, 400k steps, Adam betas (0.9, 0.99) with eps 1e-11, learning rate 1e-4 (the
S model's alpha_ref), tan(t) ~ e^N(-1.0, 1.6^2) / sigma_data, dropout 0, tangent warm-up 10k steps,
c = 0.1, adaptive weighting, 2-step sampling at t = 1.1; the student starts from the teacher's
0.9999432 EMA and samples from its own. Half precision with the JVP in float32 (bfloat16 here,
with scm.jvp_dtype='float32', as NVlabs/FastGen's config_scd_in64.py).

What differs, and why: the paper's network is EDM2 with TrigFlow's c_noise = t and adaptive double
normalisation, trained as a TrigFlow teacher; this distils the ADM teacher cm_jax trains (c_noise =
1000 ln(sigma) / 4, scale-shift norm), as FastGen's ADM sCD does, so the student keeps that network
to start from its weights. The paper's EDM2 inverse-square-root decay (t_ref 35k) is replaced by a
constant rate (cm_jax has no such schedule yet), and its power-function EMA (sigma_rel 0.05) by the
ADM EMAs. P_mean: Table 4's -1.0 for the consistency models (-0.8 is its teacher's).
"""

from configs import default, imagenet64_edm


def get_config():
  config = default.get_config()
  config.method = 'scd'
  imagenet64_edm.imagenet64_data(config)
  imagenet64_edm.imagenet64_adm(config)
  config.model.dropout = 0.0
  config.teacher.config = 'configs/imagenet64_edm.py'
  config.teacher.ema_index = 2
  s = config.scm
  s.p_mean, s.p_std = -1.0, 1.6
  s.tangent_warmup_steps = 10_000
  s.tangent_norm, s.tangent_norm_const = 'rms', 0.1
  s.adaptive_weight = True
  s.jvp_dtype = 'float32'
  s.multistep_times = (1.1,)
  default.paper_schedule(config, batch_size=2048, num_steps=400_000, optimizer='adam', lr=1e-4,
                         ema_decays=imagenet64_edm.EMA_DECAYS,
                         final_samplers=('onestep', 'multistep'))
  config.training.b1, config.training.b2, config.training.eps = 0.9, 0.99, 1e-11
  config.sampling.ema_index = 2
  return config

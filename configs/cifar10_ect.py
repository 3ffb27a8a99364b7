r"""Easy Consistency Tuning (Geng et al. 2024) on CIFAR-10: locuslab/ect's run_ecm.sh.

  python launch.py --config=configs/cifar10_ect.py --workdir=runs/cifar10_ect \
      --config.teacher.workdir=runs/cifar10_edm --config.data.data_dir=/path/to/tensorflow_datasets

Tunes the EDM teacher of configs/cifar10_edm.py (every copy starts from its EMA, as ECT's --transfer)
into a consistency model. As run_ecm.sh and ct_train.py / training/loss.py on locuslab/ect's main
branch: batch 128, 200k steps (--duration=25.6 Mimg), RAdam 1e-4 with betas (0.9, 0.999) and eps 1e-8
at a constant rate, no gradient clipping, EMA 0.9999 every step, dropout 0.2, no augmentation and no
x-flips; t ~ LogNormal(-1.1, 2.0), r by the sigmoid mapping (q = 2, k = 8, b = 1), the stage advancing
every 3.2M images (--double=250 ticks of --tick=12.8 kimg: 25k steps, 8 stages, t - r down to 1/256
of n(t) t), the L2 norm (c = 0) weighted by 1/(t - r); samples from T = 80 with the 2-step
intermediate time mid_t = 0.821, unclamped between steps. Reference FID (50k samples): 1-step 3.86,
2-step 2.15 at 200k steps (3.60 / 2.11 at 400k: --config.training.num_steps=400000). The paper's
"2-step FID 2.73 in one A100 hour" is run_ecm_1hour.sh: `--config.ect.q=256
--config.ect.stage_images=128000000 --config.training.ema_decays="(0.9993,)"` (one stage, the finest
mapping from the start).

Kept different (all forced by what this project has):
- The network: ECT tunes EDM's DDPM++ (SongUNet, positional embedding, 55.7M parameters) from
  NVlabs' edm-cifar10-32x32-uncond-vp.pkl; by default the teacher here is our NCSN++ EDM run
  (cifar10_edm, 56.4M). ECT's own start, converted (README, "Using the released models"), takes
  the DDPM++ overrides on both commands:

    M='--config.model.embedding_type=positional --config.model.progressive_input=none
       --config.model.fir_kernel=(1,1)'
    python -m cm_jax.convert --source=edm-cifar10-32x32-uncond-vp.pkl \
        --config=configs/cifar10_edm.py --workdir=runs/cifar10_edm_vp $M
    python launch.py --config=configs/cifar10_ect.py --workdir=runs/cifar10_ect_vp \
        --config.teacher.workdir=runs/cifar10_edm_vp $M --config.data.data_dir=/path/to/tfds
- The boundary of the sampled consistency function is noise.sigma_min = 0.002 (the teacher's; ECT's
  ECMPrecond evaluates with 0.003): a relative 0.1% change of c_out at t = 0.821.
- Float32 sampling (the reference samples in float64).
"""

from configs import cifar10_edm, default


def get_config():
  config = default.get_config()
  config.method = 'ect'
  cifar10_edm.cifar10_data(config)
  config.data.random_flip = False  # ct_train.py --xflip defaults to False; run_ecm.sh --augment=0.0.
  cifar10_edm.cifar10_ncsnpp(config.model)
  config.model.dropout = 0.2
  config.teacher.config = 'configs/cifar10_edm.py'
  # config.ect keeps configs/default.py's values: they are run_ecm.sh's.
  default.paper_schedule(config, batch_size=128, num_steps=200_000, optimizer='radam', lr=1e-4,
                         ema_decays=(0.9999,), final_samplers=('onestep', 'multistep'))
  config.sampling.sigmas = (80.0, 0.821)  # ct_train.py --mid_t default.
  config.sampling.clip_denoised = False  # ECT's generator_fn re-noises the unclamped output.
  return config

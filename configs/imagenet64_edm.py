r"""EDM teacher on class-conditional ImageNet 64x64 with the ADM U-Net of the consistency-models paper.

  python launch.py --config=configs/imagenet64_edm.py --workdir=runs/imagenet64_edm \
      --config.data.data_dir=/path/to/tensorflow_datasets

As openai/consistency_models' edm_train.py run (scripts/launch.sh): ADM with 192 channels, ch_mult
(1, 2, 3, 4), 3 residual blocks per level, attention at 32, 16 and 8 with 64-channel heads, scale-shift
norm, residual up/down blocks, 1000 classes (295,899,267 parameters); batch 4096, RAdam 1e-4 without
warmup (the reference's TrainLoop), EMA 0.999 / 0.9999 / 0.9999432 (the last is EDM's 50 Mimg
half-life at batch 4096), dropout 0.1, EDM's log-normal noise levels and weighting, fp16 there and
bfloat16 here. The reference does not state its step count; 610k steps is EDM's 2500 Mimg at this
batch. Reference: FID 2.44 with 40 Heun steps (79 NFE), whose denoiser output is clamped to [-1, 1]
at every step (sampling.ode_clip_denoised), sampled from the 0.9999432 EMA.

Data: TFDS 'imagenet_resized/64x64' (Chrabaszcz et al. 2017: the ILSVRC-2012 images box-resized to
64x64, with labels). The reference instead centre-crops and resizes the ILSVRC-2012 originals, and
orders its labels by WordNet id; this dataset's label order is its own, so released reference
checkpoints' class indices do not carry over, and FIDs of models trained on it are measured on other
images than the paper's. ('downsampled_imagenet/64x64' has no labels.) For the reference's data,
resize TFDS imagenet2012 once as the reference does (`python -m cm_jax.datasets.prepare
--source=imagenet2012 --image_size=64 --resize=adm --data_dir=...`, README "Real datasets") and train
with --config.data.name=imagenet2012_64_adm --config.data.eval_split=validation. FID as in the paper:
against the ADM evaluator's reference batch, --config.eval.ref_batch=/path/VIRTUAL_imagenet64_labeled.npz.
"""

from configs import default

# The EMA of every ImageNet-64 run: 0.9999432189950708 = 0.5 ** (4096 / 50e6), EDM's half-life.
EMA_DECAYS = (0.999, 0.9999, 0.9999432189950708)


def imagenet64_data(config):
  config.data.name = 'imagenet_resized/64x64'
  config.data.image_size = 64
  config.data.num_channels = 3
  config.data.random_flip = True  # The reference's image loader flips at random (guided-diffusion's).
  config.data.num_classes = 1000
  config.data.eval_split = 'validation'


def imagenet64_adm(config):
  """The consistency-models ImageNet-64 ADM (295,899,267 parameters, as EDM's 295.9M)."""
  model = config.model
  model.name = 'adm'
  model.nf = 192
  model.ch_mult = (1, 2, 3, 4)
  model.num_res_blocks = 3
  model.attn_resolutions = (32, 16, 8)
  model.num_heads = 4  # Unused: num_head_channels sets the heads.
  model.num_head_channels = 64
  model.num_heads_upsample = -1
  model.use_scale_shift_norm = True
  model.resblock_updown = True
  # consistency_models always runs flash attention, whose QKV layout is guided-diffusion's new order.
  model.use_new_attention_order = True
  model.num_classes = 1000
  # The reference feeds ADM c_noise = 1000 ln(sigma) / 4, a diffusion-timestep-sized input.
  config.noise.noise_cond_scale = 1000.0


def get_config():
  config = default.get_config()
  config.method = 'edm'
  imagenet64_data(config)
  imagenet64_adm(config)
  config.model.dropout = 0.1
  default.paper_schedule(config, batch_size=4096, num_steps=610_000, optimizer='radam', lr=1e-4,
                         ema_decays=EMA_DECAYS, final_samplers=('heun',))
  config.sampling.num_steps = 40  # 40 Heun steps = 79 NFE, the reference's sampler.
  config.sampling.ema_index = 2
  config.sampling.ode_clip_denoised = True
  return config

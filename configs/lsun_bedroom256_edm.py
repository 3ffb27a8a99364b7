r"""EDM teacher on LSUN 256x256, bedroom (default) or cat (`:cat`), with the reference's ADM.

  python launch.py --config=configs/lsun_bedroom256_edm.py --workdir=runs/lsun_bedroom256_edm \
      --config.data.data_dir=/path/to/tensorflow_datasets
  python launch.py --config=configs/lsun_bedroom256_edm.py:cat --workdir=runs/lsun_cat256_edm \
      --config.data.data_dir=/path/to/tensorflow_datasets

As openai/consistency_models' LSUN EDM run (scripts/launch.sh): unconditional ADM with 256 channels,
ch_mult (1, 1, 2, 2, 4, 4) (script_util's default at 256), 2 residual blocks per level, attention at
32, 16 and 8 with 64-channel heads, no scale-shift norm, residual up/down blocks: 526,304,771
parameters (the reference's UNetModel built with these arguments counts the same; `python -m
configs.lsun_bedroom256_edm` prints ours). Dropout 0.1, batch 256, lr 1e-4, weight decay 0, RAdam
(the reference TrainLoop's optimizer), EMA 0.999 / 0.9999 / 0.9999432189950708, EDM's log-normal noise
levels and Karras weighting, fp16 there and bfloat16 here. The reference does not state the step
count; 500k is ours. Its teacher samples with 40 Heun steps (79 NFE), as here.

Memory: the float32 params, RAdam moments and 3 EMA copies are 12.6 GB, replicated on every device by
default (an 80 GB+ GPU holds them and a per-device batch of 32 in bfloat16). On smaller accelerators
(e.g. TPU v4/v5e) shard them with --config.mesh.fsdp=8 (or the devices of one host).

Data: TFDS 'lsun/bedroom' or 'lsun/cat' (train split; about 3.0M and 1.7M images), flipped at random.
The reference trains on its own export of the LSUN lmdb files (datasets/lsun_bedroom.py: one box
resize of the short side to 256, then the central 256x256 crop; its loader's center_crop_arr leaves
those unchanged): data.resize='box' does exactly that, on the fly, to the lmdb's JPEG/WebP bytes that
TFDS stores unchanged, decoded with PIL as the reference does. No FID is reported for the teacher in
the paper; its CD students: bedroom 7.80 / 5.22, cat 11.0 / 8.84 (1 / 2 steps).
"""

from configs import default

# The EMA of the LSUN EDM run (as ImageNet 64's: the last is EDM's half-life at batch 4096).
EDM_EMA_DECAYS = (0.999, 0.9999, 0.9999432189950708)
# The EMA of the LSUN CD and CT runs (scripts/launch.sh).
CM_EMA_DECAYS = (0.9999, 0.99994, 0.9999432189950708)
CATEGORIES = ('bedroom', 'cat')


def lsun_data(config, category: str) -> None:
  if category not in CATEGORIES:
    raise ValueError(f'LSUN category {category!r}: use one of {CATEGORIES} (configs/...py:cat).')
  config.data.name = f'lsun/{category}'
  config.data.image_size = 256
  config.data.num_channels = 3
  config.data.random_flip = True  # The reference's image loader flips at random.
  config.data.resize = 'box'  # The reference's LSUN export (datasets/lsun_bedroom.py).
  config.data.num_classes = 0
  config.data.split = 'train'
  # Edit inputs: TFDS lsun/bedroom has 300 validation images; lsun/cat has only a train split.
  config.data.eval_split = 'validation' if category == 'bedroom' else 'train'
  config.eval.ref_split = 'train'


def lsun_adm(config) -> None:
  """The consistency-models LSUN-256 ADM (526,304,771 parameters)."""
  model = config.model
  model.name = 'adm'
  model.nf = 256
  model.ch_mult = (1, 1, 2, 2, 4, 4)
  model.num_res_blocks = 2
  model.attn_resolutions = (32, 16, 8)
  model.num_heads = 4  # Unused: num_head_channels sets the heads.
  model.num_head_channels = 64
  model.num_heads_upsample = -1
  model.use_scale_shift_norm = False
  model.resblock_updown = True
  # consistency_models always runs flash attention, whose QKV layout is guided-diffusion's new order.
  model.use_new_attention_order = True
  model.num_classes = 0
  config.noise.noise_cond_scale = 1000.0  # ADM receives c_noise = 1000 ln(sigma) / 4.


def get_config(category: str = 'bedroom'):
  config = default.get_config()
  config.method = 'edm'
  lsun_data(config, category)
  lsun_adm(config)
  config.model.dropout = 0.1
  default.paper_schedule(config, batch_size=256, num_steps=500_000, optimizer='radam', lr=1e-4,
                         ema_decays=EDM_EMA_DECAYS, final_samplers=('heun',))
  config.sampling.num_steps = 40  # 40 Heun steps = 79 NFE, the reference's teacher sampler.
  config.sampling.ema_index = 2
  config.sampling.batch_size = 64
  config.sampling.ode_clip_denoised = True  # The reference's Heun sampler clamps its denoiser.
  return config


def parameter_count(config) -> int:
  """The network's parameter count, from shapes only (nothing is allocated)."""
  import jax  # pylint: disable=g-import-not-at-top
  from cm_jax import experiment, models, networks  # pylint: disable=g-import-not-at-top
  network = networks.get_network(config.model, config.data.image_size, config.data.num_channels)
  model = models.Preconditioned(network, config.noise, config.model.num_classes)
  shapes = jax.eval_shape(lambda rng: model.init(rng, experiment.image_shape_of(config)),
                          jax.random.PRNGKey(0))
  return sum(int(x.size) for x in jax.tree.leaves(shapes))


if __name__ == '__main__':
  for name in ('edm', 'cd', 'ct'):
    import importlib  # pylint: disable=g-import-not-at-top
    module = importlib.import_module(f'configs.lsun_bedroom256_{name}')
    for category in CATEGORIES:
      print(f'configs/lsun_bedroom256_{name}.py:{category}: '
            f'{parameter_count(module.get_config(category)):,} parameters')

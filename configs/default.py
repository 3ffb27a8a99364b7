"""Every field a cm_jax run reads, with defaults. Experiment files override these.

Not launched by itself: each experiment file under configs/ starts from `get_config()` and changes what
its paper run changes. Any field can be overridden on the command line, e.g.
`python launch.py --config=configs/digits_edm.py --workdir=/tmp/run --config.training.lr=1e-4`.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  # Which objective trains the network: 'edm' (diffusion teacher), 'cd' (consistency distillation),
  # 'ct' (consistency training; the iCT improvements are switches under `consistency`), 'ect'
  # (easy consistency tuning from an EDM run's weights; its settings under `ect`), or the
  # continuous-time 'scd' / 'sct' (sCM, Lu & Song 2024; switches under `scm`).
  config.method = 'edm'
  config.seed = 0
  # Resuming a workdir whose saved config differs (beyond step counts, logging and sampling) is
  # refused unless this is set.
  config.allow_other_config = False

  config.data = data = ml_collections.ConfigDict()
  # A TFDS name: 'sklearn_digits' (embedded, built locally), 'cifar10', 'imagenet_resized/64x64',
  # 'lsun/bedroom', ... prepared as ArrayRecord files; or 'folder:/path/to/images', a folder of the
  # user's PNG/JPEG files, converted into such a dataset on first use (cm_jax/datasets/prepare.py).
  data.name = 'sklearn_digits'
  data.data_dir = ''  # '' means the TFDS default (~/tensorflow_datasets or $TFDS_DATA_DIR).
  data.split = 'train'
  data.eval_split = 'test'
  data.image_size = 8
  data.num_channels = 1
  data.random_flip = False
  data.num_classes = 10  # Labels the dataset has (for metrics); the network uses model.num_classes.
  # How images that are not image_size squares become squares: 'adm' (openai/consistency_models'
  # center_crop_arr: box-halving, bicubic resize of the short side, central crop; its ImageNet and
  # LSUN loader) or 'box' (its LSUN export: one box resize of the short side, central crop).
  data.resize = 'adm'
  # folder: datasets only. Labels from the names of the first-level subfolders (sorted).
  data.folder_labels = False
  # folder: datasets only. Files that cannot be used (unreadable, a mode that is not the dataset's,
  # smaller than image_size) are listed with their paths, then 'refuse'd (nothing is trained) or
  # 'skip'ped (trained without them).
  data.bad_files = 'refuse'
  # How the input is read; none of it changes the batches (a run may resume with other values).
  data.loader = loader = ml_collections.ConfigDict()
  loader.num_threads = 4  # Host batches decoded at once (PIL releases the GIL while decoding).
  loader.prefetch = 4  # Host batches read ahead of the step (bounds the input's host memory).
  loader.device_prefetch = 2  # Batches on the devices before the step that uses them.
  loader.num_workers = 0  # > 0: decode in that many worker processes instead of threads.

  # The network: its architecture (every field but dropout, init_scale and dtype fixes what trained
  # weights compute; a CD teacher must match those) and how it is trained and computed.
  config.model = model = ml_collections.ConfigDict()
  model.name = 'ncsnpp'
  model.nf = 32
  model.ch_mult = (1, 2)
  model.num_res_blocks = 2
  model.attn_resolutions = (4,)
  model.dropout = 0.0
  model.resamp_with_conv = True
  model.fir = True
  model.fir_kernel = (1, 3, 3, 1)
  model.skip_rescale = True
  model.resblock_type = 'biggan'  # 'biggan' | 'ddpm'
  model.progressive = 'none'  # 'none' | 'output_skip' | 'residual'
  model.progressive_input = 'residual'  # 'none' | 'input_skip' | 'residual'
  model.progressive_combine = 'sum'  # 'sum' | 'cat'
  model.init_scale = 0.0
  model.embedding_type = 'fourier'  # 'fourier' | 'positional'
  model.fourier_scale = 16.0
  model.conv_size = 3
  # ADM U-Net only (model.name = 'adm'; nf, ch_mult, num_res_blocks, attn_resolutions, dropout,
  # num_classes and dtype are shared with NCSN++, which ignores these). Defaults: openai/consistency_models.
  model.num_heads = 4
  model.num_head_channels = -1  # > 0: attention heads of this many channels (overrides num_heads).
  model.num_heads_upsample = -1  # Heads of the upsampling path's attention; -1: num_heads.
  model.use_scale_shift_norm = True  # Embedding as GroupNorm(h) * (1 + scale) + shift (FiLM), not h + emb.
  model.resblock_updown = False  # Residual blocks (not convs) resample between levels.
  # QKV layout of the attention projection: True splits [q | k | v] before heads (consistency_models'
  # flash-attention layout); False splits heads first (guided-diffusion's legacy order).
  model.use_new_attention_order = False
  # sCM's adaptive double normalisation (Lu & Song 2024, Sec. 4.1): the noise embedding enters every
  # residual block as GroupNorm(h) * pnorm(scale) + pnorm(shift), pnorm the pixel norm over channels.
  # NCSN++: replaces the added bias (its projection then has 2x the channels); ADM: replaces
  # use_scale_shift_norm's (1 + scale), shift. Off leaves every network as it was.
  model.adaptive_double_norm = False
  model.num_classes = 0  # 0: unconditional; >0: class-conditional with that many labels.
  # Compute dtype, 'float32' or 'bfloat16': the mixed-precision policy of README "Benchmarks" (bf16
  # convolutions and activations; params, optimizer state, EMA, target, noise embedding, norm
  # statistics, preconditioning, network output and loss in float32). The paper-scale configs
  # (CIFAR-10, ImageNet 64, LSUN 256, for GPUs and TPUs) set bfloat16 in `paper_schedule`; the digits
  # configs, for CPUs (where bfloat16 is emulated and slower), keep float32.
  model.dtype = 'float32'

  # Noise levels and the preconditioning around the network (DESIGN.md: EDM/Karras). The network
  # itself (config.model) knows nothing of them.
  config.noise = noise = ml_collections.ConfigDict()
  noise.sigma_min = 0.002
  noise.sigma_max = 80.0
  noise.sigma_data = 0.5
  noise.rho = 7.0
  # The network is conditioned on c_noise = noise_cond_scale * ln(sigma) / 4. EDM uses 1; the
  # consistency-model reference code uses 1000 (with the Fourier scale chosen to match).
  noise.noise_cond_scale = 1.0
  # What c_noise is a function of: 'log_sigma' (EDM, ln(sigma) / 4) or 'trigflow' (TrigFlow's
  # t = arctan(sigma / sigma_data), sCM Sec. 4.1), times noise_cond_scale either way.
  noise.time_conditioning = 'log_sigma'

  # EDM teacher training (EDM paper): ln(sigma) ~ N(p_mean, p_std^2).
  config.edm = edm = ml_collections.ConfigDict()
  edm.p_mean = -1.2
  edm.p_std = 1.2

  # Consistency distillation and training (paper Alg. 2 and 3; iCT switches).
  config.consistency = cons = ml_collections.ConfigDict()
  cons.num_scales = 18  # N for CD, or the fixed N of CT when scale_schedule == 'fixed'.
  cons.scale_schedule = 'fixed'  # 'fixed' | 'ct' (paper's N(k)) | 'ict' (exponential curriculum)
  cons.start_scales = 2  # s0
  cons.end_scales = 150  # s1
  cons.target_ema = 0.0  # mu for CD / mu0 for CT's adaptive schedule.
  cons.target_ema_schedule = 'fixed'  # 'fixed' | 'ct' (mu(k) = exp(s0 ln(mu0) / N(k)))
  cons.distance = 'l2'  # 'l2' | 'l1' | 'pseudo_huber' | 'lpips'
  cons.huber_c = -1.0  # < 0 means iCT's 0.00054 * sqrt(d).
  cons.weighting = 'uniform'  # 'uniform' | 'ict' (1 / (sigma_{i+1} - sigma_i))
  cons.noise_sampling = 'uniform'  # 'uniform' | 'lognormal' (iCT's discretised log-normal)
  cons.p_mean = -1.1
  cons.p_std = 2.0
  cons.teacher_solver = 'heun'  # 'heun' | 'euler' (CD only)
  # LPIPS's pooling between VGG stages: 'max' (the lpips package, the CIFAR-10 reference) or 'avg'
  # (piq.LPIPS(replace_pooling=True), the ImageNet-64 and LSUN reference).
  cons.lpips_pooling = 'max'
  # LPIPS's VGG trunk compute dtype, 'float32' or 'bfloat16' (its heads and the distance stay float32).
  # float32 in every config: measured at 32x32 upsampled to 224 (random VGG weights, 4 pairs; max
  # and avg pooling alike), bfloat16 moves the distance of independent images by 2-4e-4 relative, but
  # that of close ones, as the consistency loss compares, by 6-11% at a 0.01 pixel perturbation and
  # by 5-9x at 0.001 (tests/test_precision.py): the rounding of two nearly equal feature maps swamps
  # their difference.
  cons.lpips_dtype = 'float32'

  # Easy Consistency Tuning (Geng et al. 2024; cm_jax/methods/ect.py). Defaults: locuslab/ect's
  # CIFAR-10 run (run_ecm.sh, training/loss.py on its main branch).
  config.ect = ect = ml_collections.ConfigDict()
  ect.p_mean = -1.1  # t ~ LogNormal(p_mean, p_std^2), unclipped.
  ect.p_std = 2.0
  # r = max(0, t (1 - q^-(stage+1) n(t))); n(t) = 1 + k sigmoid(-b t) ('sigmoid') or 1 ('constant').
  ect.q = 2.0
  ect.mapping = 'sigmoid'
  ect.k = 8.0
  ect.b = 1.0
  # The stage advances every stage_images training images (250 ticks of 12.8k images in run_ecm.sh).
  ect.stage_images = 3_200_000
  # Per example sqrt(||f_t - f_r||^2 + c^2) - c over all its values (0: the L2 norm, as CIFAR-10).
  ect.huber_c = 0.0
  # 'inverse_gap' 1/(t - r) (CIFAR-10 code) | 'edm' (t^2 + sd^2)/(t sd)^2 (ImageNet-64 code).
  ect.weighting = 'inverse_gap'

  # Continuous-time consistency models, sCT and sCD (Lu & Song 2024, arXiv 2410.11081; cm_jax/trigflow.py).
  # Each stabiliser is a switch here; noise.time_conditioning = 'trigflow', model.embedding_type =
  # 'positional' and model.adaptive_double_norm are the network changes the paper makes.
  config.scm = scm = ml_collections.ConfigDict()
  scm.p_mean = -1.0  # tan(t) = e^tau / sigma_data, tau ~ N(p_mean, p_std^2) (CIFAR-10: -1.0, 1.4).
  scm.p_std = 1.4
  scm.tangent_warmup_steps = 10_000  # H: r = min(1, step / H) on g's second term; 0 turns it off.
  # Tangent normalisation g / (||g|| + c): 'rms' (||g|| as an RMS over the example, NVlabs/FastGen's
  # default), 'l2' (the plain norm, the paper's text), 'clip' (clip(g, -1, 1)) or 'none'.
  scm.tangent_norm = 'rms'
  scm.tangent_norm_const = 0.1  # c
  # The adaptive weighting w_phi(t) (Sec. 4.2, App. D): a linear layer on Fourier features of
  # ln(sigma) / 4, trained with the network (its params are trained state beside the params).
  scm.adaptive_weight = True
  scm.adaptive_weight_features = 128
  # An extra 1 / (sigma_data tan t) on the loss, as NVlabs/FastGen; the paper's eq. 8 has the prior
  # weighting only inside g (as its cos(t)).
  scm.prior_weighting = False
  # The JVP's compute dtype: '' as model.dtype (one fused pass with the forward), or 'float32' (a
  # separate float32 pass while the model computes in bfloat16, as FastGen's precision_amp_jvp).
  scm.jvp_dtype = ''
  # TrigFlow times of multistep sampling after t_max = arctan(sigma_max / sigma_data) (the paper's
  # 2-step: t = 1.1). sampling.sigmas, when given, replaces (t_max,) + these.
  scm.multistep_times = (1.1,)
  # sCD with classifier-free guidance of a class-conditional teacher (1: none). Needs a teacher with
  # an unconditional mode, which cm_jax's EDM runs do not train yet.
  scm.guidance_scale = 1.0

  # The EDM teacher run: the one a CD run distils, or the one whose weights a CT run (when set; CT
  # runs from scratch otherwise) or an ECT run starts from.
  config.teacher = teacher = ml_collections.ConfigDict()
  teacher.workdir = ''  # '' means <workdir>/teacher.
  teacher.config = ''  # The teacher run's config file (its model must match this model).
  teacher.train_if_missing = False  # Train the teacher into teacher.workdir first if it is not there.
  # A teacher run that stopped before its training.num_steps (preempted, killed) is refused; True
  # distils it as it is.
  teacher.allow_unfinished = False
  teacher.ema_index = 0  # Which of the teacher run's EMA copies to distil.
  # Where a CD student starts: 'ema' (every copy from that EMA copy, as openai/consistency_models) or
  # 'online_and_ema' (online params from the teacher's online params, EMA copies from its EMA, as
  # openai/consistency_models_cifar10).
  teacher.student_init = 'ema'

  config.training = training = ml_collections.ConfigDict()
  training.batch_size = 128  # Global batch over all devices and processes.
  training.num_steps = 1000
  training.optimizer = 'adam'  # 'adam' | 'radam'
  training.lr = 2e-4
  training.b1 = 0.9
  training.b2 = 0.999
  training.eps = 1e-8
  training.weight_decay = 0.0
  training.warmup_steps = 0
  # 'constant' (the papers') | 'cosine' (to lr_end_factor * lr at num_steps; so it depends on num_steps:
  # extending a finished cosine run by raising num_steps changes the rate of the steps to come).
  training.lr_decay = 'constant'
  training.lr_end_factor = 0.0
  training.grad_clip = 1.0  # Global-norm clip; <= 0 disables it.
  training.ema_decays = (0.999,)
  training.log_every = 100
  training.checkpoint_every = 500
  training.keep_checkpoints = 3
  training.sample_every = 0  # Sample grids during training; 0: only at the end.
  training.num_grid_samples = 64
  # Written when training ends: a samples npz (sampling.num_samples) and a grid for each sampler,
  # plus the digits metric on the embedded dataset. '' means the method's default sampler.
  training.final_samplers = ('',)

  # Sampling (--mode=sample and the grids written during training).
  config.sampling = sampling = ml_collections.ConfigDict()
  sampling.sampler = ''  # '' picks the method's default: 'heun' for edm, 'multistep' otherwise.
  sampling.num_steps = 18  # Heun/Euler steps of the EDM sampler (18 Heun steps = 35 NFE).
  sampling.ts = (0,)  # Multistep time points as indices on the N-grid (paper's 2-step: e.g. (0, 11, 17)).
  sampling.sigmas = ()  # Or as sigmas (takes precedence when given).
  sampling.num_samples = 1000
  sampling.batch_size = 500
  sampling.ema_index = 0  # Which EMA copy to sample from; -1 samples the online params.
  sampling.seed = 42
  # Clamp each consistency-function output to [-1, 1] before it is re-noised (multistep sampling and
  # the time search), as both reference codebases do.
  sampling.clip_denoised = True
  # Clamp the denoiser's output to [-1, 1] at every step of the Heun/Euler ODE sampler, as the
  # ImageNet-64 / LSUN reference sampler does (the CIFAR-10 reference's does not).
  sampling.ode_clip_denoised = False

  # Device mesh: data parallel over `data`, parameters and optimizer state sharded over `fsdp`.
  config.mesh = mesh = ml_collections.ConfigDict()
  mesh.data = -1  # -1: all devices not used by fsdp.
  mesh.fsdp = 1

  config.eval = evaluation = ml_collections.ConfigDict()
  evaluation.num_samples = 1000
  evaluation.stats_dir = ''  # '' means <workdir>/stats.
  # Samplers scored in one --mode=eval, e.g. ('onestep', 'multistep', 'teacher_heun'); () means
  # sampling.sampler.
  evaluation.samplers = ()
  # FID reference: a TFDS split of data.name ('train' is the paper's CIFAR-10 protocol), at most
  # max_ref_images of it (a fixed random subset of larger splits; 0 = all) for the statistics and
  # precision/recall. Computed once, cached in stats_dir.
  evaluation.ref_split = 'train'
  evaluation.max_ref_images = 50_000
  # Or a reference batch of the ADM evaluator (openai/guided-diffusion/evaluations: e.g.
  # VIRTUAL_imagenet64_labeled.npz): FID against its precomputed statistics (mu, sigma), the
  # ImageNet-64 protocol of the paper; precision/recall against its images (arr_0).
  evaluation.ref_batch = ''
  # The converted FID Inception (.npz); '' means $CM_JAX_CACHE/inception_v3_fid_2015-12-05.npz.
  evaluation.inception_path = ''
  evaluation.inception_batch_size = 250  # Images per Inception call, over this process's devices.
  evaluation.is_splits = 10  # Inception Score splits, as the original code.
  evaluation.pr_k = 3  # Neighbourhood of improved precision/recall (Kynkaanniemi et al. 2019).


  # The time-point search of --mode=sample (CM paper, Sec. 6): with search_steps >= 2, the
  # intermediate time points of a search_steps-step sampler are found greedily, each by ternary search
  # of its index on the N-grid, minimising search_metric ('digits_fd' on the embedded digits, else
  # 'fid') over search_num_samples samples; the run is then sampled with them.
  sampling.search_steps = 0
  sampling.search_metric = 'digits_fd'
  sampling.search_num_samples = 1000

  # Zero-shot editing, --mode=edit (CM paper Alg. 4 and Appendix D; cm_jax/modes/edit.py, cm_jax/edit_tasks.py).
  config.edit = edit = ml_collections.ConfigDict()
  # 'inpainting' | 'colorization' | 'superres' | 'stroke' | 'denoising' | 'interpolation'.
  edit.task = 'inpainting'
  # Inpainting: a named mask ('lower_half', 'upper_half', 'left_half', 'right_half', 'center',
  # 'border') or a PNG whose white pixels are the ones to generate.
  edit.mask = 'lower_half'
  edit.superres_factor = 2  # Super-resolution keeps the means of factor x factor patches.
  # Time points of the edits, as indices on the N-grid or as sigmas (these take precedence); both
  # empty: about 18 evenly spaced indices from 0 (every index at N = 18: 17 NFE), and one step (T)
  # for interpolation. Super-resolution may start lower on the grid (e.g. ts=(10, ..., 16)).
  edit.ts = ()
  edit.sigmas = ()
  edit.stroke_sigma = 4.0  # Stroke-guided generation starts from the strokes noised to this level.
  edit.noise_sigma = 0.4  # Denoising: the inputs' noise std (added to dataset images), in [-1, 1] units.
  edit.interpolation_points = 8  # Images per interpolation, endpoints included.
  # Interpolate between 'samples' (pairs of initial noises) or 'inputs' (pairs of input images encoded
  # by the PF-ODE of the EDM teacher of a CD run, or of an EDM run).
  edit.interpolation_source = 'samples'
  edit.num_images = 64  # Inputs edited (the first ones of the split or of the --edit_input folder).
  edit.split = ''  # Dataset split of the inputs without --edit_input; '' means data.eval_split.
  edit.batch_size = 64
  edit.seed = 0
  # Edits drawn per input. Above 1, metrics also score the mean of the draws (the posterior mean).
  edit.num_draws = 1
  edit.resize = False  # Resize input files (and mask PNGs) to data.image_size and data.num_channels.
  edit.clip_denoised = True  # Clamp each consistency step's output to [-1, 1] (as the reference code).
  edit.label = -1  # Class-conditional runs: the label of file inputs; -1 draws one per image.

  return config


def paper_schedule(config: ml_collections.ConfigDict, *, batch_size: int, num_steps: int,
                   optimizer: str, lr: float, ema_decays, final_samplers, warmup_steps: int = 0):
  """The training block the paper-scale configs share (CIFAR-10, ImageNet 64, LSUN 256): bfloat16
  compute (they run on GPUs and TPUs; --config.model.dtype=float32 turns it off), no gradient
  clipping, logs every 100 steps, checkpoints and sample grids every 10k, and 50k samples (FID) in
  batches of 500. What differs between runs is an argument."""
  config.model.dtype = 'bfloat16'
  t = config.training
  t.batch_size, t.num_steps, t.optimizer, t.lr = batch_size, num_steps, optimizer, lr
  t.warmup_steps = warmup_steps
  t.grad_clip = 0.0
  t.ema_decays = tuple(ema_decays)
  t.log_every = 100
  t.checkpoint_every = 10_000
  t.sample_every = 10_000
  t.final_samplers = tuple(final_samplers)
  config.sampling.num_samples = 50_000
  config.sampling.batch_size = 500
  config.eval.num_samples = 50_000

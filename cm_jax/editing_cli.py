r"""`--mode=edit`: the CM paper's zero-shot edits (Alg. 4, Appendix D) of dataset images or image files.

  python launch.py --config=configs/digits_cd.py --workdir=runs/digits --mode=edit   # lower-half inpainting
  python launch.py --config=configs/digits_cd.py --workdir=runs/digits --mode=edit \
      --config.edit.task=superres --config.edit.superres_factor=2
  python launch.py --config=configs/digits_cd.py --workdir=runs/digits --mode=edit \
      --config.edit.task=inpainting --config.edit.mask=/path/mask.png --edit_input=/path/images/
  python launch.py --config=configs/cifar10_cd.py --workdir=runs/cifar10 --mode=edit \
      --config.edit.task=colorization --edit_input=/path/grey.png
  python launch.py --config=configs/digits_cd.py --workdir=runs/digits --mode=edit \
      --config.edit.task=stroke --config.edit.stroke_sigma=4.0 --edit_input=/path/strokes/
  python launch.py --config=configs/digits_cd.py --workdir=runs/digits --mode=edit \
      --config.edit.task=denoising --config.edit.noise_sigma=0.4
  python launch.py --config=configs/digits_cd.py --workdir=runs/digits --mode=edit \
      --config.edit.task=interpolation --config.edit.interpolation_source=inputs

Inputs: the first edit.num_images images of the dataset split edit.split (default data.eval_split), or
--edit_input (an image file or a folder of them, in name order). Files must have the run's image size
and channels, or pass --config.edit.resize=True; colorization also takes grey files, super-resolution
also low-resolution files (image_size / superres_factor). Dataset images are degraded here (masked,
turned grey, averaged over patches, pixelated into strokes, noised), files are taken as given.

Output: <workdir>/edit/<name>_nfe<k>/ (<name> is the task, or interpolation_<source>) with input.png,
result.png and reference.png grids, edits.npz (uint8 NHWC arrays input, result, reference; labels) and
metrics.json: the error on the generated region against the real images and the trivial baseline's
(mean fill, nearest upsampling, grey image, the noisy input), RMSE on [0, 1] intensities, when the
inputs are dataset images. Also in <workdir>/metrics.json as 'edit/<name>_nfe<k>'.
"""

import json
import logging
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cm_jax import consistency, data, editing, run, sampling, sampling_cli, sharding, train
from cm_jax.errors import ConfigError

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.gif', '.webp', '.tif', '.tiff')
# Default edit time points: indices 0, k, 2k, ... < N - 1 on the N-grid, k = max(1, N // DEFAULT_STEPS):
# every level of an N = 18 grid (17 NFE). Editing gains from many replacement steps (Alg. 4): on digits
# with CD, lower-half inpainting and 2x super-resolution err less with 17 steps than with 2 or 6.
DEFAULT_STEPS = 18


# --------------------------------------------------------------------------------------------------
# Inputs: image files and masks, checked before anything is compiled.
# --------------------------------------------------------------------------------------------------
def _image_files(path: str) -> list[str]:
  if not os.path.exists(path):
    raise ConfigError(f'--edit_input={path} does not exist: pass an image file or a folder of images.')
  if os.path.isfile(path):
    return [path]
  files = sorted(os.path.join(path, f) for f in os.listdir(path)
                 if f.lower().endswith(IMAGE_EXTENSIONS))
  if not files:
    raise ConfigError(f'--edit_input={path} holds no image files ({", ".join(IMAGE_EXTENSIONS)}).')
  return files


def _read_image(path: str):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  try:
    image = Image.open(path)
    image.load()
  except Exception as e:  # pylint: disable=broad-except
    raise ConfigError(f'Cannot read {path} as an image ({e}).') from e
  # Alpha and palettes are not channels of the picture.
  grey = image.mode in ('1', 'L', 'LA', 'I', 'I;16', 'F')
  return image.convert('L' if grey else 'RGB')


def load_image_files(path: str, image_size: int, num_channels: int, resize: bool = False,
                     accept_sizes: tuple[int, ...] = (), accept_grey: bool = False) -> np.ndarray:
  """Image files as uint8 [N, S, S, C]; S = image_size (or one of accept_sizes), C = num_channels.

  Args:
    path: an image file or a folder of them (taken in name order).
    image_size, num_channels: the run's images.
    resize: resize (bicubic) and convert (grey <-> RGB) files that do not match, instead of failing.
    accept_sizes: other sizes taken as they are (super-resolution's low-resolution inputs).
    accept_grey: take grey files for an RGB run as R = G = B (colorization).

  Raises:
    ConfigError: a file is missing, unreadable, or of another size or channel count (without
      `resize`); the message says what the run expects.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  images = []
  sizes = {image_size, *accept_sizes}
  for file in _image_files(path):
    image = _read_image(file)
    channels = 1 if image.mode == 'L' else 3
    if channels != num_channels and not (accept_grey and channels == 1):
      if not resize:
        raise ConfigError(f'{file} has {channels} channel(s); this run models {num_channels}-channel '
                          'images. Convert it, or pass --config.edit.resize=True to convert inputs.')
      image = image.convert('L' if num_channels == 1 else 'RGB')
    if image.size[0] != image.size[1] or image.size[0] not in sizes:
      if not resize:
        expected = ' or '.join(f'{s}x{s}' for s in sorted(sizes, reverse=True))
        raise ConfigError(f'{file} is {image.size[0]}x{image.size[1]}; this run edits {expected} '
                          'images. Resize it, or pass --config.edit.resize=True to resize inputs to '
                          f'{image_size}x{image_size}.')
      image = image.resize((image_size, image_size), Image.BICUBIC)
    array = np.asarray(image, np.uint8)
    array = array[..., None] if array.ndim == 2 else array
    if array.shape[-1] != num_channels:  # A grey file for a colour run (accept_grey).
      array = np.repeat(array, num_channels, axis=-1)
    images.append(array)
  shapes = {a.shape for a in images}
  if len(shapes) > 1:
    raise ConfigError(f'The files in {path} have different shapes {sorted(shapes)}; give one size.')
  return np.stack(images)


def load_mask(spec: str, image_size: int, resize: bool = False) -> np.ndarray:
  """edit.mask as a [H, W] float mask, 1 on the pixels to generate: a named shape or a PNG file.

  PNG: white (>= 128 after conversion to grey) marks the pixels to generate.
  """
  if spec in editing.MASKS:
    return editing.named_mask(spec, image_size)
  if not os.path.isfile(spec):
    raise ConfigError(f'edit.mask={spec!r} is neither a named mask ({", ".join(editing.MASKS)}) nor an '
                      'existing PNG file.')
  from PIL import Image  # pylint: disable=g-import-not-at-top
  image = _read_image(spec).convert('L')
  if image.size != (image_size, image_size):
    if not resize:
      raise ConfigError(f'The mask {spec} is {image.size[0]}x{image.size[1]}; the run\'s images are '
                        f'{image_size}x{image_size}. Give a mask of that size, or pass '
                        '--config.edit.resize=True to resize it (nearest).')
    image = image.resize((image_size, image_size), Image.NEAREST)
  mask = (np.asarray(image) >= 128).astype(np.float32)
  if not mask.any():
    raise ConfigError(f'The mask {spec} has no white pixel: nothing to inpaint (white = generate).')
  return mask


def edit_sigmas(config: ml_collections.ConfigDict) -> list[float]:
  """The edit's time points: edit.sigmas, else edit.ts on the N-grid, else evenly spaced indices.

  Interpolation defaults to one step, T: the paper's interpolation of one-step samples, whose initial
  noise alone decides the image.
  """
  e, m = config.edit, config.model
  if len(e.sigmas):
    return sampling.check_time_points(e.sigmas, m.sigma_min, 'edit.sigmas')
  if e.task == 'interpolation' and not len(e.ts):
    return [float(m.sigma_max)]
  num_scales = consistency.max_num_scales(config.consistency, config.training.num_steps)
  ts = tuple(e.ts) or tuple(range(0, num_scales - 1, max(1, num_scales // DEFAULT_STEPS)))
  return sampling.check_time_points(sampling.sigmas_from_indices(ts, num_scales, m), m.sigma_min,
                                    'edit.ts')


def stroke_images(images: np.ndarray) -> np.ndarray:
  """A stand-in for stroke paintings of dataset images ([-1, 1]): blocks of flat, few colours."""
  factor = max(2, images.shape[1] // 8)
  blocks = editing.patch_means(images, factor) if images.shape[1] % factor == 0 else images
  return np.round((blocks + 1.0) * 1.5) / 1.5 - 1.0  # 4 levels per channel: -1, -1/3, 1/3, 1.


# --------------------------------------------------------------------------------------------------
# Running an editor over sharded batches.
# --------------------------------------------------------------------------------------------------
def run_batched(fn: Callable, params, arrays: dict[str, np.ndarray], batch_size: int, seed: int,
                mesh: jax.sharding.Mesh, num_draws: int = 1) -> np.ndarray:
  """fn(params, key, batch) over `arrays` in batches split over the mesh; the outputs (float) in order.

  Draw d of batch b uses the key fold_in(fold_in(PRNGKey(seed), d), b); batches are padded to a
  multiple of the devices and processes by rows that are dropped, so the result does not depend on
  the number of devices. Returns [num_draws, N, ...].
  """
  num = len(next(iter(arrays.values())))
  batch_size = min(batch_size, num)  # A few inputs are not padded to a whole configured batch.
  padded = sharding.padded_batch_size(batch_size, mesh)
  jitted = jax.jit(fn, out_shardings=sharding.batch_sharding(mesh))
  return np.stack([_run_draw(jitted, params, arrays, num, batch_size, padded,
                             jax.random.fold_in(jax.random.PRNGKey(seed), draw), mesh)
                   for draw in range(num_draws)])


def _run_draw(jitted, params, arrays, num, batch_size, padded, base, mesh) -> np.ndarray:
  outputs = []
  for b in range(-(-num // batch_size)):
    rows = slice(b * batch_size, min((b + 1) * batch_size, num))
    batch = {}
    for name, array in arrays.items():
      chunk = array[rows]
      pad = np.zeros((padded - chunk.shape[0],) + chunk.shape[1:], chunk.dtype)
      batch[name] = sharding.put_batch(np.concatenate([chunk, pad]), mesh)
    out = jitted(params, jax.random.fold_in(base, b), batch)
    outputs.append(train.gather(out)[:rows.stop - rows.start])
  return np.concatenate(outputs)


def _consistency_fn_of(exp: train.Experiment, params, labels, ode_steps: int) -> sampling.ConsistencyFn:
  """The run's consistency function; for an EDM run, its PF-ODE solved down to sigma_min."""
  if exp.method.is_consistency:
    return exp.model.consistency_fn(params, labels)
  m = exp.config.model
  return sampling.ode_consistency_fn(exp.model.denoiser_fn(params, labels), ode_steps, m.sigma_min, m.rho)


# --------------------------------------------------------------------------------------------------
# The mode.
# --------------------------------------------------------------------------------------------------
def _inputs(config, edit_input: str, task: str) -> tuple[np.ndarray, np.ndarray | None, bool]:
  """(uint8 images, labels or None, from_dataset)."""
  e, d = config.edit, config.data
  if e.num_images < 1:
    raise ConfigError(f'edit.num_images={e.num_images} must be >= 1.')
  if edit_input:
    low = (d.image_size // e.superres_factor,) if task == 'superres' else ()
    images = load_image_files(edit_input, d.image_size, d.num_channels, e.resize, low,
                              accept_grey=task == 'colorization')
    images = images[:e.num_images]
    labels = None
    if config.model.num_classes > 0:
      if e.label >= config.model.num_classes:
        raise ConfigError(f'edit.label={e.label} but the model has {config.model.num_classes} classes.')
      labels = (np.full((len(images),), e.label, np.int32) if e.label >= 0 else
                np.random.default_rng(e.seed).integers(0, config.model.num_classes, len(images),
                                                      dtype=np.int32))
    return images, labels, False
  split = e.split or d.eval_split
  images, labels = data.load_split(d, split, process_index=0, process_count=1)
  if len(images) < e.num_images:
    raise ConfigError(f'edit.num_images={e.num_images} but {d.name}[{split}] has {len(images)} images.')
  labels = labels[:e.num_images].astype(np.int32) if config.model.num_classes > 0 else None
  return images[:e.num_images], labels, True


def _check(config) -> None:
  e, d = config.edit, config.data
  if e.task not in editing.TASKS:
    raise ConfigError(f'edit.task={e.task!r} is unknown: use one of {", ".join(editing.TASKS)}.')
  if e.task == 'colorization':
    editing.check_colorization(d.num_channels)
  if e.task == 'superres':
    editing.check_superres((d.image_size, d.image_size), e.superres_factor)
  if e.batch_size < 1:
    raise ConfigError(f'edit.batch_size={e.batch_size} must be >= 1.')
  if e.num_draws < 1 or (e.num_draws > 1 and e.task == 'interpolation'):
    raise ConfigError(f'edit.num_draws={e.num_draws} must be >= 1 (and 1 for interpolation, which is '
                      'not scored).')
  if e.task == 'interpolation':
    if e.interpolation_points < 2:
      raise ConfigError(f'edit.interpolation_points={e.interpolation_points} must be >= 2 (endpoints).')
    if e.interpolation_source not in ('samples', 'inputs'):
      raise ConfigError(f"edit.interpolation_source={e.interpolation_source!r}: use 'samples' or 'inputs'.")
    if e.interpolation_source == 'inputs' and config.method == 'ct':
      raise ConfigError('Interpolating inputs encodes them with the PF-ODE of an EDM teacher, which a '
                        "ct run has none of: use edit.interpolation_source='samples'.")
  if e.task == 'denoising' and not e.noise_sigma > config.model.sigma_min:
    raise ConfigError(f'edit.noise_sigma={e.noise_sigma} must be above model.sigma_min.')
  if e.task == 'stroke' and not config.model.sigma_min < e.stroke_sigma <= config.model.sigma_max:
    raise ConfigError(f'edit.stroke_sigma={e.stroke_sigma} must be in (sigma_min, sigma_max].')


def edit(config: ml_collections.ConfigDict, workdir: str, edit_input: str = '') -> dict[str, Any]:
  """Run config.edit.task on dataset images (or the files at `edit_input`) with the run in `workdir`.

  Returns:
    {'task', 'nfe', 'num_images', 'sigmas', 'dir', metrics...}.
  """
  workdir = os.path.abspath(workdir)
  e, m = config.edit, config.model
  # ---- Checks and inputs, before anything is restored or compiled. ----
  _check(config)
  task = e.task
  sigmas = edit_sigmas(config)
  mask = load_mask(e.mask, config.data.image_size, e.resize) if task == 'inpainting' else None
  needs_inputs = not (task == 'interpolation' and e.interpolation_source == 'samples')
  if needs_inputs:
    images_u8, labels, from_dataset = _inputs(config, edit_input, task)
    images = data.to_float(images_u8)
  encode = task == 'interpolation' and e.interpolation_source == 'inputs'
  if encode and len(images) < 2:
    raise ConfigError('Interpolating inputs needs at least 2 images (pairs 0-1, 2-3, ...).')
  if task == 'stroke':
    sigmas = [e.stroke_sigma] + [s for s in sigmas if s < e.stroke_sigma]
  if task == 'denoising':
    sigmas = [e.noise_sigma]

  exp, state, frozen, step = sampling_cli.restore(config, workdir,
                                                  needs_teacher=encode and config.method == 'cd')
  params = train.eval_params(state, config.sampling.ema_index)
  ode_steps = config.sampling.num_steps
  conditional = m.num_classes > 0
  clip = e.clip_denoised

  # ---- The task: degraded inputs, the editor, references and baselines (floats in [-1, 1]). ----
  arrays, reference, shown_input, baseline, region = {}, None, None, None, None
  columns = None
  if needs_inputs:
    arrays['image'] = images
    if conditional:
      arrays['label'] = labels
  if task == 'inpainting':
    reference = images
    shown_input = np.where(mask[None, :, :, None] > 0, 0.0, images)
    baseline, region = editing.mean_fill(images, mask), mask
    editor = lambda f, key, x: editing.inpaint(f, key, x, mask, sigmas, m.sigma_min, clip)
  elif task == 'colorization':
    reference = images
    grey = editing.luminance(images)[..., None]
    shown_input = baseline = np.repeat(grey, 3, axis=-1).astype(np.float32)
    editor = lambda f, key, x: editing.colorize(f, key, x, sigmas, m.sigma_min, clip)
  elif task == 'superres':
    low_res = images_u8.shape[1] != config.data.image_size
    if low_res:  # A low-resolution file: its pixels are the patch means.
      images = np.repeat(np.repeat(images, e.superres_factor, 1), e.superres_factor, 2)
      arrays['image'] = images
    else:
      reference = images
    shown_input = baseline = editing.patch_means(images, e.superres_factor)
    editor = lambda f, key, x: editing.super_resolve(f, key, x, e.superres_factor, sigmas,
                                                     m.sigma_min, clip)
  elif task == 'stroke':
    strokes = stroke_images(images) if from_dataset else images
    arrays['image'] = shown_input = strokes
    reference = images if from_dataset else None
    editor = lambda f, key, x: editing.stroke_guided(f, key, x, sigmas, m.sigma_min, clip)
  elif task == 'denoising':
    noisy = images
    if from_dataset:
      noise = np.random.default_rng(e.seed).standard_normal(images.shape).astype(np.float32)
      noisy = images + e.noise_sigma * noise
      reference, baseline = images, noisy
    arrays['image'] = shown_input = noisy
    editor = lambda f, key, x: editing.denoise(f, key, x, e.noise_sigma, m.sigma_min,
                                               clip_denoised=clip)
  else:  # interpolation
    points = e.interpolation_points
    columns = points
    if encode:
      pairs = len(images) // 2
      arrays = {'image_a': images[0:2 * pairs:2], 'image_b': images[1:2 * pairs:2]}
      if conditional:  # Each pair interpolates under its first image's label.
        arrays['label'] = labels[0:2 * pairs:2]
      shown_input = np.stack([images[0:2 * pairs:2], images[1:2 * pairs:2]], axis=1).reshape(
          (-1,) + images.shape[1:])
      reference = None
    else:
      pairs = e.num_images
      arrays = {'pair': np.arange(pairs, dtype=np.int32)}
      if conditional:
        arrays['label'] = np.random.default_rng(e.seed).integers(0, m.num_classes, pairs).astype(np.int32)

  image_shape = exp.image_shape

  def edit_batch(both_params, key, batch):
    p, teacher_params = both_params
    batch_labels = batch.get('label') if conditional else None
    if task != 'interpolation':
      f = _consistency_fn_of(exp, p, batch_labels, ode_steps)
      return editor(f, key, batch['image'])
    rows = next(iter(batch.values())).shape[0]
    point_labels = None if batch_labels is None else jnp.repeat(batch_labels, points)
    f = _consistency_fn_of(exp, p, point_labels, ode_steps)
    noise_key, step_key = jax.random.split(key)
    if encode:
      denoiser_params = teacher_params if config.method == 'cd' else p
      denoiser = exp.model.denoiser_fn(denoiser_params, batch_labels)
      za = sampling.ode_encode(denoiser, batch['image_a'], ode_steps, m)
      zb = sampling.ode_encode(denoiser, batch['image_b'], ode_steps, m)
    else:
      # One key per endpoint: the noise of a row then does not depend on the padded batch size, so
      # on the device count (a single (2, rows) draw would).
      key_a, key_b = jax.random.split(noise_key)
      za = jax.random.normal(key_a, (rows,) + image_shape)
      zb = jax.random.normal(key_b, (rows,) + image_shape)
    return editing.interpolate(f, step_key, za, zb, points, sigmas, m.sigma_min, clip)

  start = time.time()
  # The teacher (which encodes a CD run's inputs) is an argument, not a constant baked into the program.
  draws = run_batched(edit_batch, (params, frozen.get('teacher_params')), arrays, e.batch_size, e.seed,
                      exp.mesh, e.num_draws)
  result = draws[0]
  nfe_per_step = 1 if exp.method.is_consistency else karras_ode_nfe(ode_steps)
  nfe = len(sigmas) * nfe_per_step
  logging.info('Edit %s of %d inputs (%d time points, NFE %d) in %.1f s.', task, len(result),
               len(sigmas), nfe, time.time() - start)
  if task == 'interpolation':
    result = result.reshape((-1,) + image_shape)
    if shown_input is None:  # Sampled endpoints.
      shown_input = np.stack([result[0::points], result[points - 1::points]], axis=1).reshape(
          (-1,) + image_shape)
  result = np.clip(result, -1.0, 1.0)

  # ---- Scores against the real images, and the outputs. ----
  name = f'{task}_{e.interpolation_source}' if task == 'interpolation' else task
  if not needs_inputs:
    inputs = 'samples'
  else:
    inputs = edit_input or f'{config.data.name}[{e.split or config.data.eval_split}]'
  out = {'task': task, 'nfe': nfe, 'num_images': int(len(result)), 'sigmas': sigmas, 'step': step,
         'inputs': inputs}
  if task == 'inpainting':
    out['mask'] = e.mask
  if task == 'superres':
    out['superres_factor'] = e.superres_factor
  if reference is not None:
    draws = np.clip(draws, -1.0, 1.0)
    # Pooled over draws: the error of one edit; the mean of the draws estimates the posterior mean.
    out['rmse'] = editing.region_rmse(draws.reshape((-1,) + draws.shape[2:]),
                                      np.concatenate([reference] * len(draws)), region)
    if len(draws) > 1:
      out['num_draws'] = len(draws)
      out['rmse_mean_of_draws'] = editing.region_rmse(draws.mean(axis=0), reference, region)
    if baseline is not None:
      out['baseline_rmse'] = editing.region_rmse(baseline, reference, region)
      out['baseline'] = {'inpainting': 'mean fill', 'colorization': 'grey image',
                         'superres': 'nearest upsampling', 'denoising': 'noisy input'}[task]
  out_dir = os.path.join(workdir, 'edit', f'{name}_nfe{nfe}')
  out['dir'] = out_dir
  if jax.process_index() == 0:
    write_edit_outputs(out_dir, config, shown_input, result,
                       reference if reference is not None else shown_input,
                       arrays.get('label'), columns, draws if len(draws) > 1 else None)
    with open(os.path.join(out_dir, 'metrics.json'), 'w') as fp:
      json.dump(out, fp, indent=2, sort_keys=True)
    run.write_metrics(workdir, f'edit/{name}_nfe{nfe}', out)
  logging.info('Edit: %s', out)
  return out


def karras_ode_nfe(num_steps: int) -> int:
  """Network evaluations of one `sampling.ode_consistency_fn` call (Heun, last level not evaluated)."""
  return 2 * (num_steps - 1)


def write_edit_outputs(out_dir: str, config, inputs: np.ndarray, results: np.ndarray,
                       references: np.ndarray, labels, columns: int | None = None,
                       draws: np.ndarray | None = None) -> None:
  """input.png, result.png, reference.png and edits.npz (uint8 NHWC; all draws too) in out_dir."""
  os.makedirs(out_dir, exist_ok=True)
  upscale = train.upscale_for(config.data.image_size)
  arrays = {'input': data.to_uint8(inputs), 'result': data.to_uint8(results),
            'reference': data.to_uint8(references)}
  limit = config.training.num_grid_samples
  for name, images in arrays.items():
    cols = columns if name == 'result' else (2 if columns else None)
    count = limit if columns is None else (limit // columns) * (columns if name == 'result' else 2)
    train.save_png(os.path.join(out_dir, f'{name}.png'), train.image_grid(images[:max(count, 1)], cols),
                   upscale)
  if labels is not None:
    arrays['labels'] = np.asarray(labels).astype(np.int64)
  if draws is not None:
    arrays['draws'] = data.to_uint8(draws)
  tmp = os.path.join(out_dir, 'edits.tmp.npz')
  np.savez(tmp, **arrays)
  os.replace(tmp, os.path.join(out_dir, 'edits.npz'))

"""The zero-shot edits of the CM paper (Alg. 4, Appendix D), one small object per task, and their
inputs: image files, masks and the edit's time points, all checked before anything is compiled.

A task turns inputs (dataset images or files, [-1, 1] floats) into what the editor reads (`arrays`),
says what the result is scored against (`reference`, over `region`) and the trivial baseline it must
beat, and edits one batch given the run's consistency function. `cm_jax.modes.edit` drives them.
"""

import dataclasses
import os
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from cm_jax import consistency, editing, methods, sampling
from cm_jax.errors import ConfigError, choose

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.gif', '.webp', '.tif', '.tiff')
# Default edit time points: indices 0, k, 2k, ... < N - 1 on the N-grid, k = max(1, N // DEFAULT_STEPS):
# every level of an N = 18 grid (17 NFE). Editing gains from many replacement steps (Alg. 4): on digits
# with CD, lower-half inpainting and 2x super-resolution err less with 17 steps than with 2 or 6.
DEFAULT_STEPS = 18


# --------------------------------------------------------------------------------------------------
# Inputs: image files and masks.
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


def edit_sigmas(config) -> list[float]:
  """The edit's time points: edit.sigmas, else edit.ts on the N-grid, else evenly spaced indices.

  Interpolation defaults to one step, T: the paper's interpolation of one-step samples, whose initial
  noise alone decides the image.
  """
  e, n = config.edit, config.noise
  if len(e.sigmas):
    return sampling.check_time_points(e.sigmas, n.sigma_min, 'edit.sigmas')
  if e.task == 'interpolation' and not len(e.ts):
    return [float(n.sigma_max)]
  num_scales = consistency.max_num_scales(config.consistency, config.training.num_steps)
  ts = tuple(e.ts) or tuple(range(0, num_scales - 1, max(1, num_scales // DEFAULT_STEPS)))
  return sampling.check_time_points(sampling.sigmas_from_indices(ts, num_scales, n), n.sigma_min,
                                    'edit.ts')


def stroke_images(images: np.ndarray) -> np.ndarray:
  """A stand-in for stroke paintings of dataset images ([-1, 1]): blocks of flat, few colours."""
  factor = max(2, images.shape[1] // 8)
  blocks = editing.patch_means(images, factor) if images.shape[1] % factor == 0 else images
  return np.round((blocks + 1.0) * 1.5) / 1.5 - 1.0  # 4 levels per channel: -1, -1/3, 1/3, 1.


# --------------------------------------------------------------------------------------------------
# The tasks.
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Prepared:
  """A task's inputs: the editor's arrays (batched over rows), what the result is scored against
  (reference, over region: None = all pixels), the trivial baseline and what the input grid shows."""
  arrays: dict[str, np.ndarray]
  reference: np.ndarray | None = None
  baseline: np.ndarray | None = None
  region: np.ndarray | None = None
  shown_input: np.ndarray | None = None


class EditTask:
  """One edit. Subclasses set `name` and implement `prepare` and `edit`."""
  name: ClassVar[str]
  baseline_name: ClassVar[str | None] = None  # What the trivial baseline is, when scored.
  grey_inputs: ClassVar[bool] = False  # Files may be grey for an RGB run.

  def __init__(self, config):
    self.config, self.e, self.noise = config, config.edit, config.noise
    self.clip = self.e.clip_denoised
    for field in ('num_images', 'batch_size', 'num_draws'):
      if self.e[field] < 1:
        raise ConfigError(f'edit.{field}={self.e[field]} must be >= 1.')
    self.check()
    # Computed now, with numpy: the editors are traced with them as constants.
    self.sigmas = self.time_points()

  def check(self) -> None:
    """ConfigError for settings this task cannot use (before anything is read or compiled)."""

  @property
  def result_name(self) -> str:
    return self.name

  @property
  def needs_inputs(self) -> bool:
    return True

  @property
  def encodes(self) -> bool:
    """Whether the edit encodes images into noise with a PF-ODE (the method's `encoder`)."""
    return False

  def low_res_sizes(self) -> tuple[int, ...]:
    """Other image sizes accepted for input files."""
    return ()

  def time_points(self) -> list[float]:
    """The edit's noise levels (edit.sigmas or edit.ts, see `edit_sigmas`)."""
    return edit_sigmas(self.config)

  def prepare(self, images: np.ndarray, from_dataset: bool) -> Prepared:
    raise NotImplementedError

  def row_labels(self, labels: np.ndarray) -> np.ndarray:
    """The class labels of the rows of `prepare`'s arrays, from the inputs' labels."""
    return labels

  def edit(self, f: sampling.ConsistencyFn, key: jax.Array, images: jax.Array) -> jax.Array:
    raise NotImplementedError

  def edit_batch(self, method: methods.Method, params, key, batch) -> jax.Array:
    """The edit of one batch with the run's consistency function; `params` is (own, encoder)."""
    f = method.edit_consistency_fn(params[0], method.labels_of(batch.get('label')))
    return self.edit(f, key, batch['image'])

  def record(self) -> dict[str, Any]:
    """Settings of the task written beside its scores."""
    return {}


class Inpainting(EditTask):
  name, baseline_name = 'inpainting', 'mean fill'

  def check(self):
    self.mask = load_mask(self.e.mask, self.config.data.image_size, self.e.resize)

  def prepare(self, images, from_dataset):
    return Prepared({'image': images}, images, editing.mean_fill(images, self.mask), self.mask,
                    np.where(self.mask[None, :, :, None] > 0, 0.0, images))

  def edit(self, f, key, images):
    return editing.inpaint(f, key, images, self.mask, self.sigmas, self.noise.sigma_min, self.clip)

  def record(self):
    return {'mask': self.e.mask}


class Colorization(EditTask):
  name, baseline_name, grey_inputs = 'colorization', 'grey image', True

  def check(self):
    editing.check_colorization(self.config.data.num_channels)

  def prepare(self, images, from_dataset):
    grey = np.repeat(editing.luminance(images)[..., None], 3, axis=-1).astype(np.float32)
    return Prepared({'image': images}, images, grey, None, grey)

  def edit(self, f, key, images):
    return editing.colorize(f, key, images, self.sigmas, self.noise.sigma_min, self.clip)


class SuperResolution(EditTask):
  name, baseline_name = 'superres', 'nearest upsampling'

  def check(self):
    size = self.config.data.image_size
    editing.check_superres((size, size), self.e.superres_factor)

  def low_res_sizes(self):
    return (self.config.data.image_size // self.e.superres_factor,)

  def prepare(self, images, from_dataset):
    factor = self.e.superres_factor
    reference = images
    if images.shape[1] != self.config.data.image_size:  # A low-resolution file: its pixels are the
      images = np.repeat(np.repeat(images, factor, 1), factor, 2)  # patch means; nothing to score.
      reference = None
    means = editing.patch_means(images, factor)
    return Prepared({'image': images}, reference, means, None, means)

  def edit(self, f, key, images):
    return editing.super_resolve(f, key, images, self.e.superres_factor, self.sigmas,
                                 self.noise.sigma_min, self.clip)

  def record(self):
    return {'superres_factor': self.e.superres_factor}


class Stroke(EditTask):
  name = 'stroke'

  def check(self):
    if not self.noise.sigma_min < self.e.stroke_sigma <= self.noise.sigma_max:
      raise ConfigError(f'edit.stroke_sigma={self.e.stroke_sigma} must be in (sigma_min, sigma_max].')

  def time_points(self):
    return [self.e.stroke_sigma] + [s for s in edit_sigmas(self.config) if s < self.e.stroke_sigma]

  def prepare(self, images, from_dataset):
    strokes = stroke_images(images) if from_dataset else images
    return Prepared({'image': strokes}, images if from_dataset else None, None, None, strokes)

  def edit(self, f, key, images):
    return editing.stroke_guided(f, key, images, self.sigmas, self.noise.sigma_min, self.clip)


class Denoising(EditTask):
  name, baseline_name = 'denoising', 'noisy input'

  def check(self):
    if not self.e.noise_sigma > self.noise.sigma_min:
      raise ConfigError(f'edit.noise_sigma={self.e.noise_sigma} must be above noise.sigma_min.')

  def time_points(self):
    return [self.e.noise_sigma]

  def prepare(self, images, from_dataset):
    if not from_dataset:  # Files are taken as noisy already: nothing to score.
      return Prepared({'image': images}, shown_input=images)
    noise = np.random.default_rng(self.e.seed).standard_normal(images.shape).astype(np.float32)
    noisy = images + self.e.noise_sigma * noise
    return Prepared({'image': noisy}, images, noisy, None, noisy)

  def edit(self, f, key, images):
    return editing.denoise(f, key, images, self.e.noise_sigma, self.noise.sigma_min,
                           clip_denoised=self.clip)


class Interpolation(EditTask):
  """Spherical interpolation of initial noises: of pairs of random noises ('samples'), or of pairs of
  input images encoded by a PF-ODE ('inputs'). Each row of the result is one interpolation."""
  name = 'interpolation'

  def check(self):
    e = self.e
    if e.num_draws != 1:
      raise ConfigError(f'edit.num_draws={e.num_draws} must be 1 for interpolation, which is not '
                        'scored.')
    if e.interpolation_points < 2:
      raise ConfigError(f'edit.interpolation_points={e.interpolation_points} must be >= 2 (endpoints).')
    choose({'samples': None, 'inputs': None}, e.interpolation_source, 'edit.interpolation_source')
    if self.encodes and methods.get(self.config.method).encoder is None:
      raise ConfigError('Interpolating inputs encodes them with a PF-ODE, which a '
                        f"{self.config.method} run has none of: use edit.interpolation_source='samples'.")

  @property
  def encodes(self) -> bool:
    return self.e.interpolation_source == 'inputs'

  @property
  def result_name(self):
    return f'interpolation_{self.e.interpolation_source}'

  @property
  def needs_inputs(self):
    return self.encodes

  def prepare(self, images, from_dataset):
    if not self.encodes:
      arrays = {'pair': np.arange(self.e.num_images, dtype=np.int32)}
      return Prepared(arrays)
    if len(images) < 2:
      raise ConfigError('Interpolating inputs needs at least 2 images (pairs 0-1, 2-3, ...).')
    pairs = len(images) // 2
    first, second = images[0:2 * pairs:2], images[1:2 * pairs:2]
    shown = np.stack([first, second], axis=1).reshape((-1,) + images.shape[1:])
    return Prepared({'image_a': first, 'image_b': second}, shown_input=shown)

  def row_labels(self, labels):
    if self.encodes:  # Each pair interpolates under its first image's label.
      return labels[0:len(labels) // 2 * 2:2]
    return np.random.default_rng(self.e.seed).integers(
        0, self.config.model.num_classes, self.e.num_images).astype(np.int32)

  def edit_batch(self, method, params, key, batch):
    own, encoder = params
    points, shape = self.e.interpolation_points, method.image_shape
    labels = method.labels_of(batch.get('label'))
    rows = next(iter(batch.values())).shape[0]
    point_labels = None if labels is None else jnp.repeat(labels, points)
    f = method.edit_consistency_fn(own, point_labels)
    noise_key, step_key = jax.random.split(key)
    if self.encodes:
      denoiser = method.model.denoiser_fn(encoder, labels)
      steps = self.config.sampling.num_steps
      za = sampling.ode_encode(denoiser, batch['image_a'], steps, self.noise)
      zb = sampling.ode_encode(denoiser, batch['image_b'], steps, self.noise)
    else:
      # One key per endpoint: the noise of a row then does not depend on the padded batch size, so
      # on the device count (a single (2, rows) draw would).
      key_a, key_b = jax.random.split(noise_key)
      za = jax.random.normal(key_a, (rows,) + shape)
      zb = jax.random.normal(key_b, (rows,) + shape)
    return editing.interpolate(f, step_key, za, zb, points, self.sigmas, self.noise.sigma_min,
                               self.clip)


TASKS = {cls.name: cls for cls in (Inpainting, Colorization, SuperResolution, Stroke, Denoising,
                                   Interpolation)}


def task(config) -> EditTask:
  """The task of edit.task, its settings checked."""
  return choose(TASKS, config.edit.task, 'edit.task')(config)

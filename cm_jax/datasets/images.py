"""Decoding, checking and resizing single images, with PIL, as the reference code does.

Shared by the input pipeline (images of a TFDS split, decoded in its worker threads) and by the
preparation of folders and resized TFDS datasets (`cm_jax.datasets.prepare`), so that an image
prepared once and an image resized on the fly come out the same.

Resize methods (`data.resize`), for images that are not image_size x image_size squares:
  'adm': openai/consistency_models (and guided-diffusion) `image_datasets.center_crop_arr`, what the
    reference trains its ImageNet-64 and LSUN-256 models on: halve the image with a box filter while
    its short side is at least 2 * size, resize it with PIL's bicubic filter so that the short side
    is `size`, then take the central size x size square.
  'box': the reference's LSUN export (`datasets/lsun_bedroom.py`): one box-filter resize that makes
    the short side `size`, then the central square. For LSUN at 256, whose images already have a
    256-pixel short side, 'adm' and 'box' both reduce to the central crop.
"""

import io

import numpy as np
from PIL import Image

RESIZE_METHODS = ('adm', 'box')
# Extensions of the files that a folder dataset reads; every other file is reported as ignored.
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.webp')
# PIL modes that hold colour, converted to RGB without loss of meaning ('P': a palette of colours).
_COLOUR_MODES = ('RGB', 'P', 'CMYK', 'YCbCr', 'RGBA', 'LA', 'PA', 'RGBX')
_GREY_MODES = ('L', '1')


def open_image(data: bytes) -> Image.Image:
  """Decodes encoded image bytes (PNG, JPEG, WebP, ...); raises OSError/ValueError if it cannot."""
  image = Image.open(io.BytesIO(data))
  image.load()  # Decode now: a truncated file fails here, not later.
  return image


def center_crop_arr(image: Image.Image, size: int) -> np.ndarray:
  """openai/consistency_models `cm/image_datasets.py` center_crop_arr, operation for operation."""
  # Box-halving first gives a better downsample than one bicubic step (the reference's comment).
  while min(*image.size) >= 2 * size:
    image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
  scale = size / min(*image.size)
  image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
  array = np.array(image)
  crop_y = (array.shape[0] - size) // 2
  crop_x = (array.shape[1] - size) // 2
  return array[crop_y:crop_y + size, crop_x:crop_x + size]


def box_crop_arr(image: Image.Image, size: int) -> np.ndarray:
  """openai/consistency_models `datasets/lsun_bedroom.py` read_images: one box resize, central crop."""
  width, height = image.size
  scale = size / min(width, height)
  image = image.resize((int(round(scale * width)), int(round(scale * height))), resample=Image.BOX)
  array = np.array(image)
  h_off = (array.shape[0] - size) // 2
  w_off = (array.shape[1] - size) // 2
  return array[h_off:h_off + size, w_off:w_off + size]


_RESIZERS = {'adm': center_crop_arr, 'box': box_crop_arr}


def to_mode(image: Image.Image, num_channels: int) -> Image.Image:
  """The image as RGB (3 channels) or L (1 channel), converting whatever mode it has.

  For datasets whose images a catalogue declares (TFDS), as TensorFlow's decoders do with a fixed
  channel count: grey JPEGs of a colour dataset (ImageNet has a few) become RGB.
  """
  mode = 'RGB' if num_channels == 3 else 'L'
  return image if image.mode == mode else image.convert(mode)


def mode_problem(image: Image.Image, num_channels: int) -> str | None:
  """Why a file's image does not belong in a dataset of `num_channels`, or None if it does.

  For a user's folder, where a grey image among colour ones (or a colour one among grey ones, or an
  image with transparent pixels) is more likely a mistake than data: the user is told, not guessed for.
  """
  mode = image.mode
  if num_channels == 3 and mode not in _COLOUR_MODES:
    return (f'greyscale or non-8-bit image (PIL mode {mode}) in a 3-channel dataset'
            if mode in _GREY_MODES or mode.startswith('I') or mode == 'F'
            else f'PIL mode {mode} is not an 8-bit colour image')
  if num_channels == 1 and mode not in _GREY_MODES:
    return f'PIL mode {mode} in a 1-channel (8-bit greyscale) dataset'
  if 'A' in mode or (mode == 'P' and 'transparency' in image.info):
    alpha = image.convert('RGBA').getchannel('A')
    if alpha.getextrema()[0] < 255:
      return f'transparent pixels (PIL mode {mode}); flatten the image onto a background first'
  return None


def crop_resize(image: Image.Image, size: int, method: str) -> np.ndarray:
  """A size x size uint8 array of `image` (already in its dataset's mode), resized by `method`."""
  if image.size == (size, size):
    return np.asarray(image)
  return _RESIZERS[method](image, size)


def as_hwc(array: np.ndarray) -> np.ndarray:
  """[H, W] grey arrays as [H, W, 1]."""
  return array[..., None] if array.ndim == 2 else array


def decode(data: bytes | np.ndarray, size: int, num_channels: int, method: str) -> np.ndarray:
  """An encoded (or already decoded) image of a catalogued dataset as a uint8 [size, size, C] array."""
  if isinstance(data, np.ndarray):  # Already decoded (mocked TFDS data, in-memory arrays).
    image = Image.fromarray(data.squeeze(-1) if data.shape[-1] == 1 else data)
  else:
    image = open_image(data)
  return as_hwc(crop_resize(to_mode(image, num_channels), size, method))

"""What a run writes besides checkpoints: sample npz files, image grids and the metrics record.

Every file is written whole or not at all (cm_jax.files). Only process 0 writes; the callers say so.

  <workdir>/samples/<name>_nfe<k>/samples_{N}x{H}x{W}x{C}.npz  arr_0 uint8 NHWC (+ arr_1 labels)
  <workdir>/samples/<name>_nfe<k>/grid.png
  <workdir>/metrics.json                                       {result name: result}
"""

import io
import json
import logging
import os
from typing import Any

import jax
import numpy as np

from cm_jax import files


def result_name(sampler: str, nfe: int) -> str:
  return f'{sampler}_nfe{nfe}'


def samples_dir(workdir: str, sampler: str, nfe: int) -> str:
  return os.path.join(workdir, 'samples', result_name(sampler, nfe))


def upscale_for(image_size: int) -> int:
  """Pixels per image pixel in saved grids: small images are enlarged to about 64 pixels."""
  return max(1, 64 // image_size)


def image_grid(images: np.ndarray, columns: int | None = None) -> np.ndarray:
  """uint8 NHWC -> one HWC uint8 grid with a 1-pixel border."""
  n, h, w, c = images.shape
  columns = columns or int(np.ceil(np.sqrt(n)))
  rows = -(-n // columns)
  grid = np.full((rows * (h + 1) + 1, columns * (w + 1) + 1, c), 255, np.uint8)
  for i, img in enumerate(images):
    r, col = divmod(i, columns)
    grid[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + col * (w + 1):1 + col * (w + 1) + w] = img
  return grid


def save_png(path: str, grid: np.ndarray, upscale: int = 1) -> str:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  if upscale > 1:
    grid = np.repeat(np.repeat(grid, upscale, axis=0), upscale, axis=1)
  image = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
  buffer = io.BytesIO()
  image.save(buffer, format='PNG')
  return files.atomic_write(path, lambda f: f.write(buffer.getvalue()), binary=True)


def write_samples(directory: str, images: np.ndarray, labels: np.ndarray | None) -> str:
  """The reference evaluator's format: samples_{N}x{H}x{W}x{C}.npz with arr_0 (and arr_1 labels)."""
  path = os.path.join(directory, 'samples_{}x{}x{}x{}.npz'.format(*images.shape))
  arrays = [images] if labels is None else [images, labels.astype(np.int64)]
  return files.write_npz(path, *arrays)


def write_metrics(workdir: str, name: str, result: dict) -> str:
  """Merge `result` under `name` into <workdir>/metrics.json."""
  path = os.path.join(workdir, 'metrics.json')
  existing = {}
  if os.path.exists(path):
    with open(path) as f:
      existing = json.load(f)
  existing[name] = result
  return files.write_json(path, existing)


def plain(scores: dict[str, Any]) -> dict[str, Any]:
  """Metric values as JSON numbers (ints stay ints)."""
  return {k: int(v) if isinstance(v, (int, np.integer)) else float(v) for k, v in scores.items()}


def write_sample_outputs(workdir: str, sampler: str, nfe: int, images: np.ndarray,
                         labels: np.ndarray | None, scores: dict[str, Any], extra: dict[str, Any],
                         num_grid: int, upscale: int, writer=None, step: int = 0) -> dict:
  """Samples npz and grid.png under samples/<sampler>_nfe<k>, and the result in metrics.json and
  TensorBoard. Returns the result: sampler, nfe, num_samples, `extra`, the scores, npz and grid."""
  name = result_name(sampler, nfe)
  result = {'sampler': sampler, 'nfe': nfe, 'num_samples': int(images.shape[0]), **extra,
            **plain(scores)}
  grid = image_grid(images[:num_grid])
  if writer is not None:
    writer.write_images(step, {f'samples/{name}': grid[None]})
    writer.write_scalars(step, {f'{name}/{k}': v for k, v in plain(scores).items()})
  if jax.process_index() == 0:
    out_dir = samples_dir(workdir, sampler, nfe)
    result['npz'] = write_samples(out_dir, images, labels)
    result['grid'] = save_png(os.path.join(out_dir, 'grid.png'), grid, upscale)
    write_metrics(workdir, name, result)
  logging.info('Samples: %s', result)
  return result

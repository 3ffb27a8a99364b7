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
turned grey, averaged over patches, pixelated into strokes, noised), files are taken as given. The
tasks are cm_jax.edit_tasks.

Output: <workdir>/edit/<name>_nfe<k>/ (<name> is the task, or interpolation_<source>) with input.png,
result.png and reference.png grids, edits.npz (uint8 NHWC arrays input, result, reference; labels) and
metrics.json: the error on the generated region against the real images and the trivial baseline's
(mean fill, nearest upsampling, grey image, the noisy input), RMSE on [0, 1] intensities, when the
inputs are dataset images. Also in <workdir>/metrics.json as 'edit/<name>_nfe<k>'.
"""

import logging
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from cm_jax import data, edit_tasks, editing, files, inference, outputs
from cm_jax.errors import ConfigError


def run(config: ml_collections.ConfigDict, workdir: str, edit_input: str = '') -> dict[str, Any]:
  """Run config.edit.task on dataset images (or the files at `edit_input`) with the run in `workdir`.

  Returns:
    {'task', 'nfe', 'num_images', 'sigmas', 'dir', metrics...}.
  """
  workdir = os.path.abspath(workdir)
  # ---- Checks and inputs, before anything is restored or compiled. ----
  task = edit_tasks.task(config)
  sigmas = task.sigmas
  images, labels, inputs = (_inputs(config, task, edit_input) if task.needs_inputs
                            else (None, None, 'samples'))
  prepared = task.prepare(images, from_dataset=not edit_input)
  if config.model.num_classes > 0:
    prepared.arrays['label'] = task.row_labels(labels).astype(np.int32)

  # ---- The edit, over batches sharded on the mesh. ----
  restored = inference.restore(config, workdir)
  method = restored.exp.method
  encoder = restored.params(method.encoder) if task.encodes else None
  start = time.time()
  e = config.edit
  # The encoder (a CD run's teacher) is an argument, not a constant baked into the program.
  draws = inference.run_batched(lambda params, key, batch: task.edit_batch(method, params, key, batch),
                                (restored.params(), encoder), prepared.arrays, e.batch_size, e.seed,
                                restored.exp.mesh, e.num_draws)
  nfe = len(sigmas) * method.edit_nfe_per_step()
  logging.info('Edit %s of %d inputs (%d time points, NFE %d) in %.1f s.', task.name, draws.shape[1],
               len(sigmas), nfe, time.time() - start)

  # ---- Scores against the real images, and the outputs. ----
  out = {'task': task.name, 'nfe': nfe, 'num_images': int(draws.shape[1]), 'sigmas': sigmas,
         'step': restored.step, 'inputs': inputs, **task.record()}
  if task.name == 'interpolation':
    out['num_images'] = int(draws.shape[1] * draws.shape[2])
  out.update(_scores(task, prepared, np.clip(draws, -1.0, 1.0)))
  out_dir = os.path.join(workdir, 'edit', f'{task.result_name}_nfe{nfe}')
  out['dir'] = out_dir
  if jax.process_index() == 0:
    _write_outputs(out_dir, config, task, prepared, draws)
    files.write_json(os.path.join(out_dir, 'metrics.json'), out)
    outputs.write_metrics(workdir, f'edit/{task.result_name}_nfe{nfe}', out)
  logging.info('Edit: %s', out)
  return out


def _inputs(config, task: edit_tasks.EditTask, edit_input: str
            ) -> tuple[np.ndarray, np.ndarray | None, str]:
  """(float images in [-1, 1], their labels (or None), where they come from)."""
  e, d = config.edit, config.data
  conditional = config.model.num_classes > 0
  if edit_input:
    images = edit_tasks.load_image_files(edit_input, d.image_size, d.num_channels, e.resize,
                                         task.low_res_sizes(), accept_grey=task.grey_inputs)
    images = images[:e.num_images]
    labels = None
    if conditional:
      if e.label >= config.model.num_classes:
        raise ConfigError(f'edit.label={e.label} but the model has {config.model.num_classes} classes.')
      labels = (np.full((len(images),), e.label, np.int32) if e.label >= 0 else
                np.random.default_rng(e.seed).integers(0, config.model.num_classes, len(images),
                                                      dtype=np.int32))
    return data.to_float(images), labels, edit_input
  split = e.split or d.eval_split
  images, labels = data.load_split(d, split, process_index=0, process_count=1)
  if len(images) < e.num_images:
    raise ConfigError(f'edit.num_images={e.num_images} but {d.name}[{split}] has {len(images)} images.')
  labels = labels[:e.num_images].astype(np.int32) if conditional else None
  return data.to_float(images[:e.num_images]), labels, f'{d.name}[{split}]'


def _scores(task: edit_tasks.EditTask, prepared: edit_tasks.Prepared, draws: np.ndarray) -> dict:
  """RMSE of the edits (pooled over draws, and of their mean) and of the baseline, on the region."""
  reference, region = prepared.reference, prepared.region
  if reference is None:
    return {}
  # Pooled over draws: the error of one edit; the mean of the draws estimates the posterior mean.
  scores = {'rmse': editing.region_rmse(draws.reshape((-1,) + draws.shape[2:]),
                                        np.concatenate([reference] * len(draws)), region)}
  if len(draws) > 1:
    scores['num_draws'] = len(draws)
    scores['rmse_mean_of_draws'] = editing.region_rmse(draws.mean(axis=0), reference, region)
  if prepared.baseline is not None:
    scores['baseline_rmse'] = editing.region_rmse(prepared.baseline, reference, region)
    scores['baseline'] = task.baseline_name
  return scores


def _write_outputs(out_dir: str, config, task: edit_tasks.EditTask, prepared: edit_tasks.Prepared,
                   draws: np.ndarray) -> None:
  """input.png, result.png, reference.png and edits.npz (uint8 NHWC; all draws too) in out_dir."""
  shape = tuple(config.data.image_size for _ in range(2)) + (config.data.num_channels,)
  result = np.clip(draws[0].reshape((-1,) + shape), -1.0, 1.0)
  columns = None
  shown = prepared.shown_input
  if task.name == 'interpolation':
    columns = config.edit.interpolation_points
    if shown is None:  # Sampled endpoints.
      shown = np.stack([result[0::columns], result[columns - 1::columns]], axis=1).reshape(
          (-1,) + shape)
  arrays = {'input': data.to_uint8(shown), 'result': data.to_uint8(result),
            'reference': data.to_uint8(prepared.reference if prepared.reference is not None
                                       else shown)}
  limit, upscale = config.training.num_grid_samples, outputs.upscale_for(config.data.image_size)
  for name, images in arrays.items():
    cols = columns if name == 'result' else (2 if columns else None)
    count = limit if columns is None else (limit // columns) * (columns if name == 'result' else 2)
    outputs.save_png(os.path.join(out_dir, f'{name}.png'),
                     outputs.image_grid(images[:max(count, 1)], cols), upscale)
  if 'label' in prepared.arrays:
    arrays['labels'] = np.asarray(prepared.arrays['label']).astype(np.int64)
  if len(draws) > 1:
    arrays['draws'] = data.to_uint8(np.clip(draws, -1.0, 1.0))
  files.write_npz(os.path.join(out_dir, 'edits.npz'), **arrays)

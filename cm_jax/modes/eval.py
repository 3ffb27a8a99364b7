r"""`--mode=eval`: sample a trained run (or read a samples npz) and score the samples.

  python launch.py --config=configs/cifar10_cd.py --workdir=runs/cifar10_cd --mode=eval \
      --config.eval.samplers="('onestep', 'multistep')"
  python launch.py --config=configs/digits_cd.py --workdir=runs/digits --mode=eval \
      --config.eval.samplers="('onestep', 'multistep', 'teacher_heun')"
  python launch.py --config=configs/cifar10_cd.py --workdir=runs/cifar10_cd --mode=eval \
      --eval_samples=/path/to/samples_50000x32x32x3.npz

The metrics (cm_jax.evaluators.image_metrics): the digits metric on the embedded digits dataset;
FID, Inception Score and precision/recall against cached reference statistics elsewhere.

Every sampler's result goes to <workdir>/eval/<sampler>_nfe<k>.json, into <workdir>/metrics.json as
'eval/<sampler>_nfe<k>' and to TensorBoard (<workdir>/eval) at the checkpoint's step.
"""

import logging
import os
import re
import time
import zipfile
from typing import Any

import jax
import ml_collections
import numpy as np
from clu import metric_writers

from cm_jax import config_utils, files, inference, outputs
from cm_jax.errors import ConfigError
from cm_jax.evaluators import image_metrics

# A samples directory written by the train, sample or eval mode: <sampler>_nfe<k>.
_SAMPLES_DIR_RE = re.compile(r'^(?P<sampler>[a-z_]+)_nfe(?P<nfe>\d+)$')


def run(config: ml_collections.ConfigDict, workdir: str, samples_path: str = '') -> dict:
  """Scores samples of the run in `workdir`, or those of an existing samples npz.

  Args:
    config: The run's config; `eval` and `sampling` say what to sample and how to score.
    workdir: The run (checkpoints are read from it unless `samples_path` is given); results go to
      <workdir>/eval, <workdir>/metrics.json and TensorBoard.
    samples_path: A samples npz (arr_0 uint8 NHWC) to score instead of sampling.

  Returns:
    {result name ('<sampler>_nfe<k>'): {'sampler', 'nfe', 'num_samples', 'step', 'samples_npz',
    'metrics': {...}, ...}}: the digits metric on the embedded digits dataset; fid,
    inception_score(_std), precision and recall otherwise.

  Raises:
    ConfigError, WorkdirError, TeacherError: bad settings, before anything is sampled.
    PretrainedWeightsNotFoundError: the FID Inception weights are missing (image datasets), before
      anything is sampled; the message says how to get them.
    DatasetNotFoundError: the reference split is not prepared.
  """
  workdir = os.path.abspath(workdir)
  # ---- Checks and inputs, before anything is sampled or compiled. ----
  images = None
  if samples_path:
    images = read_samples(samples_path, config)
    image_metrics.check_eval_config(config, images.shape[0])
  else:
    image_metrics.check_eval_config(config)
    inference.check_run_matches(config, workdir)  # Before the scorer loads anything.
  scorer = image_metrics.scorer(config, workdir)  # Missing Inception weights fail here.
  if samples_path:
    name, sampler, nfe = name_of_npz(samples_path)
    jobs, step, restored = [(name, sampler, nfe, None)], None, None
  else:
    restored = inference.restore(config, workdir)
    step = restored.step
    jobs = [(outputs.result_name(n, s.nfe), n, s.nfe, s) for n, s in _samplers(restored, config)]
  scorer.prepare()

  # ---- Sample and score. ----
  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0,
                                                collection='eval')
  results = {}
  for name, sampler_name, nfe, sampler in jobs:
    npz = os.path.abspath(samples_path) if samples_path else None
    if sampler is not None:
      images, npz = _generate(restored, sampler_name, sampler, config.eval.num_samples)
    start = time.time()
    result = {'sampler': sampler_name, 'nfe': nfe, 'num_samples': int(images.shape[0]),
              'step': step, 'samples_npz': npz, 'metrics': scorer(images), **scorer.record()}
    _write_result(workdir, name, result, writer, step or 0)
    logging.info('Eval %s (%.1f s): %s', name, time.time() - start, result['metrics'])
    results[name] = result
  writer.close()
  if jax.process_index() == 0:
    print(format_table(results), flush=True)
  return results


def _samplers(restored: inference.RestoredRun, config) -> list:
  """(name, Sampler) of each sampler asked for, every one checked before anything samples."""
  method = restored.exp.method
  field = 'eval.samplers' if config.eval.samplers else 'sampling.sampler'
  chosen = [(name or method.default_sampler, method.sampler(name, field))
            for name in config_utils.eval_samplers(config)]
  for _, sampler in chosen:
    restored.params(sampler.params)  # A teacher that cannot be loaded fails before any sampling.
  return chosen


def _generate(restored: inference.RestoredRun, name: str, sampler, num: int
              ) -> tuple[np.ndarray, str | None]:
  """Samples (on every process) and the npz they were written to (process 0)."""
  exp, s = restored.exp, restored.exp.config.sampling
  start = time.time()
  images, labels = inference.sample_images(exp, restored.params, name, sampler, num, s.seed,
                                           min(s.batch_size, num))
  logging.info('%d %s samples (NFE %d) in %.1f s.', images.shape[0], name, sampler.nfe,
               time.time() - start)
  path = None
  if jax.process_index() == 0:
    path = outputs.write_samples(outputs.samples_dir(exp.workdir, name, sampler.nfe), images, labels)
  return images, path


def read_samples(path: str, config: ml_collections.ConfigDict) -> np.ndarray:
  """The uint8 NHWC images (`arr_0`) of a samples npz, checked against the config's image shape."""
  if not os.path.isfile(path):
    raise ConfigError(f'--eval_samples={path} does not exist; pass a samples npz written by '
                      '--mode=sample or --mode=eval (samples_NxHxWxC.npz), or leave it empty to sample.')
  if not zipfile.is_zipfile(path):
    # np.load would read other files as pickles and advise loading them unsafely.
    raise ConfigError(f'--eval_samples={path} is not an npz file (a zip of arrays): pass a samples '
                      'npz written by --mode=sample or --mode=eval (samples_NxHxWxC.npz, arr_0 uint8 '
                      'NHWC).')
  try:
    with np.load(path, allow_pickle=False) as arrays:
      if 'arr_0' not in arrays.files:
        raise ConfigError(f'{path} has no arr_0 (it has {arrays.files}); a samples npz holds the images '
                          'as arr_0 (uint8 NHWC), as the reference evaluator expects.')
      images = arrays['arr_0']
  except (ValueError, OSError) as e:
    if isinstance(e, ConfigError):
      raise
    raise ConfigError(f'{path} is not a readable npz ({e}).') from e
  image_metrics.check_images(images, config, f'{path} (arr_0)')
  return images


def name_of_npz(path: str) -> tuple[str, str | None, int | None]:
  """(result name, sampler, NFE) of a samples npz; sampler and NFE when its folder says them."""
  folder = os.path.basename(os.path.dirname(os.path.abspath(path)))
  match = _SAMPLES_DIR_RE.match(folder)
  if match:
    return folder, match['sampler'], int(match['nfe'])
  return os.path.splitext(os.path.basename(path))[0], None, None


def format_table(results: dict[str, dict[str, Any]]) -> str:
  """A Markdown table: one row per sampler, one column per metric."""
  if not results:
    return ''
  keys = list(next(iter(results.values()))['metrics'])
  lines = ['| sampler | NFE | samples | ' + ' | '.join(keys) + ' |',
           '|---|---|---|' + '---|' * len(keys)]
  for name, r in results.items():
    cells = [str(v) if isinstance(v, int) else f'{v:.4f}' for v in (r['metrics'].get(k) for k in keys)]
    nfe = '-' if r['nfe'] is None else str(r['nfe'])
    lines.append(f"| {r['sampler'] or name} | {nfe} | {r['num_samples']} | " + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def _write_result(workdir: str, name: str, result: dict, writer, step: int) -> None:
  writer.write_scalars(step, {f'eval/{name}/{k}': v for k, v in result['metrics'].items()})
  if jax.process_index() == 0:
    files.write_json(os.path.join(workdir, 'eval', f'{name}.json'), result)
    outputs.write_metrics(workdir, f'eval/{name}', result)

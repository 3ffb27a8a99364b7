r"""Digits FD against training time for consistency runs on the same data: one PNG.

  python -m benchmarks.fd_vs_time --run=CD=runs/fig/cd --run=iCT=runs/fig/ict \
      --run=ECT=runs/fig/ect --bench=benchmarks/results/digits_ect_b128_cpu.json \
      --out=docs/digits_fd_vs_time.png

Runs whose folder holds no run or no checkpoint are left out (named in the title and the log), so
the figure shows what exists. Each run should keep its checkpoints (train it with
`--config.training.checkpoint_every=250 --config.training.keep_checkpoints=100`; README, "ECT").
For every checkpoint, the samples of --samplers (1000 by default, the run's sampling.seed and EMA
copy) are scored with the digits metric; the scores are cached in <workdir>/fd_by_step.json, so a
second call only plots. A run that starts from a teacher's weights (CD, ECT) also gets its step 0:
the teacher itself, sampled in 1 or 2 steps.

Time is steps times the method's training step time from a benchmark JSON (`python -m
benchmarks.run --config=configs/digits_ect.py --methods=edm,cd,ict,ect --skip_sampling`: median
seconds of the step on that machine, random weights, no data loading), not the runs' own wall
clocks, which a shared machine's load distorts. --step_time_of=ect=ct times a method the JSON lacks
with another's step of the same cost (the x label says so). Runs from a teacher start after the
teacher's own training (its steps times the EDM step), so the curves compare the whole cost;
--no_teacher_time starts every curve at 0. The PNG is drawn with Pillow (a project dependency): no
plotting library.
"""

import json
import logging
import math
import os
import sys
from typing import Sequence

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import jax  # pylint: disable=g-import-not-at-top
import ml_collections
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from benchmarks import run as bench
from cm_jax import checkpointing, config_utils, experiment, files, inference, teacher
from cm_jax.evaluators import image_metrics

CACHE_NAME = 'fd_by_step.json'
# Line colours by curve, in --run order, then sampler (solid 1-step, dashed 2-step).
COLOURS = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14))


# --------------------------------------------------------------------------------------------------
# Scores of every checkpoint of a run.
# --------------------------------------------------------------------------------------------------
def saved_config(workdir: str) -> ml_collections.ConfigDict:
  saved = config_utils.read_saved_config(workdir)
  if saved is None:
    raise FileNotFoundError(f'{workdir} has no config.json: is it a run directory?')
  return ml_collections.ConfigDict(saved)


def score_run(workdir: str, samplers: Sequence[str], num_samples: int) -> dict[int, dict]:
  """{step: {sampler: digits metric record}} of every checkpoint (and of the start from a teacher),
  read from the cache where already computed."""
  path = os.path.join(workdir, CACHE_NAME)
  cache = {}
  if os.path.exists(path):
    with open(path) as f:
      cache = {int(step): scores for step, scores in json.load(f).items()}
  config = saved_config(workdir)
  exp = experiment.build(inference.restore_config(config, workdir), workdir)
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, 'checkpoints'), read_only=True)
  steps = ckpt.all_steps()
  if exp.method.uses_teacher():
    steps = [0] + [s for s in steps if s != 0]
  todo = [s for s in steps if any(name not in cache.get(s, {}) for name in samplers)]
  if todo:
    scorer = image_metrics.DigitsScorer(config)
    abstract = checkpointing.with_shardings(exp.abstract_state, exp.state_shardings)
    for step in todo:
      if step == 0:
        start = exp.method.initial_weights(exp.resources)
        params = start.params if start.ema is None else start.ema
      else:
        items = ckpt.restore_items(step, {'params': abstract.params,
                                          'ema_params': abstract.ema_params})
        state = experiment.TrainState(items['params'], None, items['ema_params'], {})
        params = inference.eval_params(state, config.sampling.ema_index)
      for name in samplers:
        sampler = exp.method.sampler(name)
        images, _ = inference.sample_images(exp, lambda source: params, name, sampler, num_samples,
                                            config.sampling.seed,
                                            min(config.sampling.batch_size, num_samples))
        cache.setdefault(step, {})[name] = scorer(images)
        logging.info('%s step %d %s: digits FD %.2f', workdir, step, name,
                     cache[step][name]['digits_fd'])
      files.atomic_write(path, lambda f: json.dump({str(k): v for k, v in sorted(cache.items())},
                                                   f, indent=2))
  ckpt.close()
  return {s: cache[s] for s in steps}


def step_seconds(bench_result: dict, label: str, stand_ins: dict[str, str] | None = None) -> float:
  """The benchmark's median step time of method `label`, or of its stand-in (--step_time_of)."""
  train = bench_result['train']
  label = (stand_ins or {}).get(label, label)
  if label not in train:
    raise KeyError(f'The benchmark JSON has no {label!r} step (it has {", ".join(train)}): rerun '
                   f'it with --methods including {label}.')
  return train[label]['step']['median_s']


def teacher_seconds(workdir: str, config: ml_collections.ConfigDict, bench_result: dict) -> float:
  """The training time of the run's teacher (its steps at the EDM step time), 0 without one."""
  if config.method == 'ct' and not (config.teacher.workdir or config.teacher.config):
    return 0.0
  if config.method == 'edm':
    return 0.0
  saved = config_utils.read_saved_config(teacher.teacher_workdir(config, workdir))
  if saved is None:
    return 0.0
  return saved['training']['num_steps'] * step_seconds(bench_result, 'edm')


# --------------------------------------------------------------------------------------------------
# The figure, drawn with Pillow.
# --------------------------------------------------------------------------------------------------
def _nice_ticks(low: float, high: float, count: int = 6) -> list[float]:
  span = max(high - low, 1e-9)
  raw = span / count
  unit = 10 ** math.floor(math.log10(raw))
  step = next(m * unit for m in (1, 2, 5, 10) if m * unit >= raw)
  return [i * step for i in range(math.ceil(low / step), math.floor(high / step) + 1)]


def _log_ticks(low: float, high: float) -> list[float]:
  ticks = []
  for decade in range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1):
    for mantissa in (1, 2, 5):
      value = mantissa * 10 ** decade
      if low <= value <= high:
        ticks.append(value)
  return ticks


def draw_figure(curves: list[dict], out_path: str, title: str, x_label: str,
                markers: Sequence[tuple[float, str]] = ()) -> None:
  """Curves {label, colour, dashed, points: [(x minutes, FD)]} on a log-FD axis, written as a PNG.
  `markers` are vertical lines (x, text), e.g. where the teacher's training ends."""
  width, height = 1100, 700
  left, right, top, bottom = 90, 250, 60, 80
  image = Image.new('RGB', (width, height), 'white')
  draw = ImageDraw.Draw(image)
  font, small = ImageFont.load_default(size=18), ImageFont.load_default(size=15)
  xs = [x for c in curves for x, _ in c['points']] + [x for x, _ in markers]
  ys = [y for c in curves for _, y in c['points']]
  x_low, x_high = 0.0, max(xs) * 1.03
  y_low, y_high = min(ys) / 1.25, max(ys) * 1.25
  px = lambda x: left + (x - x_low) / (x_high - x_low) * (width - left - right)
  py = lambda y: top + (math.log(y_high) - math.log(y)) / (math.log(y_high) - math.log(y_low)) * (
      height - top - bottom)
  # Grid and ticks.
  for x in _nice_ticks(x_low, x_high):
    draw.line([(px(x), top), (px(x), height - bottom)], fill=(230, 230, 230))
    draw.text((px(x), height - bottom + 8), f'{x:g}', fill='black', font=small, anchor='mt')
  for y in _log_ticks(y_low, y_high):
    draw.line([(left, py(y)), (width - right, py(y))], fill=(230, 230, 230))
    draw.text((left - 8, py(y)), f'{y:g}', fill='black', font=small, anchor='rm')
  draw.rectangle([(left, top), (width - right, height - bottom)], outline='black')
  for x, text in markers:
    for y0 in range(top, height - bottom, 12):
      draw.line([(px(x), y0), (px(x), min(y0 + 6, height - bottom))], fill=(120, 120, 120))
    draw.text((px(x) + 4, top + 4), text, fill=(90, 90, 90), font=small, anchor='la')
  # Curves.
  for curve in curves:
    points = [(px(x), py(y)) for x, y in sorted(curve['points'])]
    if curve['dashed']:
      for a, b in zip(points, points[1:]):
        _dashed_line(draw, a, b, curve['colour'])
    else:
      draw.line(points, fill=curve['colour'], width=3)
    for x, y in points:
      draw.ellipse([(x - 4, y - 4), (x + 4, y + 4)], fill=curve['colour'])
  # Labels and legend.
  draw.text((width / 2 - right / 2 + left / 2, 20), title, fill='black', font=font, anchor='mt')
  draw.text(((left + width - right) / 2, height - 30), x_label, fill='black', font=font, anchor='mt')
  axis_label = Image.new('RGBA', (300, 30), (255, 255, 255, 0))
  ImageDraw.Draw(axis_label).text((150, 15), 'digits FD (log scale)', fill='black', font=font,
                                  anchor='mm')
  axis_label = axis_label.rotate(90, expand=True)
  image.paste(axis_label, (10, (top + height - bottom) // 2 - 150), axis_label)
  for i, curve in enumerate(curves):
    y = top + 20 + 28 * i
    x0 = width - right + 20
    if curve['dashed']:
      _dashed_line(draw, (x0, y), (x0 + 40, y), curve['colour'])
    else:
      draw.line([(x0, y), (x0 + 40, y)], fill=curve['colour'], width=3)
    draw.text((x0 + 50, y), curve['label'], fill='black', font=small, anchor='lm')
  files.atomic_write(out_path, lambda f: image.save(f, format='PNG'), binary=True)


def _dashed_line(draw, a, b, colour, dash: float = 10.0) -> None:
  length = math.dist(a, b)
  pieces = max(int(length / dash), 1)
  for i in range(0, pieces, 2):
    s, e = i / pieces, min((i + 1) / pieces, 1.0)
    draw.line([(a[0] + (b[0] - a[0]) * s, a[1] + (b[1] - a[1]) * s),
               (a[0] + (b[0] - a[0]) * e, a[1] + (b[1] - a[1]) * e)], fill=colour, width=3)


# --------------------------------------------------------------------------------------------------
# Command line.
# --------------------------------------------------------------------------------------------------
SAMPLER_NAMES = {'onestep': '1-step', 'multistep': '2-step'}


def curves_of(runs: Sequence[tuple[str, str]], bench_result: dict, samplers: Sequence[str],
              num_samples: int, teacher_time: bool, stand_ins: dict[str, str] | None = None
              ) -> tuple[list[dict], list[tuple[float, str]]]:
  """The figure's curves (x in minutes) and its markers (where teachers finish training)."""
  curves, markers = [], {}
  for i, (label, workdir) in enumerate(runs):
    config = saved_config(workdir)
    scores = score_run(workdir, samplers, num_samples)
    per_step = step_seconds(bench_result, bench.method_label(config), stand_ins)
    offset = teacher_seconds(workdir, config, bench_result) if teacher_time else 0.0
    if offset:
      markers[round(offset / 60, 3)] = 'teacher trained'
    for j, name in enumerate(samplers):
      points = [((offset + step * per_step) / 60, record[name]['digits_fd'])
                for step, record in scores.items()]
      curves.append({'label': f'{label} {SAMPLER_NAMES.get(name, name)}',
                     'colour': COLOURS[i % len(COLOURS)], 'dashed': j > 0, 'points': points})
  return curves, sorted(markers.items())


def _checkpoint_steps(workdir: str) -> list[int]:
  directory = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(directory):
    return []
  ckpt = checkpointing.Checkpointer(directory, read_only=True)
  try:
    return ckpt.all_steps()
  finally:
    ckpt.close()


def existing_runs(runs: Sequence[tuple[str, str]]
                  ) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
  """(runs that can be drawn, [(label, why not)] for the others): a figure of what exists."""
  found, missing = [], []
  for label, workdir in runs:
    if config_utils.read_saved_config(workdir) is None:
      missing.append((label, f'{workdir} holds no run'))
    elif not _checkpoint_steps(workdir):
      missing.append((label, f'{workdir} has no checkpoint'))
    else:
      found.append((label, workdir))
  return found, missing


def main(argv) -> None:
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  flag_values = flags.FLAGS
  try:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    tf.config.set_visible_devices([], 'GPU')
  except ImportError:
    pass
  runs = []
  for spec in flag_values.run:
    label, sep, workdir = spec.partition('=')
    if not sep or not label or not workdir:
      sys.exit(f'--run={spec}: use LABEL=WORKDIR, e.g. --run=ECT=runs/digits_ect.')
    runs.append((label, os.path.abspath(workdir)))
  runs, missing = existing_runs(runs)
  for label, why in missing:
    logging.warning('Not drawn: %s (%s).', label, why)
  if not runs:
    sys.exit('None of the --run folders holds a run with checkpoints: nothing to draw.')
  with open(flag_values.bench) as f:
    bench_result = json.load(f)
  stand_ins = dict(spec.split('=', 1) for spec in flag_values.step_time_of)
  curves, markers = curves_of(runs, bench_result, flag_values.samplers, flag_values.num_samples,
                              not flag_values.no_teacher_time, stand_ins)
  machine = bench_result['machine']
  x_label = (f'training time (min), steps x step time measured on {machine["num_devices"]} x '
             f'{machine["device_kind"]} ({machine["host_cores"]} cores)'
             + ''.join(f'; {a} timed as {b}' for a, b in stand_ins.items()))
  if jax.process_index() == 0:
    title = flag_values.title
    if missing:
      title += f' (no run: {", ".join(label for label, _ in missing)})'
    draw_figure(curves, flag_values.out, title, x_label, [(x, text) for x, text in markers])
    print('Wrote', flag_values.out, f'without {", ".join(label for label, _ in missing)}'
          if missing else '')
    for curve in curves:
      print(curve['label'], ' '.join(f'({x:.2f} min, {y:.2f})' for x, y in sorted(curve['points'])))


def define_flags() -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_multi_string('run', None, 'LABEL=WORKDIR of a run that kept its checkpoints.')
  flags.DEFINE_string('bench', None, 'A benchmarks.run JSON with the step times of these methods.')
  flags.DEFINE_multi_string('step_time_of', [], 'METHOD=OTHER: time METHOD\'s steps with OTHER\'s '
                            'step in --bench (e.g. ect=ct, the same FLOPs), for a method it lacks.')
  flags.DEFINE_list('samplers', ['onestep', 'multistep'], 'Samplers scored at each checkpoint.')
  flags.DEFINE_integer('num_samples', 1000, 'Samples per sampler and checkpoint.')
  flags.DEFINE_bool('no_teacher_time', False, 'Start runs from a teacher at 0, not after it.')
  flags.DEFINE_string('title', 'Digits: FD against training time, same teacher and data',
                      'Figure title.')
  flags.DEFINE_string('out', 'docs/digits_fd_vs_time.png', 'Output PNG.')
  flags.mark_flags_as_required(['run', 'bench'])


if __name__ == '__main__':
  from absl import app  # pylint: disable=g-import-not-at-top
  logging.getLogger().setLevel(logging.INFO)
  define_flags()
  app.run(main)

r"""The input pipeline alone: images/s read, decoded, cropped and flipped on this host's CPU cores, next
to the images/s that an accelerator's training step consumes, and so the host cores per accelerator.

  python -m benchmarks.loader                      # writes benchmarks/results/loader_cpu.{json,md}
  python -m benchmarks.loader --skip_step_flops    # the loader only (no lowering of the big steps)

The loader reads synthetic TFDS datasets (ArrayRecord files, written to a temporary folder first):
  * 64x64: PNG records, as cm_jax.datasets.prepare writes ImageNet 64 (and as TFDS stores
    imagenet_resized/64x64);
  * 256x256: 256x341 JPEG records cropped to 256x256, as TFDS stores LSUN (short side 256).
Images are photo-like (smooth colour plus noise) so that they compress and decode like photos.
Each measurement times `InputPipeline.host_batches` (the Grain read-ahead training uses, without the
device transfer) over whole batches after two warm-up batches, with 1 and with all threads.

The accelerator side has no measurement of these configs yet (no GPU in reach when this was written):
the images/s a step needs is the step's model FLOPs per image (XLA's cost analysis of the real
train step of the config, lowered at batch 1, not run) divided by an H200's achieved FLOP/s. The
measured reference point is the CIFAR-10 CD (LPIPS) step on one H200, 489 images/s at 361 GFLOP per
image = 177 TFLOP/s in float32/TF32 (benchmarks/results/cifar10_cd_b128_gpu.json and
cifar10_cd_b8_cpu.json); bfloat16 configs are given at 2x that (354 TFLOP/s, 36% of the H200's dense
bf16 peak), an estimate to be replaced by a measurement.
"""

import argparse
import io
import json
import os
import platform
import shutil
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from benchmarks import run as bench
from cm_jax import data, trainer
from configs import default

MEASURED_H200_FLOPS = 489.4 * 361.444e9  # CIFAR-10 CD LPIPS step, float32 (see the docstring).
BF16_FACTOR = 2.0
STEP_CONFIGS = ('configs/imagenet64_edm.py', 'configs/imagenet64_cd.py',
                'configs/lsun_bedroom256_edm.py', 'configs/lsun_bedroom256_cd.py',
                'configs/lsun_bedroom256_ct.py')


def _photo_like(rng, height: int, width: int) -> np.ndarray:
  smooth = Image.fromarray(rng.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)).resize(
      (width, height), Image.BICUBIC)
  noisy = np.asarray(smooth, np.int16) + rng.integers(-20, 20, (height, width, 3))
  return np.clip(noisy, 0, 255).astype(np.uint8)


def write_dataset(data_dir: str, name: str, count: int, shape: tuple[int, int], fmt: str) -> float:
  """A TFDS dataset of `count` encoded images (32 distinct ones, cycled); returns bytes per record."""
  rng = np.random.default_rng(0)
  pool = []
  for _ in range(32):
    buffer = io.BytesIO()
    Image.fromarray(_photo_like(rng, *shape)).save(buffer, format=fmt, **(
        {'quality': 90} if fmt == 'JPEG' else {'compress_level': 1}))
    pool.append(buffer.getvalue())
  fixed = shape if shape[0] == shape[1] else (None, None)
  features = tfds.features.FeaturesDict({
      'image': tfds.features.Image(shape=(*fixed, 3), encoding_format=fmt.lower()),
      'label': tfds.features.ClassLabel(num_classes=10)})
  tfds.dataset_builders.store_as_tfds_dataset(
      name=name, version='1.0.0', features=features, data_dir=data_dir, file_format='array_record',
      split_datasets={'train': ((i, {'image': io.BytesIO(pool[i % 32]), 'label': i % 10})
                                for i in range(count))}, disable_shuffling=True)
  return float(np.mean([len(p) for p in pool]))


def time_loader(data_dir: str, name: str, size: int, batch: int, threads: int,
                num_batches: int) -> dict:
  config = default.get_config().data
  config.update(name=name, data_dir=data_dir, image_size=size, num_channels=3, random_flip=True)
  config.loader.update(num_threads=threads, prefetch=2 * threads)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ('data', 'fsdp'))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(('data', 'fsdp')))
  pipeline = data.InputPipeline(config, batch, 0, sharding)
  batches = pipeline.host_batches(0, num_batches + 2)
  next(batches), next(batches)  # Warm-up: files opened, threads started.
  start, cpu_start = time.perf_counter(), time.process_time()
  for _ in range(num_batches):
    next(batches)
  wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
  batches.close()
  return {'image_size': size, 'batch': batch, 'threads': threads, 'batches': num_batches,
          'wall_s': wall, 'cpu_s': cpu, 'images_per_s': batch * num_batches / wall,
          'images_per_cpu_s': batch * num_batches / cpu}


def step_flops_per_image(config_path: str) -> dict:
  """Model FLOPs per image of the config's real train step (lowered at batch 1, never run)."""
  from cm_jax import config_utils  # pylint: disable=g-import-not-at-top
  config = config_utils.load_config_file(config_path)
  config.mesh.fsdp = 1
  exp = bench.build(config, 1)
  exp.resources.provide(teacher_params=exp.abstract_state.params)
  frozen = exp.load_frozen()
  replicated = jax.sharding.NamedSharding(exp.mesh, jax.sharding.PartitionSpec())
  step = trainer.make_train_step(exp, jax.tree.map(lambda _: replicated, frozen))
  batch = {'image': jax.ShapeDtypeStruct((1,) + exp.image_shape, jnp.float32),
           'label': jax.ShapeDtypeStruct((1,), jnp.int32)}
  lowered = step.lower(exp.abstract_state, frozen, batch, jax.ShapeDtypeStruct((), jnp.int32))
  flops = bench.xla_flops(lowered)
  dtype = config.model.dtype
  achieved = MEASURED_H200_FLOPS * (BF16_FACTOR if dtype == 'bfloat16' else 1.0)
  return {'config': config_path, 'method': config.method, 'dtype': dtype,
          'distance': config.consistency.distance if config.method in ('cd', 'ct') else None,
          'flops_per_image': flops, 'assumed_h200_flops_per_s': achieved,
          'h200_images_per_s': achieved / flops if flops else None}


def markdown(result: dict) -> str:
  lines = ['| loader | threads | images/s | images per CPU-second |', '|---|---|---|---|']
  for r in result['loader']:
    lines.append(f'| {r["image_size"]}x{r["image_size"]}, batch {r["batch"]} | {r["threads"]} | '
                 f'{r["images_per_s"]:,.0f} | {r["images_per_cpu_s"]:,.0f} |')
  if result['steps']:
    lines += ['', '| config step | GFLOP/image | H200 images/s (estimated) | host cores per H200 |',
              '|---|---|---|---|']
    for s in result['steps']:
      cores = s.get('host_cores_per_h200')
      lines.append(f'| {s["config"]} ({s["method"]}, {s["dtype"]}) | '
                   f'{s["flops_per_image"] / 1e9:,.0f} | {s["h200_images_per_s"]:,.0f} | '
                   f'{cores:.2f} |')
  return '\n'.join(lines) + '\n'


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--out', default='benchmarks/results/loader_cpu.json')
  parser.add_argument('--skip_step_flops', action='store_true')
  parser.add_argument('--num_batches', type=int, default=8)
  args = parser.parse_args(argv)
  cores = len(os.sched_getaffinity(0))
  tmp = tempfile.mkdtemp(prefix='cm_jax_loader_')
  result = {'machine': {'host_cpu': platform.processor() or platform.machine(), 'host_cores': cores,
                        'load_avg_start': list(os.getloadavg())},
            'loader': [], 'steps': []}
  try:
    bytes64 = write_dataset(tmp, 'bench64', 4096, (64, 64), 'PNG')
    bytes256 = write_dataset(tmp, 'bench256', 1024, (256, 341), 'JPEG')
    result['record_bytes'] = {'64': bytes64, '256': bytes256}
    for threads in sorted({1, cores}):
      result['loader'].append(time_loader(tmp, 'bench64', 64, 256, threads, args.num_batches))
      result['loader'].append(time_loader(tmp, 'bench256', 256, 64, threads, args.num_batches))
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  per_cpu_s = {r['image_size']: r['images_per_cpu_s'] for r in result['loader'] if r['threads'] == 1}
  if not args.skip_step_flops:
    for path in STEP_CONFIGS:
      step = step_flops_per_image(path)
      size = 64 if 'imagenet64' in path else 256
      if step['h200_images_per_s']:
        step['host_cores_per_h200'] = step['h200_images_per_s'] / per_cpu_s[size]
      result['steps'].append(step)
  result['machine']['load_avg_end'] = list(os.getloadavg())
  result['command'] = 'python -m benchmarks.loader'
  with open(args.out, 'w') as f:
    json.dump(result, f, indent=1)
  table = markdown(result)
  with open(args.out.removesuffix('.json') + '.md', 'w') as f:
    f.write(table)
  print(table)


if __name__ == '__main__':
  main()

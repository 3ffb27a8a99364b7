"""The device mesh and every sharding rule of the project, in one place.

Mesh axes: `data` (pure data parallelism) and `fsdp` (data parallelism whose parameters and optimizer
state are also split across the axis, ZeRO-3 style). The batch is split over both axes.
"""

import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from cm_jax.errors import ConfigError

BATCH_AXES = ('data', 'fsdp')
# Leaves smaller than this stay replicated: splitting biases and norms saves nothing and costs
# collectives.
FSDP_MIN_SIZE = 2 ** 14


def make_mesh(mesh_config, devices=None) -> Mesh:
  devices = list(jax.devices() if devices is None else devices)
  num = len(devices)
  fsdp = int(mesh_config.fsdp)
  data = int(mesh_config.data)
  if fsdp < 1 or num % fsdp:
    raise ConfigError(f'mesh.fsdp={fsdp} must be >= 1 and divide the {num} devices; '
                      f'valid values: {[d for d in range(1, num + 1) if num % d == 0]}.')
  if data == -1:
    data = num // fsdp
  if data * fsdp != num:
    raise ConfigError(f'mesh.data={mesh_config.data} x mesh.fsdp={fsdp} must use all {num} devices; '
                      'set mesh.data=-1 to use the rest.')
  return Mesh(np.asarray(devices).reshape(data, fsdp), ('data', 'fsdp'))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Split axis 0 of every batch array over all devices."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def leaf_spec(shape, fsdp_size: int) -> P:
  """Shard the largest axis divisible by the fsdp size; small or indivisible leaves are replicated."""
  if fsdp_size <= 1 or math.prod(shape) < FSDP_MIN_SIZE:
    return P()
  for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
    if shape[axis] % fsdp_size == 0:
      spec = [None] * len(shape)
      spec[axis] = 'fsdp'
      return P(*spec)
  return P()


def tree_shardings(abstract_tree, mesh: Mesh):
  """Shardings for params, optimizer state, EMA and target copies (all follow the same rule)."""
  fsdp_size = mesh.shape['fsdp']
  return jax.tree.map(lambda leaf: NamedSharding(mesh, leaf_spec(leaf.shape, fsdp_size)),
                      abstract_tree)


def check_batch(global_batch: int, mesh: Mesh, what: str = 'training.batch_size') -> None:
  """A global batch must split evenly over devices and processes; say which sizes do."""
  shards = mesh.shape['data'] * mesh.shape['fsdp']
  procs = jax.process_count()
  step = math.lcm(shards, procs)
  if global_batch % step:
    lower = max(step, global_batch // step * step)
    raise ConfigError(f'{what}={global_batch} does not divide over {shards} devices in '
                      f'{procs} process(es); use a multiple of {step} (e.g. {lower} or {lower + step}).')

"""The device mesh and every sharding rule of the project, in one place.

Mesh axes: `data` (pure data parallelism) and `fsdp` (data parallelism whose parameters and optimizer
state are also split across the axis, ZeRO-3 style). The batch is split over both axes.
"""

import itertools
import math
import os

import jax
from jax.experimental import mesh_utils, multihost_utils
import numpy as np
import orbax.checkpoint as ocp
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
  return Mesh(device_grid(devices, data, fsdp), ('data', 'fsdp'))


def device_grid(devices, data: int, fsdp: int) -> np.ndarray:
  """The devices as a [data, fsdp] array laid out along the interconnect.

  On TPU, `mesh_utils` follows the physical topology (neighbouring chips share an fsdp group), and
  on several slices (multislice) the data axis spans the slices, so only the data-parallel gradient
  reduction crosses the slower data-centre network. Elsewhere the order is jax.devices()'s.
  """
  slices = sorted({getattr(d, 'slice_index', 0) for d in devices})
  if len(slices) > 1 and all(d.platform == 'tpu' for d in devices):
    if data % len(slices):
      raise ConfigError(f'mesh.data={data} must be a multiple of the {len(slices)} TPU slices (the '
                        'data axis spans the slices; fsdp stays inside one).')
    return mesh_utils.create_hybrid_device_mesh((data // len(slices), fsdp), (len(slices), 1),
                                                devices, allow_split_physical_axes=True)
  return mesh_utils.create_device_mesh((data, fsdp), devices, allow_split_physical_axes=True)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Split axis 0 of every batch array over all devices."""
  return NamedSharding(mesh, P(BATCH_AXES))


def padded_batch_size(batch_size: int, mesh: Mesh) -> int:
  """The smallest multiple of (devices, processes) that holds `batch_size` rows."""
  step = math.lcm(mesh.size, jax.process_count())
  return -(-batch_size // step) * step


def put_batch(array: np.ndarray, mesh: Mesh) -> jax.Array:
  """A host array present on every process as a global array split along axis 0 over the mesh."""
  array = np.asarray(array)
  return jax.make_array_from_callback(array.shape, batch_sharding(mesh), lambda index: array[index])


def local_batch_sharding() -> NamedSharding:
  """Axis 0 split over this process's devices only: work each process does on its own share
  (Inception features of its part of the samples), gathered afterwards with `gather_rows`."""
  return NamedSharding(Mesh(np.asarray(jax.local_devices()), ('batch',)), P('batch'))


def process_share(num: int) -> slice:
  """This process's contiguous share of `num` rows (the last shares may be shorter or empty)."""
  per_process = -(-num // jax.process_count())
  start = jax.process_index() * per_process
  return slice(min(start, num), min(start + per_process, num))


def gather(x: jax.Array) -> np.ndarray:
  """A global array, whole, as numpy on every process."""
  if jax.process_count() == 1:
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def gather_rows(local: np.ndarray) -> np.ndarray:
  """Every process's rows concatenated in process order (the processes' row counts may differ)."""
  if jax.process_count() == 1:
    return local
  counts = np.asarray(multihost_utils.process_allgather(np.array([local.shape[0]]))).reshape(-1)
  # process_allgather wants equal shapes: pad to the largest share, then drop the padding.
  padded = np.zeros((int(counts.max()),) + local.shape[1:], local.dtype)
  padded[:local.shape[0]] = local
  gathered = np.asarray(multihost_utils.process_allgather(padded))
  return np.concatenate([gathered[p, :counts[p]] for p in range(len(counts))])


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


# Environment variables by which a scheduler announces a multi-process job that
# `jax.distributed.initialize()` can configure itself from.
_SLURM_VARS = ('SLURM_JOB_ID', 'SLURM_STEP_NODELIST', 'SLURM_NTASKS', 'SLURM_PROCID',
               'SLURM_LOCALID')
_TPU_POD_VARS = ('TPU_WORKER_HOSTNAMES', 'TPU_PROCESS_ADDRESSES', 'MEGASCALE_COORDINATOR_ADDRESS')
_OPEN_MPI_VAR = 'OMPI_MCA_orte_hnp_uri'


def _on_cloud_tpu_vm() -> bool:
  try:  # jax's own test (libtpu present and a Google TPU device); private, hence guarded.
    from jax._src.cloud_tpu_init import running_in_cloud_tpu_vm
  except ImportError:
    return False
  return bool(running_in_cloud_tpu_vm)


def detected_cluster() -> str | None:
  """The multi-process environment jax can configure itself in, or None (a plain host)."""
  env = os.environ
  # Inside `srun` with more than one task; a bare shell in an allocation runs one process.
  if all(k in env for k in _SLURM_VARS) and int(env['SLURM_NTASKS']) > 1:
    return 'SLURM'
  if any(k in env for k in _TPU_POD_VARS) or _on_cloud_tpu_vm():
    return 'Cloud TPU'
  if _OPEN_MPI_VAR in env:
    return 'Open MPI'
  return None


def initialize_distributed(mode: str = 'auto', coordinator_address: str | None = None,
                           num_processes: int | None = None, process_id: int | None = None) -> bool:
  """`jax.distributed.initialize` when the run spans processes; returns whether it was called.

  Args:
    mode: 'auto' initialises when explicit flags are given or a cluster (TPU VM or pod, SLURM
      `srun`, Open MPI) is detected; 'on' always (jax then detects any cluster it supports, e.g.
      Kubernetes or mpi4py); 'off' never (one process drives all local devices).
    coordinator_address: host:port of process 0; with it, num_processes and process_id are needed
      unless the cluster supplies them.
    num_processes: how many processes the run has.
    process_id: this process, in [0, num_processes).

  Raises:
    ConfigError: incomplete or inconsistent explicit flags.
  """
  if mode not in ('auto', 'on', 'off'):
    raise ConfigError(f'--multihost={mode!r}: use auto, on or off.')
  explicit = (coordinator_address, num_processes, process_id)
  if mode == 'off':
    if any(v is not None for v in explicit):
      raise ConfigError('--multihost=off contradicts --coordinator_address/--num_processes/'
                        '--process_id: drop those flags or use --multihost=auto.')
    return False
  cluster = detected_cluster()
  if mode == 'auto' and cluster is None and all(v is None for v in explicit):
    return False
  if cluster is None and None in explicit and any(v is not None for v in explicit):
    raise ConfigError(
        'A multi-process run outside a TPU pod, SLURM or Open MPI needs all of --coordinator_address'
        '=host:port (of process 0), --num_processes=N and --process_id=i (0 on the coordinator); '
        f'got coordinator_address={coordinator_address}, num_processes={num_processes}, '
        f'process_id={process_id}.')
  if num_processes is not None and process_id is not None and not 0 <= process_id < num_processes:
    raise ConfigError(f'--process_id={process_id} must be in [0, --num_processes={num_processes}).')
  jax.distributed.initialize(coordinator_address, num_processes, process_id)
  return True


_barrier_ids = itertools.count()


def barrier(name: str, timeout_s: int = 1800) -> None:
  """Wait until every process gets here; a no-op in a single process.

  A barrier of the coordination service, not a device collective: gloo's CPU collectives give up
  after 30 s when a peer is late (e.g. still compiling), the coordination service waits `timeout_s`.
  """
  if jax.process_count() == 1:
    return
  # Each barrier key may be used once: number them (all processes make the same calls in order).
  key = f'cm_jax_{name}_{next(_barrier_ids)}'
  ocp.multihost.get_barrier_sync_fn()(key=key, timeout_ms=timeout_s * 1000)


def raise_if_any(name: str, error: str | None, error_type: type[Exception],
                 timeout_s: int = 600) -> None:
  """Raise `error_type` on every process when any process passes an `error` message.

  A check that fails on one process (a lock held, a folder its host cannot write) must stop all of
  them at once: otherwise the others wait at their next barrier until it times out. The messages go
  through the coordination service's key-value store, before anything is compiled.
  """
  if jax.process_count() == 1:
    if error:
      raise error_type(error)
    return
  # The coordination service's client has no public accessor (Orbax reads it from here too).
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  client = distributed.global_state.client
  key = f'cm_jax_{name}_{next(_barrier_ids)}'
  client.key_value_set(f'{key}/{jax.process_index()}', error or '')
  for process in range(jax.process_count()):
    message = client.blocking_key_value_get(f'{key}/{process}', timeout_s * 1000)
    if message:
      raise error_type(message if process == jax.process_index() else
                       f'(process {process}) {message}')

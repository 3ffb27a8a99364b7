"""Shared fixtures: the embedded digits dataset and the metric cache live in per-session temp dirs."""

import os
import sys

import pytest

# torchvision imports torch._dynamo, which imports triton when it is installed (the CUDA torch build
# that requirements-test.txt pins brings it). triton's bundled LLVM and jaxlib's collide in one process:
# the import segfaults once jax is loaded. The parity tests run torch on the CPU and never need triton,
# so it is marked absent (import raises ImportError, which torch reads as "no triton").
sys.modules.setdefault('triton', None)

# The suite compiles hundreds of small programs and runs most of them for a few steps: XLA:CPU's
# optimisation (LLVM at O2) costs more time than it saves, about half of each compile. JAX's own
# switch for that case turns it off, for this process and, through the environment, for the ones it
# launches (so their results stay comparable with this one's). JAX_DISABLE_MOST_OPTIMIZATIONS=0
# runs the suite optimised.
os.environ.setdefault('JAX_DISABLE_MOST_OPTIMIZATIONS', '1')


@pytest.fixture(scope='session', autouse=True)
def _isolated_caches(tmp_path_factory):
  """Never read or write the user's ~/.cache/cm_jax from tests."""
  old = os.environ.get('CM_JAX_CACHE')
  os.environ['CM_JAX_CACHE'] = str(tmp_path_factory.mktemp('cm_jax_cache'))
  yield
  if old is None:
    os.environ.pop('CM_JAX_CACHE', None)
  else:
    os.environ['CM_JAX_CACHE'] = old


@pytest.fixture(scope='session')
def digits_data_dir(tmp_path_factory) -> str:
  """A TFDS data_dir holding the embedded digits dataset, built once per session."""
  from cm_jax import data
  from configs import default
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  config = default.get_config()
  config.data.data_dir = data_dir
  data.load_split(config.data, 'test')  # Builds the dataset on first use.
  return data_dir


@pytest.fixture(scope='session')
def one_device_run(tmp_path_factory, digits_data_dir) -> dict:
  """`distributed_worker.make_config` trained for 20 steps on one CPU device, checkpoints at 10 and 20:
  the reference that test_checkpointing and test_distributed compare their runs with. Trained once
  per session; tests read it and copy its workdir before changing anything."""
  import jax
  import numpy as np
  from tests import distributed_worker, tiny
  assert jax.device_count() == 1
  workdir = str(tmp_path_factory.mktemp('one_device') / 'run')
  out = tiny.train(distributed_worker.make_config(digits_data_dir, 20), workdir)
  return {'losses': {int(s): float(loss) for s, loss in out.losses}, 'workdir': workdir,
          'params': [np.asarray(x) for x in jax.tree.leaves(out.state.params)]}


@pytest.fixture(autouse=True)
def _xla_optimised(request):
  """Tests marked xla_optimised compile with XLA's optimisations (the suite's default is not to, see
  above): they run one program for long (thousands of steps, 10^5 samples), where unoptimised code
  costs more than the compile saves. Programs the session compiled before keep their compilation."""
  if request.node.get_closest_marker('xla_optimised') is None:
    yield
    return
  import jax
  unoptimised = jax.config.read('jax_disable_most_optimizations')
  jax.config.update('jax_disable_most_optimizations', False)
  try:
    yield
  finally:
    jax.config.update('jax_disable_most_optimizations', unoptimised)


def pytest_configure(config):
  """Share compiled executables between tests that build the same step (a persistent XLA cache);
  compile unoptimised unless asked otherwise (above)."""
  del config
  import tempfile
  import jax
  # Also when something imported jax before this file set the variable.
  jax.config.update('jax_disable_most_optimizations', os.environ['JAX_DISABLE_MOST_OPTIMIZATIONS'].lower()
                    in ('1', 'y', 'yes', 't', 'true', 'on'))
  cache = os.environ.get('CM_JAX_TEST_XLA_CACHE') or tempfile.mkdtemp(prefix='cm_jax_xla_')
  jax.config.update('jax_compilation_cache_dir', cache)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)

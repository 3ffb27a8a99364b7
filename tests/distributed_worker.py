r"""Trains a tiny digits config for the distributed tests, in its own process; writes the losses as JSON.

  python -m tests.distributed_worker --devices=8 --steps=20 --data_dir=D --workdir=W --out=out.json
  # One of two processes with 4 CPU devices each (start both, --process_id=0 and 1):
  python -m tests.distributed_worker --devices=4 --num_processes=2 --process_id=0 --port=12345 ...

A separate process because the number of (fake) CPU devices is fixed when jax is first imported. Several
--workdir flags train several runs one after the other in the same process (one start-up).
`make_config` is also what the in-process tests train, so every run compares like with like.
"""

import argparse
import json
import logging
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_config(data_dir: str, steps: int = 20, checkpoint_every: int = 10, fsdp: int = 1,
                dtype: str = 'float32', keep_checkpoints: int = 3):
  """The tiny digits EDM config of these tests, with dropout on so that its masks are compared too."""
  from tests import tiny  # pylint: disable=g-import-not-at-top
  config = tiny.edm_config(data_dir, steps=steps)
  # One resolution level and no attention compiles 3x faster than tiny's two levels (17 s instead of
  # 50 s on 2 CPU cores); the sharded step has the same structure.
  config.model.ch_mult, config.model.attn_resolutions = (1,), ()
  config.model.dropout = 0.1
  config.model.dtype = dtype
  config.mesh.fsdp = fsdp
  config.training.log_every = 5
  config.training.checkpoint_every = checkpoint_every
  config.training.keep_checkpoints = keep_checkpoints
  # The kill test runs a longer job than its baseline and compares the shared steps: the learning
  # rate must not depend on num_steps (a cosine decay would; resuming it is tested in test_train).
  config.training.lr_decay = 'constant'
  return config


def summary(out: dict) -> dict:
  """What the tests compare: losses per step and facts about the final state's layout."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from cm_jax import sharding  # pylint: disable=g-import-not-at-top
  state = out.state

  def sharded(leaf) -> bool:
    return any(axis is not None for axis in leaf.sharding.spec)

  def layout(tree) -> dict:
    leaves = [x for x in jax.tree.leaves(tree) if x.ndim > 0]
    # The largest shard any one device holds, against the whole leaf: 1.0 means a full copy.
    fractions = [x.addressable_shards[0].data.size / x.size for x in leaves]
    return {'leaves': len(leaves), 'sharded': sum(sharded(x) for x in leaves),
            'max_device_fraction_of_sharded': max([f for f, x in zip(fractions, leaves)
                                                   if sharded(x)], default=1.0),
            'dtypes': sorted({str(x.dtype) for x in leaves})}

  return {
      'losses': [[int(s), float(loss)] for s, loss in out.losses],
      'step': int(out.step),
      'preempted': bool(out.preempted),
      'devices': jax.device_count(),
      'processes': jax.process_count(),
      'mesh': {k: int(v) for k, v in out.exp.mesh.shape.items()},
      # One number that any divergence of the trained weights would move.
      'param_abs_sum': float(sum(np.abs(np.asarray(sharding.gather(x), np.float64)).sum()
                                 for x in jax.tree.leaves(state.params))),
      'params': layout(state.params),
      'opt_state': layout(state.opt_state),
      'ema_params': layout(state.ema_params),
  }


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser()
  parser.add_argument('--devices', type=int, default=1, help='Fake CPU devices in this process.')
  parser.add_argument('--num_processes', type=int, default=1)
  parser.add_argument('--process_id', type=int, default=0)
  parser.add_argument('--port', type=int, default=0, help='Coordinator port on localhost.')
  parser.add_argument('--steps', type=int, default=20)
  parser.add_argument('--fsdp', type=int, action='append',
                      help='mesh.fsdp of each --workdir in turn (one value: all of them; default 1).')
  parser.add_argument('--fsdp_min_size', type=int, default=0,
                      help='> 0: shard leaves from this size on (the tiny model is below the default).')
  parser.add_argument('--checkpoint_every', type=int, default=10)
  parser.add_argument('--keep_checkpoints', type=int, default=3)
  parser.add_argument('--dtype', default='float32')
  parser.add_argument('--data_dir', required=True)
  parser.add_argument('--workdir', action='append', required=True)
  parser.add_argument('--out', default='', help='JSON file of the results (written by process 0).')
  return parser.parse_args(argv)


def main(argv=None) -> None:
  args = parse_args(argv)
  # Must precede the first `import jax` in this process.
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             f' --xla_force_host_platform_device_count={args.devices}')
  os.environ['JAX_PLATFORMS'] = 'cpu'
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  sys.path.insert(0, REPO)
  # The run's own progress lines with elapsed milliseconds; library INFO chatter stays out.
  logging.basicConfig(level=logging.INFO, format='%(relativeCreated)7d %(levelname)s %(message)s')
  for noisy in ('absl', 'jax', 'orbax', 'tensorflow'):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  import jax  # pylint: disable=g-import-not-at-top
  cache = os.environ.get('CM_JAX_TEST_XLA_CACHE')
  if cache:
    jax.config.update('jax_compilation_cache_dir', cache)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)
  from cm_jax import sharding  # pylint: disable=g-import-not-at-top
  from tests import tiny  # pylint: disable=g-import-not-at-top
  if args.num_processes > 1:
    # Cross-process collectives of the CPU backend (the default in jax 0.10; stated, not assumed).
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    sharding.initialize_distributed('on', f'localhost:{args.port}', args.num_processes,
                                    args.process_id)
  assert jax.process_count() == args.num_processes and jax.local_device_count() == args.devices
  if args.fsdp_min_size > 0:
    sharding.FSDP_MIN_SIZE = args.fsdp_min_size

  fsdps = args.fsdp or [1]
  fsdps = fsdps * len(args.workdir) if len(fsdps) == 1 else fsdps
  assert len(fsdps) == len(args.workdir), 'one --fsdp per --workdir, or one for all'
  results = []
  for workdir, fsdp in zip(args.workdir, fsdps):
    config = make_config(args.data_dir, args.steps, args.checkpoint_every, fsdp, args.dtype,
                         args.keep_checkpoints)
    results.append(summary(tiny.train(config, workdir)))
  if args.out and jax.process_index() == 0:
    with open(args.out + '.tmp', 'w') as f:
      json.dump(results, f)
    os.replace(args.out + '.tmp', args.out)


if __name__ == '__main__':
  main()

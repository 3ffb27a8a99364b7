"""Checks shared by the NCSN++ and ADM network tests."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cm_jax.networks import get_network


def fast_key(seed):
  # An RngBitGenerator key: XLA:CPU compiles the ~100 threefry calls of an init (or the dropout masks
  # of a training forward) slowly, 15 s for the digits network on 2 cores; these compile in a few.
  return jax.random.key(seed, impl='unsafe_rbg')


def check_dropout_uses_the_key_only_in_training(apply, params, x, noise_cond, labels):
  def train(seed):
    return apply({'params': params}, x, noise_cond, labels, train=True,
                 rngs={'dropout': fast_key(seed)})
  a, b, a_again = train(3), train(4), train(3)
  assert np.abs(a - b).max() > 1e-3
  np.testing.assert_array_equal(a, a_again)
  # No dropout rng needed, and deterministic, in evaluation.
  evaluate = apply({'params': params}, x, noise_cond, labels, train=False)
  np.testing.assert_array_equal(evaluate, apply({'params': params}, x, noise_cond, labels))
  assert np.abs(evaluate - a).max() > 1e-3


def check_bfloat16_close_to_float32(model_config, apply, params, x, noise_cond, labels):
  config = ml_collections.ConfigDict(model_config)
  config.dtype = 'bfloat16'
  net_bf16 = get_network(config, x.shape[1], x.shape[3])
  ref = apply({'params': params}, x, noise_cond, labels)
  out = jax.jit(net_bf16.apply)({'params': params}, x, noise_cond, labels)
  assert out.dtype == jnp.float32
  relative = np.linalg.norm(out - ref) / np.linalg.norm(ref)
  # Close to float32, and not equal to it: an ignored dtype (float32 compute) would give 0 here,
  # bfloat16's 8-bit mantissa about 1e-3 to 1e-2.
  assert 1e-4 < relative < 0.05, relative
  # The parameter tree is the same and float32 in both.
  shapes = jax.eval_shape(lambda: net_bf16.init(
      {'params': fast_key(0), 'dropout': fast_key(1)}, x, noise_cond, labels))['params']
  assert jax.tree.structure(shapes) == jax.tree.structure(params)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(shapes))

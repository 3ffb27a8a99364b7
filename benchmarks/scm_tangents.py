r"""Where the sCM tangent of a trained run comes from: x or the time embedding.

  python -m benchmarks.scm_tangents --workdir=runs/digits/teacher
  python -m benchmarks.scm_tangents --workdir=runs/digits_sct

For the first EMA copy of the run in --workdir (any method; its saved config.json says which network
and time conditioning), on training images x0 and fixed noise z: the RMS of the two parts of the
sCM tangent's sd cos(t) sin(t) dF/dt along the PF-ODE (sCM Alg. 1, the JVP rearrangement), the part
through x_t (dx_t/dt = sd F: the network's own ODE) and the part through the time embedding at
fixed x_t, at several t. With EDM's c_noise = ln(sigma) / 4, cos t sin t dc_noise/dt = 1/4 at every
t, so the second part does not vanish as t -> pi/2; with TrigFlow's c_noise = t it does (sCM
Sec. 4.1). The README's "sCT and sCD on digits" table comes from this. A measurement, not a test.
"""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import ml_collections
import numpy as np

from cm_jax import checkpointing, config_utils, data, experiment, sharding
from configs import default

TIMES = (0.1, 0.3, 0.6, 0.9, 1.2, 1.4, 1.5, 1.56)


def _merged(config: ml_collections.ConfigDict, saved: dict) -> ml_collections.ConfigDict:
  for key, value in saved.items():
    if isinstance(value, dict) and isinstance(config.get(key), ml_collections.ConfigDict):
      _merged(config[key], value)
    else:
      config[key] = value
  return config


def load_run(workdir: str, data_dir: str):
  """(experiment, first EMA params) of the run in workdir, at its newest checkpoint."""
  # Fields added since the run was saved keep their defaults.
  config = _merged(default.get_config(), config_utils.read_saved_config(workdir))
  config.data.data_dir = data_dir or config.data.data_dir
  exp = experiment.build(config, workdir)
  abstract = jax.eval_shape(lambda: exp.model.init(jax.random.PRNGKey(0), exp.image_shape))
  abstract = checkpointing.with_shardings(abstract, sharding.tree_shardings(abstract, exp.mesh))
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, 'checkpoints'), read_only=True)
  step = ckpt.latest_step()
  copies = len({k.split(']')[0] for k in ckpt.item_shapes(step, 'ema_params')})
  params = ckpt.restore_items(step, {'ema_params': (abstract,) * copies})['ema_params'][0]
  ckpt.close()
  return exp, params


def tangent_parts(exp, params, x0: jax.Array, z: jax.Array, t: jax.Array) -> jax.Array:
  """RMS of sd cs dF/dx . (sd F), of sd cs dF/dt at fixed x, and of sd F, at time t."""
  sd = exp.config.noise.sigma_data
  tt = jnp.full((x0.shape[0],), t, jnp.float32)
  x_t = jnp.cos(t) * x0 + jnp.sin(t) * z
  velocity = lambda x, s: exp.model.trigflow(params, x, s)
  cs = jnp.cos(t) * jnp.sin(t)
  F = velocity(x_t, tt)
  _, through_x = jax.jvp(lambda x: velocity(x, tt), (x_t,), (cs * sd * F,))
  _, through_t = jax.jvp(lambda s: velocity(x_t, s), (tt,), (cs * jnp.ones_like(tt),))
  rms = lambda a: jnp.sqrt(jnp.mean((sd * a) ** 2))
  return jnp.stack([rms(through_x), rms(through_t), rms(F)])


def main(argv) -> None:
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  flag_values = flags.FLAGS
  exp, params = load_run(os.path.abspath(flag_values.workdir), flag_values.data_dir)
  images, _ = data.load_split(exp.config.data, 'train', 0, 1)
  x0 = images[:flag_values.num_images].astype(np.float32) / 127.5 - 1.0
  z = (exp.config.noise.sigma_data * np.random.default_rng(0).standard_normal(x0.shape)).astype(
      np.float32)
  parts = jax.jit(lambda t: tangent_parts(exp, params, x0, z, t))
  print(f'{flag_values.workdir}: {exp.config.method} run, c_noise from '
        f'{exp.config.noise.get("time_conditioning", "log_sigma")}, '
        f'{exp.config.model.embedding_type} embedding')
  print('    t    sigma   through x   through the time embedding   sd F')
  for t in TIMES:
    through_x, through_t, size = map(float, parts(jnp.float32(t)))
    sigma = exp.config.noise.sigma_data * np.tan(t)
    print(f'{t:5.2f} {sigma:8.3f}   {through_x:9.3f}   {through_t:26.3f}   {size:5.3f}')


def define_flags() -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string('workdir', None, 'A run folder (config.json and checkpoints/).')
  flags.DEFINE_string('data_dir', '', 'TFDS data_dir of its dataset; default: the run\'s.')
  flags.DEFINE_integer('num_images', 256, 'Training images to average over.')
  flags.mark_flags_as_required(['workdir'])


if __name__ == '__main__':
  from absl import app  # pylint: disable=g-import-not-at-top
  define_flags()
  app.run(main)

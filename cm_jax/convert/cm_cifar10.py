"""openai/consistency_models_cifar10 checkpoints: a flax msgpack of its training `State`.

`jcm.checkpoints.save_checkpoint` writes `flax.serialization.to_bytes(state)` of `jcm.models.utils.State`
(step, lr, ema_rate, params, params_ema, model_state, opt_state, rng_state) or, for runs with a target
network (CT; `training.loss` ending in ema/adaptive), `StateWithTarget` (also target_params). The
released files: `edm_cifar10_ema` (the EDM teacher), `cd-l1`, `cd-l2`, `cd-lpips` (`checkpoint_80`)
and `ct-lpips` (`checkpoint_74`).

Its NCSN++ is score_sde's Flax module, whose parameter tree cm_jax's NCSNpp reproduces name for name,
so the weights are taken as they are. The network sees c_in x and c_noise = 0.25 ln(sigma)
(`jcm.models.utils.get_denoiser_fn`), i.e. noise.noise_cond_scale = 1, and the consistency function
has sigma_min = t_min = 0.002, sigma_data = 0.5 (`get_distiller_fn`).

Weights: params -> params; params_ema (the run's one EMA, at its `ema_rate`) -> every EMA copy of
training.ema_decays; target_params (if any) -> the target network. The optimizer state is not carried
over (cm_jax's optimizer chain is its own): a resumed run starts fresh moments.
"""

import os

import numpy as np
from flax import serialization

from cm_jax.convert import common
from cm_jax.errors import ConversionError

NAME = 'cm_cifar10'


def detect(path: str, head: bytes) -> bool:
  del path
  # A msgpack map (fixmap 0x8X, map16 0xde) of the State's fields, starting with 'step'.
  return head[:1] in (bytes([0x88]), bytes([0x89]), b'\xde') and b'step' in head[:16]


def _read(path: str) -> dict:
  with open(path, 'rb') as f:
    data = f.read()
  try:
    state = serialization.msgpack_restore(data)
  except Exception as error:  # pylint: disable=broad-except
    raise ConversionError(f'{path} is not a flax msgpack checkpoint ({type(error).__name__}: '
                          f'{error}).') from None
  if not isinstance(state, dict) or not {'params', 'params_ema'} <= set(state):
    keys = sorted(state) if isinstance(state, dict) else type(state).__name__
    raise ConversionError(f'{path} is a msgpack file but not a consistency_models_cifar10 State '
                          f'(params, params_ema, ...); it holds {keys}.')
  return state


def read(path: str, config, network: common.Build) -> common.Converted:
  """The State's weights in our layout, after checking them against the config's network."""
  common.check_fields(config, {
      'model.name': common.one_of('ncsnpp', 'songunet'),
      'model.num_classes': 0,
      'noise.noise_cond_scale': 1.0,
      'noise.sigma_data': 0.5,
      'noise.sigma_min': 0.002,
  }, path, 'an unconditional NCSN++ of openai/consistency_models_cifar10 (c_noise = ln(sigma) / 4, '
     'sigma_data 0.5, sigma_min 0.002)')
  state = _read(path)
  abstract, _ = network()
  m = config.model
  network = (f'config.model (nf={m.nf}, ch_mult={tuple(m.ch_mult)}, num_res_blocks='
             f'{m.num_res_blocks}, attn_resolutions={tuple(m.attn_resolutions)})')
  copies = {}
  rules = {path_: common.Rule(('/'.join(path_),)) for path_ in common.flat_paths(abstract)}
  for name in ('params', 'params_ema', 'target_params'):
    if name in state:
      tensors = {'/'.join(p): np.asarray(v) for p, v in common.flat_paths(state[name]).items()}
      copies[name] = common.build_params(abstract, rules, tensors, {}, f'{path} ({name})', network)
  num_params, num_tensors = common.count(copies['params'])
  kind = 'StateWithTarget' if 'target_params' in state else 'State'
  ema_rate = float(np.asarray(state.get('ema_rate', np.nan)))
  report = [
      f'Read {path} ({os.path.getsize(path):,} bytes): a consistency_models_cifar10 {kind} at step '
      f'{int(np.asarray(state.get("step", -1)))}, holding {", ".join(copies)}: {num_tensors} tensors '
      f'and {num_params:,} parameters each.',
      f'EMA chosen: the file\'s params_ema (ema_rate {ema_rate:g}) becomes every EMA copy '
      f'(training.ema_decays={tuple(config.training.ema_decays)}); its params the online params'
      + ('; its target_params the target network.' if 'target_params' in copies else '.'),
      'Not carried over: opt_state (a resumed run starts its optimizer afresh), rng_state.',
  ]
  return common.Converted(copies['params'], copies['params_ema'], copies.get('target_params'), report,
                          int(np.asarray(state.get('step', 0))))

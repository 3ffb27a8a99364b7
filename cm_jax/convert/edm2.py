"""NVlabs/edm2 networks: pickled `Precond` (`training/networks_edm2.py`), the network under key 'ema'.

The released ImageNet-64 files (NVlabs/edm2 README, generate_images.py's presets, under
https://nvlabs-fi-cdn.nvidia.com/edm2/posthoc-reconstructions/): `edm2-img64-s-1073741-0.075.pkl`,
`edm2-img64-m-2147483-0.060.pkl`, `edm2-img64-l-1073741-0.040.pkl`, `edm2-img64-xl-0671088-0.040.pkl`
(and the autoguidance ones): post-hoc EMA reconstructions, one set of weights each. The ImageNet-512
networks work in Stable Diffusion's latent space, which cm_jax has no encoder for.

The pickle is an EasyDict (encoder, dataset_kwargs, loss_fn, ema), its network in float16 (EDM2's
training loop and reconstruct_phema.py write it so). EDM2's UNet becomes cm_jax's 'edm2' network
(networks/edm2.py), parameter for parameter, in float32: MPConv weights as they are stored (they are
normalised at every call), in Flax layout; the Fourier features' frequencies and phases (buffers);
every block's emb_gain and the out_gain, adjusted so that gain / sqrt(fan_in) is the float16 number
EDM2 multiplies by (see _gain_as_applied). Precond feeds c_in x and
c_noise = ln(sigma) / 4 (noise.noise_cond_scale = 1) at its sigma_data. Skipped: the uncertainty head
(logvar_fourier, logvar_linear), used by EDM2's training loss only.
"""

import os

import numpy as np

from cm_jax.convert import common, edm, torch_pickle
from cm_jax.errors import ConversionError

NAME = 'edm2'

_PRECOND_DEFAULTS = dict(use_fp16=True, sigma_data=0.5, logvar_channels=128)
_UNET_DEFAULTS = dict(
    model_channels=192, channel_mult=[1, 2, 3, 4], channel_mult_noise=None, channel_mult_emb=None,
    num_blocks=3, attn_resolutions=[16, 8], label_balance=0.5, concat_balance=0.5,
    channels_per_head=64, dropout=0, res_balance=0.3, attn_balance=0.3, clip_act=256,
    resample_filter=[1, 1])
# What cm_jax's EDM2UNet fixes (EDM2's defaults, which every released network uses).
_FIXED = dict(channel_mult_noise=None, channel_mult_emb=None, label_balance=0.5, concat_balance=0.5,
              res_balance=0.3, attn_balance=0.3, clip_act=256, resample_filter=[1, 1])


def _gain_as_applied(gain: np.ndarray, weight: np.ndarray) -> np.ndarray:
  """A gain such that our gain / sqrt(fan_in) is EDM2's.

  MPConv scales its normalised weight by `gain / np.sqrt(fan_in)`: with the float16 gains of EDM2's
  snapshots that quotient is a float16 number (a 0-d float16 tensor divided by a Python float), so
  the released networks run with it rounded to float16 (up to 5e-4 relative).
  """
  fan_in = float(np.prod(weight.shape[1:]))
  if gain.dtype == np.float16:
    applied = np.float16(gain.astype(np.float32) / np.float32(np.sqrt(fan_in)))  # Float math, rounded.
    return applied.astype(np.float32) * np.float32(np.sqrt(fan_in))
  return gain


def rules(abstract) -> dict:
  """{our parameter path: Rule}: EDM2's module names, '.' for '/' and 'enc.8x8' for 'enc_8x8'."""
  out = {}
  for path, leaf in common.flat_paths(abstract).items():
    top = path[0]
    if top in ('emb_fourier_freqs', 'emb_fourier_phases'):
      out[path] = common.Rule((f'unet.emb_fourier.{top.rsplit("_", 1)[1]}',))
    elif top == 'emb_label':
      out[path] = common.Rule(('unet.emb_label.weight',), common.linear)
    elif top == 'out_gain':
      out[path] = common.Rule(('unet.out_gain', 'unet.out_conv.weight'), _gain_as_applied)
    else:
      module = top.replace('enc_', 'enc.', 1).replace('dec_', 'dec.', 1)
      name = '.'.join((module,) + path[1:-1])
      if path[-1] == 'emb_gain':
        out[path] = common.Rule((f'unet.{module}.emb_gain', f'unet.{module}.emb_linear.weight'),
                                _gain_as_applied)
      else:
        fn = common.conv if len(leaf.shape) == 4 else common.linear
        out[path] = common.Rule((f'unet.{name}.weight',), fn)
  return out


def read(path: str, config, network: common.Build) -> common.Converted:
  """The pickle's EMA network in our layout, after checking it against the config's network."""
  snapshot, precond = edm.load_snapshot(path)
  if precond.class_name != 'Precond' or 'unet' not in precond.modules:
    raise ConversionError(f'{path}: its "ema" network is a {precond.class_name}, not an NVlabs/edm2 '
                          'Precond (for NVlabs/edm networks use --source_format=edm).')
  encoder = snapshot.get('encoder')
  if isinstance(encoder, torch_pickle.Module) and encoder.class_name != 'StandardRGBEncoder':
    raise ConversionError(f'{path} is a latent-space network (its encoder is a {encoder.class_name}, '
                          "EDM2's ImageNet-512 models): cm_jax has no VAE to encode and decode with.")
  pre = {**_PRECOND_DEFAULTS, **precond.init_kwargs}
  unet = precond.modules['unet']
  kw = {**_UNET_DEFAULTS, **{k: v for k, v in precond.init_kwargs.items() if k in _UNET_DEFAULTS},
        **unet.init_kwargs}
  different = {k: kw[k] for k, v in _FIXED.items() if kw[k] != v}
  if different:
    raise ConversionError(f'{path}: an EDM2 UNet with {different}; cm_jax\'s edm2 network fixes these '
                          f'to EDM2\'s defaults {dict((k, _FIXED[k]) for k in different)}.')
  label_dim = int(pre['label_dim'])
  common.check_fields(config, {
      'model.name': 'edm2',
      'model.nf': int(kw['model_channels']),
      'model.ch_mult': tuple(int(m) for m in kw['channel_mult']),
      'model.num_res_blocks': int(kw['num_blocks']),
      'model.attn_resolutions': edm.set_equal(kw["attn_resolutions"]),
      'model.num_head_channels': int(kw['channels_per_head']),
      'model.num_classes': label_dim,
      'noise.noise_cond_scale': 1.0,
      'noise.sigma_data': float(pre['sigma_data']),
      'data.image_size': int(pre['img_resolution']),
      'data.num_channels': int(pre['img_channels']),
  }, path, f'an EDM2 UNet (model_channels {kw["model_channels"]}, {label_dim} classes)')
  abstract, _ = network()
  tensors = torch_pickle.state_dict(precond)
  ignored = {n: 'uncertainty head of the training loss' for n in tensors if n.startswith('logvar_')}
  m = config.model
  network_words = (f'config.model (edm2 nf={m.nf}, ch_mult={tuple(m.ch_mult)}, num_res_blocks='
                   f'{m.num_res_blocks}, attn_resolutions={tuple(m.attn_resolutions)})')
  params = common.build_params(abstract, rules(abstract), tensors, ignored, path, network_words)
  num_params, num_tensors = common.count({k: v for k, v in tensors.items() if k not in ignored})
  report = [
      f'Read {path} ({os.path.getsize(path):,} bytes): an NVlabs/edm2 Precond(sigma_data='
      f'{pre["sigma_data"]}) around an EDM2 UNet: {num_tensors} tensors, {num_params:,} parameters.',
      'EMA chosen: the pickle\'s "ema" network (a post-hoc EMA reconstruction) becomes the online '
      f'params, every EMA copy (training.ema_decays={tuple(config.training.ema_decays)}) and any '
      'target network.',
      f'Skipped: {common.describe(ignored)} (uncertainty head of the training loss).',
  ]
  if not np.isclose(float(kw['dropout']), float(config.model.dropout)):
    report.append(f'Note: EDM2 trained it with dropout {kw["dropout"]}, config.model.dropout='
                  f'{config.model.dropout} (no effect when sampling).')
  return common.Converted(params, None, None, report)

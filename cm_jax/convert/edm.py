"""NVlabs/edm network snapshots: pickled `EDMPrecond` networks (`.pkl`, the network under key 'ema').

The released files (README of NVlabs/edm, https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/):
`edm-cifar10-32x32-{cond,uncond}-{vp,ve}.pkl` (SongUNet: 'vp' is the DDPM++ architecture, 've' the
NCSN++ one, both trained with EDM's preconditioning), `edm-ffhq-64x64-uncond-{vp,ve}.pkl`,
`edm-afhqv2-64x64-uncond-{vp,ve}.pkl` (SongUNet) and `edm-imagenet-64x64-cond-adm.pkl` (DhariwalUNet);
`network-snapshot-*.pkl` of an EDM training run have the same form. The `baseline-*` files wrap VP, VE
or iDDPM preconditioning, whose c_noise differs from EDM's; they are refused.

The pickle is read by `torch_pickle` (no EDM code, no PyTorch). EDMPrecond feeds its network c_in x and
c_noise = ln(sigma) / 4: noise.noise_cond_scale = 1, noise.sigma_data = its sigma_data.

SongUNet -> 'ncsnpp' (or 'songunet', which class-conditional ones need: their labels are mapped into
the noise features before the embedding MLP): BigGAN residual blocks resampling with EDM's filter
(fir_kernel = resample_filter: (1, 1) for DDPM++, (1, 3, 3, 1) for NCSN++), the residual input pyramid
of its 'residual' encoder, skip_rescale. Its Fourier or positional features are swapped to
[sin, cos] by SongUNet itself, as ours compute them; the Fourier frequencies (a buffer) become
GaussianFourierProjection/W; each block's attention qkv (per channel q, k, v) is split into NIN_0-2.
The label map Linear(onehot * sqrt(L)) + b becomes a lookup table.

DhariwalUNet -> 'dhariwalunet' (or 'adm' when both compute the same: every layer 128 channels or
more and attended layers multiples of 64): ADM with scale-shift norm, residual up/down, 64-channel
heads, its attention qkv reordered from EDM's per-head per-channel interleave.

Skipped: `map_augment` (the augmentation labels' embedding: EDM samples without augmentation labels,
so it adds nothing); the resampling filters (buffers) are checked against config.model.fir_kernel.
"""

import os
import re
from typing import Any

import numpy as np

from cm_jax.convert import common, torch_pickle
from cm_jax.errors import ConversionError

NAME = 'edm'

# Defaults of EDM's training/networks.py: a pickled module records only the arguments it was given.
_PRECOND_DEFAULTS = dict(label_dim=0, use_fp16=False, sigma_data=0.5, model_type='DhariwalUNet')
_SONGUNET_DEFAULTS = dict(
    label_dim=0, augment_dim=0, model_channels=128, channel_mult=[1, 2, 2, 2], channel_mult_emb=4,
    num_blocks=4, attn_resolutions=[16], dropout=0.10, embedding_type='positional',
    channel_mult_noise=1, encoder_type='standard', decoder_type='standard', resample_filter=[1, 1])
_DHARIWALUNET_DEFAULTS = dict(
    label_dim=0, augment_dim=0, model_channels=192, channel_mult=[1, 2, 3, 4], channel_mult_emb=4,
    num_blocks=3, attn_resolutions=[32, 16, 8], dropout=0.10)
_REFUSED_PRECONDS = {
    'VPPrecond': 'VP preconditioning (c_noise = 999 t(sigma), c_out = -sigma)',
    'VEPrecond': 'VE preconditioning (c_noise = ln(sigma / 2), c_in = 1)',
    'iDDPMPrecond': 'iDDPM preconditioning (c_noise = a timestep index)',
}
_SONGUNET_BLOCK = {'GroupNorm_0': 'norm0', 'Conv_0': 'conv0', 'Dense_0': 'affine',
                   'GroupNorm_1': 'norm1', 'Conv_1': 'conv1', 'Conv_2': 'skip'}
_DHARIWAL_BLOCK = {'in_norm': 'norm0', 'in_conv': 'conv0', 'emb_proj': 'affine', 'out_norm': 'norm1',
                   'out_conv': 'conv1', 'skip': 'skip'}


def detect(path: str, head: bytes) -> bool:
  """A pickle (not a legacy torch.save stream, whose first object is a long) with an 'ema' entry."""
  del path
  return head[:1] == b'\x80' and head[2:3] != b'\x8a' and b'ema' in head


def load_snapshot(path: str) -> tuple[dict, torch_pickle.Module]:
  """The snapshot's dict and its 'ema' network (a torch_pickle.Module)."""
  snapshot = torch_pickle.load(path)
  if not isinstance(snapshot, dict) or not isinstance(snapshot.get('ema'), torch_pickle.Module):
    keys = sorted(snapshot) if isinstance(snapshot, dict) else type(snapshot).__name__
    raise ConversionError(f'{path} is a pickle but not an NVlabs network snapshot with an "ema" '
                          f'network (it holds {keys}).')
  return snapshot, snapshot['ema']


def leaf_rule(prefix: str, leaf: str, shape: tuple[int, ...]) -> common.Rule:
  """The rule of one of our leaves from the EDM module at `prefix` (Conv2d, Linear, GroupNorm)."""
  if leaf in ('kernel', 'weight'):  # Flax Conv/Dense kernels; FirConv2d's 'weight' is HWIO too.
    return common.Rule((f'{prefix}.weight',), common.conv if len(shape) == 4 else common.linear)
  if leaf == 'scale':
    return common.Rule((f'{prefix}.weight',))
  if leaf == 'bias':
    return common.Rule((f'{prefix}.bias',))
  raise AssertionError(f'No EDM rule for a {leaf} leaf of {prefix}.')


def sub_rules(abstract_sub, prefix: str, names: dict[str, str]) -> dict:
  """Rules of a block's leaves {(submodule, leaf): Rule} from EDM module `prefix` and its children."""
  return {path: leaf_rule(f'{prefix}.{names[path[0]]}', path[-1], tuple(leaf.shape))
          for path, leaf in common.flat_paths(abstract_sub).items()}


def attention_rules(abstract_sub, prefix: str, heads: int, layout: str) -> dict:
  """Rules of an ADM AttentionBlock from an EDM UNetBlock's norm2 / qkv / proj, with the qkv rows
  reordered from EDM's per-head per-channel (q, k, v) interleave to `layout`."""
  reorder = lambda rows: common.reorder_qkv(rows, 'interleaved', layout, heads)
  return {
      ('norm', 'scale'): common.Rule((f'{prefix}.norm2.weight',)),
      ('norm', 'bias'): common.Rule((f'{prefix}.norm2.bias',)),
      ('qkv', 'kernel'): common.Rule((f'{prefix}.qkv.weight',), lambda w: common.linear(reorder(w))),
      ('qkv', 'bias'): common.Rule((f'{prefix}.qkv.bias',), reorder),
      ('proj_out', 'kernel'): common.Rule((f'{prefix}.proj.weight',), common.linear),
      ('proj_out', 'bias'): common.Rule((f'{prefix}.proj.bias',)),
  } if abstract_sub is not None else {}


def _nin_attention_rules(prefix: str) -> dict:
  """Rules of an NCSN++ AttnBlockpp from a single-head EDM UNetBlock: q, k, v are rows c * 3 + j."""
  rules = {('GroupNorm_0', 'scale'): common.Rule((f'{prefix}.norm2.weight',)),
           ('GroupNorm_0', 'bias'): common.Rule((f'{prefix}.norm2.bias',))}
  for j in range(3):
    rules[(f'NIN_{j}', 'W')] = common.Rule((f'{prefix}.qkv.weight',),
                                           lambda w, j=j: common.linear(w[j::3]))
    rules[(f'NIN_{j}', 'b')] = common.Rule((f'{prefix}.qkv.bias',), lambda b, j=j: b[j::3])
  rules[('NIN_3', 'W')] = common.Rule((f'{prefix}.proj.weight',), common.linear)
  rules[('NIN_3', 'b')] = common.Rule((f'{prefix}.proj.bias',))
  return rules


def _blocks(model: torch_pickle.Module, part: str) -> list[tuple[str, Any]]:
  container = model.modules.get(part)
  if container is None:
    raise ConversionError(f'The network has no {part!r} blocks: not an EDM SongUNet/DhariwalUNet.')
  return list(container.modules.items())


def _has_attention(block) -> bool:
  return 'qkv' in block.modules


def _by_index(flat: dict, prefix: str) -> list[str]:
  names = {path[0] for path in flat if re.fullmatch(rf'{prefix}_\d+', path[0])}
  return sorted(names, key=lambda n: int(n.rsplit('_', 1)[1]))


def _prefix_rules(flat_abstract: dict, top: str, rules_of_sub: dict) -> dict:
  return {(top,) + sub: rule for sub, rule in rules_of_sub.items()
          if (top,) + sub in flat_abstract}


def songunet_rules(abstract, model: torch_pickle.Module, label_dim: int) -> dict:
  """{our NCSNpp parameter path: Rule}: our modules of each kind, in creation order, take EDM's
  modules of that kind in the order of its forward pass (which is the same order)."""
  flat = common.flat_paths(abstract)
  enc, dec = _blocks(model, 'enc'), _blocks(model, 'dec')
  unet_blocks = [(f'model.{part}.{name}', b) for part, items in (('enc', enc), ('dec', dec))
                 for name, b in items if b.class_name == 'UNetBlock']
  convs = [f'model.enc.{n}' for n, _ in enc if n.endswith('_conv')] + [
      f'model.dec.{n}' for n, _ in dec if n.endswith('_aux_conv')]
  norms = [f'model.dec.{n}' for n, _ in dec if n.endswith('_aux_norm')]
  pyramid = [f'model.enc.{n}' for n, _ in enc if n.endswith('_aux_residual')]
  groups = [
      ('ResnetBlockBigGANpp', [p for p, _ in unet_blocks],
       lambda sub, p: sub_rules(sub, p, _SONGUNET_BLOCK)),
      ('AttnBlockpp', [p for p, b in unet_blocks if _has_attention(b)],
       lambda sub, p: _nin_attention_rules(p)),
      ('Conv', convs, lambda sub, p: {(leaf,): leaf_rule(p, leaf, tuple(sub[leaf].shape))
                                      for leaf in sub}),
      ('GroupNorm', norms, lambda sub, p: {(leaf,): leaf_rule(p, leaf, ()) for leaf in sub}),
      ('Downsample', pyramid, lambda sub, p: {
          ('Conv2d_0', leaf): leaf_rule(p, leaf, tuple(sub['Conv2d_0'][leaf].shape))
          for leaf in sub['Conv2d_0']}),
  ]
  rules = {}
  for kind, theirs, make in groups:
    ours = _by_index(flat, kind)
    if len(ours) != len(theirs):
      # Left for build_params to name a tensor: pair what can be paired, the rest stays unmatched.
      theirs = theirs[:len(ours)] + [f'model.<no {kind} module>'] * max(len(ours) - len(theirs), 0)
    for name, prefix in zip(ours, theirs):
      rules.update(_prefix_rules(flat, name, make(abstract[name], prefix)))
  noise = 'map_noise.freqs'
  for path in flat:
    top = path[0]
    if top == 'GaussianFourierProjection_0':
      rules[path] = common.Rule((f'model.{noise}',))
    elif top in ('Dense_0', 'Dense_1'):
      rules[path] = leaf_rule(f'model.map_layer{top[-1]}', path[-1], tuple(flat[path].shape))
    elif top == 'Embed_0':
      scale = float(np.sqrt(label_dim))
      rules[path] = common.Rule(('model.map_label.weight', 'model.map_label.bias'),
                                lambda w, b: w.T * scale + b)
  return rules


def dhariwalunet_rules(abstract, model: torch_pickle.Module, network) -> dict:
  """{our ADM parameter path: Rule} from a DhariwalUNet (`network`: the adm.ADM to convert into)."""
  flat = common.flat_paths(abstract)
  layout = 'split_first' if network.use_new_attention_order else 'heads_first'
  mapping: dict[str, tuple[str, Any]] = {}  # Our top module -> (EDM prefix, EDM module).
  for k, (name, block) in enumerate(_blocks(model, 'enc')):
    prefix = f'model.enc.{name}'
    if name.endswith('_conv'):
      mapping['in_conv' if k == 0 else f'enc_{k}_conv'] = (prefix, block)
    elif name.endswith('_down'):
      mapping[f'enc_{k}_down'] = (prefix, block)
    else:
      mapping[f'enc_{k}_res'] = (prefix, block)
      if _has_attention(block):
        mapping[f'enc_{k}_attn'] = (prefix, block)
  k = -1
  for name, block in _blocks(model, 'dec'):
    prefix = f'model.dec.{name}'
    if name.endswith('_in0'):
      mapping['mid_res_0'] = (prefix, block)
      if _has_attention(block):
        mapping['mid_attn'] = (prefix, block)
    elif name.endswith('_in1'):
      mapping['mid_res_1'] = (prefix, block)
    elif name.endswith('_up'):
      mapping[f'dec_{k}_up'] = (prefix, block)
    else:
      k += 1
      mapping[f'dec_{k}_res'] = (prefix, block)
      if _has_attention(block):
        mapping[f'dec_{k}_attn'] = (prefix, block)
  top_level = {'time_embed_in': 'model.map_layer0', 'time_embed_out': 'model.map_layer1',
               'out_norm': 'model.out_norm', 'out_conv': 'model.out_conv'}
  rules = {}
  for top in dict.fromkeys(path[0] for path in flat):
    sub = abstract[top]
    if top in top_level:
      rules.update({(top, leaf): leaf_rule(top_level[top], leaf, tuple(sub[leaf].shape))
                    for leaf in sub})
    elif top == 'label_embed':
      rules[(top, 'embedding')] = common.Rule(('model.map_label.weight',), lambda w: w.T)
    elif top not in mapping:
      # Our network has a module the file lacks: build_params names the tensor it would need.
      rules.update({(top,) + path: common.Rule((f'model.<no module for {top}>',))
                    for path in common.flat_paths(sub)})
    elif top.endswith('attn'):
      prefix, block = mapping[top]
      heads = int(block.__dict__.get('num_heads', 0))
      rules.update(_prefix_rules(flat, top, attention_rules(sub, prefix, max(heads, 1), layout)))
    elif 'kernel' in sub:  # The input conv.
      prefix, _ = mapping[top]
      rules.update({(top, leaf): leaf_rule(prefix, leaf, tuple(sub[leaf].shape)) for leaf in sub})
    else:
      prefix, _ = mapping[top]
      rules.update(_prefix_rules(flat, top, sub_rules(sub, prefix, _DHARIWAL_BLOCK)))
  return rules


def _kwargs(module: torch_pickle.Module, defaults: dict) -> dict:
  return {**defaults, **module.init_kwargs}


def set_equal(values):
  target = sorted(int(v) for v in values)
  predicate = lambda value: sorted(int(v) for v in (value if isinstance(value, (list, tuple))
                                                   else (value,))) == target
  predicate.suggest = tuple(target)
  return predicate


def _check_filters(path: str, tensors: dict, fir_kernel) -> list[str]:
  """EDM's resampling filters are buffers of the file: each must be outer(k, k) / sum(k)^2."""
  k = np.asarray(fir_kernel, np.float64)
  expected = np.outer(k, k) / k.sum() ** 2
  names = [n for n in tensors if n.endswith('resample_filter')]
  for name in names:
    f = np.asarray(tensors[name], np.float64).reshape(-1)
    if f.size != expected.size or not np.allclose(f, expected.ravel(), atol=1e-7):
      raise ConversionError(f'{path}: the resampling filter {name} is not the one of its '
                            f'resample_filter={tuple(fir_kernel)}; the file is inconsistent.')
  return names


def _check_precond(path: str, precond) -> None:
  """Refuse what is not an EDMPrecond around a network (other preconditionings, EDM2 files)."""
  if precond.class_name in _REFUSED_PRECONDS:
    raise ConversionError(f'{path} wraps its network in {precond.class_name}: '
                          f'{_REFUSED_PRECONDS[precond.class_name]}, not EDM\'s. cm_jax converts '
                          'EDMPrecond networks (the edm-* files, not the baseline-* ones).')
  if precond.class_name == 'Precond' and 'unet' in precond.modules:
    raise ConversionError(f'{path} is an NVlabs/edm2 network: convert it with --source_format=edm2.')
  if precond.class_name != 'EDMPrecond' or 'model' not in precond.modules:
    raise ConversionError(f'{path}: its "ema" network is a {precond.class_name}, not an EDMPrecond.')


def _songunet(path: str, config, model, network: common.Build, tensors: dict,
              common_fields: dict) -> tuple:
  """(kwargs, rules, checked filter names, description) of a SongUNet checked against the config."""
  kw = _kwargs(model, _SONGUNET_DEFAULTS)
  noise_mult = {'fourier': 2, 'positional': 1}[kw['embedding_type']]
  problems = []
  if kw['encoder_type'] not in ('standard', 'residual') or kw['decoder_type'] != 'standard':
    problems.append(f'encoder_type={kw["encoder_type"]!r}, decoder_type={kw["decoder_type"]!r} '
                    "(only the 'standard'/'residual' encoders and the 'standard' decoder of the "
                    'released DDPM++ and NCSN++ are supported)')
  if kw['channel_mult_noise'] != noise_mult:
    problems.append(f'channel_mult_noise={kw["channel_mult_noise"]} with {kw["embedding_type"]} '
                    f'features (cm_jax\'s NCSN++ has {noise_mult})')
  if kw['channel_mult_emb'] != 4:
    problems.append(f'channel_mult_emb={kw["channel_mult_emb"]} (cm_jax\'s NCSN++ has 4)')
  if problems:
    raise ConversionError(f'{path}: a SongUNet that cm_jax\'s NCSN++ cannot express: '
                          f'{"; ".join(problems)}.')
  label_dim = int(kw['label_dim'])
  expected = {
      'model.name': common.one_of('songunet') if label_dim else common.one_of('ncsnpp', 'songunet'),
      'model.nf': int(kw['model_channels']),
      'model.ch_mult': tuple(int(m) for m in kw['channel_mult']),
      'model.num_res_blocks': int(kw['num_blocks']),
      'model.attn_resolutions': set_equal(kw['attn_resolutions']),
      'model.resblock_type': 'biggan',
      'model.fir': True,
      'model.fir_kernel': common.proportional(kw['resample_filter']),
      'model.skip_rescale': True,
      'model.progressive': 'none',
      'model.progressive_input': {'standard': 'none', 'residual': 'residual'}[kw['encoder_type']],
      'model.embedding_type': kw['embedding_type'],
      'model.conv_size': 3,
      'model.num_classes': label_dim,
      **common_fields,
  }
  what = (f'an EDM SongUNet ({"DDPM++" if kw["embedding_type"] == "positional" else "NCSN++"}: '
          f'{kw["embedding_type"]} features, {kw["encoder_type"]} encoder, resample_filter '
          f'{list(kw["resample_filter"])}{f", {label_dim} classes" if label_dim else ""})')
  common.check_fields(config, expected, path, what)
  abstract, _ = network()
  rules = songunet_rules(abstract, model, label_dim)
  return kw, abstract, rules, _check_filters(path, tensors, config.model.fir_kernel), what


def _dhariwalunet(path: str, config, model, network: common.Build, tensors: dict,
                  common_fields: dict, resolution: int) -> tuple:
  """(kwargs, rules, checked filter names, description) of a DhariwalUNet checked against the
  config."""
  kw = _kwargs(model, _DHARIWALUNET_DEFAULTS)
  if kw['channel_mult_emb'] != 4:
    raise ConversionError(f'{path}: a DhariwalUNet with channel_mult_emb={kw["channel_mult_emb"]}; '
                          'cm_jax\'s ADM has a 4 x nf embedding.')
  nf, mults = int(kw['model_channels']), [int(m) for m in kw['channel_mult']]
  label_dim = int(kw['label_dim'])
  widths = {nf * m for m in mults}
  resolutions = [resolution >> i for i in range(len(mults))]
  attended = {nf * m for m, r in zip(mults, resolutions) if r in kw['attn_resolutions']}
  attended.add(nf * mults[-1])
  as_adm = (min(a + b for a in widths for b in widths | {0}) >= 128
            and all(w % 64 == 0 for w in attended))
  expected = {
      'model.name': common.one_of('dhariwalunet', 'adm') if as_adm else common.one_of('dhariwalunet'),
      'model.nf': nf,
      'model.ch_mult': tuple(mults),
      'model.num_res_blocks': int(kw['num_blocks']),
      'model.attn_resolutions': set_equal(kw['attn_resolutions']),
      'model.num_head_channels': 64,
      'model.use_scale_shift_norm': True,
      'model.resblock_updown': True,
      'model.num_classes': label_dim,
      **common_fields,
  }
  what = f'an EDM DhariwalUNet (ADM{f", {label_dim} classes" if label_dim else ""})'
  common.check_fields(config, expected, path, what)
  abstract, adm_network = network()
  rules = dhariwalunet_rules(abstract, model, adm_network)
  # DhariwalUNet resamples with [1, 1].
  return kw, abstract, rules, _check_filters(path, tensors, (1, 1)), what


def read(path: str, config, network: common.Build) -> common.Converted:
  """The snapshot's EMA network in our layout, after checking it against the config's network."""
  snapshot, precond = load_snapshot(path)
  _check_precond(path, precond)
  pre = _kwargs(precond, _PRECOND_DEFAULTS)
  model = precond.modules['model']
  kind = model.class_name
  tensors = torch_pickle.state_dict(model, 'model.')
  common_fields = {
      'noise.noise_cond_scale': 1.0,
      'noise.sigma_data': float(pre['sigma_data']),
      'data.image_size': int(pre['img_resolution']),
      'data.num_channels': int(pre['img_channels']),
  }
  if kind == 'SongUNet':
    kw, abstract, rules, filters, what = _songunet(path, config, model, network, tensors,
                                                   common_fields)
  elif kind == 'DhariwalUNet':
    kw, abstract, rules, filters, what = _dhariwalunet(path, config, model, network, tensors,
                                                       common_fields, int(pre['img_resolution']))
  else:
    raise ConversionError(f'{path}: an EDMPrecond around a {kind}; cm_jax converts SongUNet and '
                          'DhariwalUNet networks.')
  ignored = {name: 'resampling filter (checked)' for name in filters}
  for name in tensors:
    if name.startswith('model.map_augment.'):
      ignored[name] = 'augmentation-label embedding, unused when sampling'
  m = config.model
  network_words = (f'config.model ({m.name} nf={m.nf}, ch_mult={tuple(m.ch_mult)}, num_res_blocks='
                   f'{m.num_res_blocks}, attn_resolutions={tuple(m.attn_resolutions)})')
  params = common.build_params(abstract, rules, tensors, ignored, path, network_words)
  num_params, num_tensors = common.count({k: v for k, v in tensors.items() if k not in filters})
  others = [f'{k} ({v.class_name})' if isinstance(v, torch_pickle.Module) else k
            for k, v in snapshot.items() if k != 'ema']
  report = [
      f'Read {path} ({os.path.getsize(path):,} bytes): an NVlabs/edm snapshot, EDMPrecond(sigma_data='
      f'{pre["sigma_data"]}) around {what}: {num_tensors} tensors, {num_params:,} parameters'
      + (f'; also holds {", ".join(others)}, not used.' if others else '.'),
      'EMA chosen: the snapshot\'s "ema" network (EDM snapshots keep only the EMA) becomes the online '
      f'params, every EMA copy (training.ema_decays={tuple(config.training.ema_decays)}) and any '
      'target network.',
  ]
  return common.Converted(params, None, None, report + _notes(config, kind, pre, kw, ignored,
                                                              filters))


def _notes(config, kind: str, pre: dict, kw: dict, ignored: dict, filters: list[str]) -> list[str]:
  """The report's lines on what was skipped, checked, and differs from the config."""
  report = []
  skipped = [n for n, why in ignored.items() if why != 'resampling filter (checked)']
  if skipped:
    report.append(f'Skipped: {common.describe(skipped)} ({ignored[skipped[0]]}).')
  if filters:
    report.append(f'Checked: {len(filters)} resampling filters equal outer(k, k) / sum(k)^2 of '
                  f'k = {tuple(config.model.fir_kernel) if kind == "SongUNet" else (1, 1)}.')
  notes = []
  if pre.get('use_fp16'):
    notes.append('the network ran in float16 in EDM; here in config.model.dtype='
                 f'{config.model.dtype!r}')
  if not np.isclose(float(kw['dropout']), float(config.model.dropout)):
    notes.append(f'EDM trained it with dropout {kw["dropout"]}, config.model.dropout='
                 f'{config.model.dropout} (no effect when sampling)')
  if config.method != 'edm':
    notes.append(f'an EDM network converts into an EDM run, but config.method={config.method!r}')
  return report + [f'Note: {n}.' for n in notes]

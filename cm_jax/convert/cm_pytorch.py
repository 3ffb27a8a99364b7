"""openai/consistency_models checkpoints: `torch.save`d state dicts of guided-diffusion's UNetModel.

The released files (README of openai/consistency_models): `edm_imagenet64_ema.pt`,
`cd_imagenet64_l2.pt`, `cd_imagenet64_lpips.pt`, `ct_imagenet64.pt`, and for LSUN Bedroom / Cat 256
`edm_{bedroom,cat}256_ema.pt`, `cd_{bedroom,cat}256_{l2,lpips}.pt`, `ct_{bedroom,cat}256.pt`: one set of
weights each (its `TrainLoop.save` writes one state dict per EMA rate; the released file is one of them).

Layout: conv weights (out, in, kh, kw) -> Flax (kh, kw, in, out); linear weights and the attention's 1-D
convs (out, in[, 1]) -> (in, out); GroupNorm weight -> scale. Attention: both of the repository's paths
(QKVFlashAttention, its default and the one every script builds, and QKVAttentionLegacy, which it
rearranges "b (three h d) s" first) read the qkv channels as [q | k | v], each split into heads: what
cm_jax calls use_new_attention_order=True. With use_new_attention_order=False the rows are reordered
to per-head [q | k | v], so both configs compute the same function.

The network sees c_in x and c_noise = 1000 * ln(sigma) / 4 (`KarrasDenoiser.denoise`):
noise.noise_cond_scale = 1000; sigma_data 0.5 and, for the consistency function, sigma_min 0.002.
"""

import os
import re

import numpy as np

from cm_jax.convert import common, torch_pickle
from cm_jax.errors import ConversionError

NAME = 'cm_pytorch'

_RESBLOCK = {'in_norm': 'in_layers.0', 'in_conv': 'in_layers.2', 'emb_proj': 'emb_layers.1',
             'out_norm': 'out_layers.0', 'out_conv': 'out_layers.3', 'skip': 'skip_connection'}
_METHOD_OF_PREFIX = {'edm': 'edm', 'cd': 'cd', 'ct': 'ct'}


def detect(path: str, head: bytes) -> bool:
  del path
  return head[:2] == b'PK' or head[:2] == b'\x80\x02'  # torch.save: zip, or a legacy pickle stream.


def _leaf_rule(torch_prefix: str, leaf: str, ndim: int) -> common.Rule:
  if leaf == 'kernel':
    return common.Rule((f'{torch_prefix}.weight',), common.conv if ndim == 4 else common.linear)
  if leaf in ('scale', 'embedding'):
    return common.Rule((f'{torch_prefix}.weight',))
  return common.Rule((f'{torch_prefix}.{leaf}',))


def _prefix(top: str, sub: tuple[str, ...], modules: set[str]) -> str:
  """The torch module of our module `top` (and its submodule path `sub`)."""
  fixed = {'time_embed_in': 'time_embed.0', 'time_embed_out': 'time_embed.2', 'label_embed': 'label_emb',
           'in_conv': 'input_blocks.0.0', 'mid_res_0': 'middle_block.0', 'mid_attn': 'middle_block.1',
           'mid_res_1': 'middle_block.2', 'out_norm': 'out.0', 'out_conv': 'out.2'}
  if top in fixed:
    base = fixed[top]
  else:
    side, k, kind = re.fullmatch(r'(enc|dec)_(\d+)_(res|attn|down|up)', top).groups()
    blocks = 'input_blocks' if side == 'enc' else 'output_blocks'
    index = {'res': 0, 'attn': 1, 'down': 0, 'up': 1 + (f'dec_{k}_attn' in modules)}[kind]
    base = f'{blocks}.{k}.{index}'
    if not sub and kind in ('down', 'up'):  # A plain conv resampling, not a residual block.
      base += '.op' if kind == 'down' else '.conv'
  if sub and sub[0] in _RESBLOCK:
    return f'{base}.{_RESBLOCK[sub[0]]}'
  return '.'.join((base,) + sub)


def rules(abstract, network, layout: str = 'split_first') -> dict:
  """{our parameter path: Rule} of the ADM `network` (an adm.ADM) from a UNetModel state dict."""
  flat = common.flat_paths(abstract)
  modules = {path[0] for path in flat}
  out = {}
  for path, leaf in flat.items():
    top, sub, name = path[0], path[1:-1], path[-1]
    prefix = _prefix(top, sub, modules)
    rule = _leaf_rule(prefix, name, len(leaf.shape))
    if sub == ('qkv',):
      ours = 'split_first' if network.use_new_attention_order else 'heads_first'
      channels = leaf.shape[-1] // 3
      heads = network._heads(channels, top.startswith('dec'))  # pylint: disable=protected-access
      fn = rule.fn
      rule = common.Rule(rule.sources, lambda w, fn=fn, heads=heads, ours=ours: (
          fn(common.reorder_qkv(w, layout, ours, heads))))
    out[path] = rule
  return out


def read(path: str, config, network: common.Build) -> common.Converted:
  """The state dict's weights in our layout, after checking them against the config's network."""
  common.check_fields(config, {
      'model.name': 'adm',
      'noise.noise_cond_scale': 1000.0,
      'noise.sigma_data': 0.5,
      'noise.sigma_min': 0.002,
  }, path, 'a UNetModel of openai/consistency_models (c_noise = 1000 ln(sigma) / 4, sigma_data 0.5, '
     'sigma_min 0.002)')
  tensors = torch_pickle.load(path)
  if not isinstance(tensors, dict) or not all(isinstance(v, np.ndarray) for v in tensors.values()):
    keys = list(tensors)[:5] if isinstance(tensors, dict) else type(tensors).__name__
    raise ConversionError(f'{path} is a torch.save file but not a state dict of tensors (it holds '
                          f'{keys}); openai/consistency_models releases plain state dicts.')
  tensors = dict(tensors)
  _check_shapes(path, config, tensors)
  abstract, adm_network = network()
  m = config.model
  network_words = (f'config.model (ADM nf={m.nf}, ch_mult={tuple(m.ch_mult)}, num_res_blocks='
                   f'{m.num_res_blocks}, attn_resolutions={tuple(m.attn_resolutions)}, '
                   f'resblock_updown={m.resblock_updown}) at {config.data.image_size}x'
                   f'{config.data.image_size}')
  params = common.build_params(abstract, rules(abstract, adm_network), tensors, {}, path,
                               network_words)
  num_params, num_tensors = common.count(tensors)
  dtypes = sorted({str(v.dtype) for v in tensors.values()})
  report = [
      f'Read {path} ({os.path.getsize(path):,} bytes): an openai/consistency_models state dict of '
      f'{num_tensors} tensors ({"/".join(dtypes)}, as float32) and {num_params:,} parameters.',
      'EMA chosen: the file holds one set of weights; it becomes the online params, every EMA copy '
      f'(training.ema_decays={tuple(config.training.ema_decays)}) and any target network.',
      'Attention qkv: [q | k | v] split into heads in the file'
      + ('' if m.use_new_attention_order else ', reordered to per-head [q | k | v] '
         '(model.use_new_attention_order=False)') + '.',
  ]
  prefix = os.path.basename(path).split('_')[0]
  if _METHOD_OF_PREFIX.get(prefix, config.method) != config.method:
    report.append(f'Note: the file name suggests a {_METHOD_OF_PREFIX[prefix]!r} run but '
                  f'config.method={config.method!r}.')
  return common.Converted(params, None, None, report)


def _check_shapes(path: str, config, tensors: dict) -> None:
  """What the file's shapes say about the architecture, as config overrides (clearer than the first
  tensor that does not fit)."""
  expected = {}
  if 'time_embed.0.weight' in tensors:
    expected['model.nf'] = int(tensors['time_embed.0.weight'].shape[1])
  expected['model.num_classes'] = int(tensors['label_emb.weight'].shape[0]) if 'label_emb.weight' in \
      tensors else 0
  if 'input_blocks.0.0.weight' in tensors:
    expected['data.num_channels'] = int(tensors['input_blocks.0.0.weight'].shape[1])
  emb, out = 'input_blocks.1.0.emb_layers.1.weight', 'input_blocks.1.0.out_layers.3.weight'
  if emb in tensors and out in tensors:
    expected['model.use_scale_shift_norm'] = bool(tensors[emb].shape[0] == 2 * tensors[out].shape[0])
  if 'out.2.weight' in tensors and 'input_blocks.0.0.weight' in tensors and (
      tensors['out.2.weight'].shape[0] != tensors['input_blocks.0.0.weight'].shape[1]):
    raise ConversionError(f'{path} outputs {tensors["out.2.weight"].shape[0]} channels for '
                          f'{tensors["input_blocks.0.0.weight"].shape[1]} input channels (a '
                          'learn_sigma model): cm_jax networks predict the image only.')
  common.check_fields(config, expected, path, 'an ADM with these settings')

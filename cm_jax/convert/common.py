"""What every source format shares: tensor layouts, the map from a file's tensors to our parameter
tree with its checks, the checks of the config against what a file says, and the run folder written.

A format (cm_cifar10.py, cm_pytorch.py, edm.py, edm2.py) is a module with NAME, `detect(path, head)`
and `read(path, config, network: Build) -> Converted`: it reads its file into named NumPy arrays,
checks what the file says of the config (`check_fields`), and says, for every parameter of the
config's network, which of the file's tensors it is made of and how (`Rule`). `build_params` then
refuses, before anything is written, a file whose tensors do not fit that network, naming the first
of the file's tensors (in the file's order) that does not fit.
"""

import dataclasses
import os
from typing import Any, Callable, Mapping, Sequence

import jax
import ml_collections
import numpy as np

from cm_jax import checkpointing, config_utils, experiment, sharding
from cm_jax.errors import ConversionError

Path = tuple[str, ...]  # A parameter's path in our tree, e.g. ('enc_1_res', 'in_conv', 'kernel').
# What a format's `read(path, config, network)` calls once it has checked what the file says of the
# config: builds the config's network, returning (its abstract params, the Flax module).
Build = Callable[[], tuple[Any, Any]]


@dataclasses.dataclass(frozen=True)
class Rule:
  """A parameter made from the file's tensors `sources` by `fn(*arrays)`."""
  sources: tuple[str, ...]
  fn: Callable[..., np.ndarray] = lambda a: a


@dataclasses.dataclass
class Converted:
  """A file's weights in our layout: the online params, the EMA copy and the target network that
  the file holds (None where it holds one set of weights only), and what was read, for the report."""
  params: Any
  ema: Any = None
  target: Any = None
  report: list[str] = dataclasses.field(default_factory=list)
  source_step: int | None = None


# ---------------------------------------------------------------------------------------------------
# Tensor layouts.


def conv(w: np.ndarray) -> np.ndarray:
  """A PyTorch conv weight (out, in, kh, kw) as a Flax kernel (kh, kw, in, out)."""
  return np.transpose(w, (2, 3, 1, 0))


def linear(w: np.ndarray) -> np.ndarray:
  """A PyTorch linear weight (out, in), or a 1x1 / 1-D conv weight (out, in, 1[, 1]), as (in, out)."""
  return w.reshape(w.shape[0], -1).T if w.ndim > 2 else w.T


def qkv_rows(layout: str, heads: int, head_channels: int) -> np.ndarray:
  """[3, heads, head_channels] -> the row (output channel) of q/k/v j, head h, channel c in `layout`.

  'split_first' ([q | k | v], each split into heads): guided-diffusion's QKVAttention, both attention
  paths of openai/consistency_models, cm_jax's use_new_attention_order=True. 'heads_first' (per head
  [q | k | v]): guided-diffusion's QKVAttentionLegacy, cm_jax's use_new_attention_order=False.
  'interleaved' (per head, per channel q, k, v): NVlabs/edm's UNetBlock and edm2's Block.
  """
  j, h, c = np.meshgrid(np.arange(3), np.arange(heads), np.arange(head_channels), indexing='ij')
  channels = heads * head_channels
  if layout == 'split_first':
    return j * channels + h * head_channels + c
  if layout == 'heads_first':
    return h * 3 * head_channels + j * head_channels + c
  if layout == 'interleaved':
    return h * 3 * head_channels + c * 3 + j
  raise ValueError(f'Unknown qkv layout {layout!r}.')


def reorder_qkv(rows: np.ndarray, source: str, target: str, heads: int) -> np.ndarray:
  """A qkv weight or bias (rows = output channels first) from one layout to another."""
  head_channels = rows.shape[0] // 3 // heads
  order = np.empty(rows.shape[0], np.int64)
  order[qkv_rows(target, heads, head_channels).ravel()] = qkv_rows(source, heads,
                                                                     head_channels).ravel()
  return rows[order]


# ---------------------------------------------------------------------------------------------------
# The file's tensors into our tree.


def flat_paths(tree) -> dict[Path, Any]:
  """{path of str keys: leaf} of a nested dict, in its order."""
  return {tuple(str(k.key) for k in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def unflatten(flat: Mapping[Path, Any]) -> dict:
  tree: dict = {}
  for path, leaf in flat.items():
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = leaf
  return tree


def build_params(abstract, rules: Mapping[Path, Rule], tensors: Mapping[str, np.ndarray],
                 ignored: Mapping[str, str], source: str, network: str) -> dict:
  """Our params (float32 NumPy), every parameter made by its rule from the file's tensors.

  Args:
    abstract: the network's abstract params (shapes), in our layout.
    rules: a rule for every parameter of `abstract`.
    tensors: the file's tensors by name, in the file's order.
    ignored: tensors of the file that have no place in our network, with the reason (reported).
    source: the file, for messages.
    network: the network config described in words, for messages.

  Raises:
    ConversionError: naming the first tensor of the file (in its order) that is missing, left over
      or of another shape than the network needs, before anything is written.
  """
  wanted = flat_paths(abstract)
  if set(wanted) != set(rules):  # A bug of a format, not of the file.
    raise AssertionError(sorted(set(wanted) ^ set(rules))[:5])
  order = {name: i for i, name in enumerate(tensors)}
  used = {name for rule in rules.values() for name in rule.sources}
  problems = []  # (position in the file, message).
  for name in tensors:
    if name not in used and name not in ignored:
      problems.append((order[name], f'its tensor {name} {tuple(tensors[name].shape)} has no place in '
                                    f'{network}'))
  out = {}
  for path, rule in rules.items():
    missing = [s for s in rule.sources if s not in tensors]
    if missing:
      problems.append((len(order), f'it has no tensor {missing[0]}, which {network} needs for '
                                   f'{"/".join(path)}'))
      continue
    arrays = [np.asarray(tensors[s]) for s in rule.sources]
    try:
      value = np.asarray(rule.fn(*arrays), np.float32)
    except (ValueError, IndexError):
      value = None
    if value is None or value.shape != tuple(wanted[path].shape):
      shapes = ', '.join(f'{s} {tuple(a.shape)}' for s, a in zip(rule.sources, arrays))
      problems.append((min(order[s] for s in rule.sources),
                       f'its tensor {shapes} does not fit {"/".join(path)} '
                       f'{tuple(wanted[path].shape)} of {network}'))
      continue
    out[path] = value
  if problems:
    _, first = min(problems, key=lambda p: p[0])
    more = f' ({len(problems) - 1} more differences)' if len(problems) > 1 else ''
    raise ConversionError(
        f'{source} does not match the config: {first}{more}. Nothing was written. Convert it with '
        'the config of the run that made it (see README, "Using the released models").')
  return unflatten({path: out[path] for path in wanted})


def count(tree) -> tuple[int, int]:
  """(parameters, tensors) of a tree of arrays."""
  leaves = jax.tree.leaves(tree)
  return sum(int(np.prod(np.shape(leaf))) for leaf in leaves), len(leaves)


# ---------------------------------------------------------------------------------------------------
# The config against what the file says.


def get(config: ml_collections.ConfigDict, dotted: str):
  value = config
  for part in dotted.split('.'):
    value = value[part]
  return value


def _same(a, b) -> bool:
  if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
    return (isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b)
            and all(_same(x, y) for x, y in zip(a, b)))
  if isinstance(a, float) or isinstance(b, float):
    try:
      return abs(float(a) - float(b)) <= 1e-9 * max(1.0, abs(float(b)))
    except (TypeError, ValueError):
      return False
  return a == b


def _flag(value) -> str:
  if isinstance(value, (list, tuple)):
    return '"(' + ','.join(str(v) for v in value) + (',' if len(value) == 1 else '') + ')"'
  return str(value)


def check_fields(config: ml_collections.ConfigDict, expected: Mapping[str, Any], source: str,
                 what: str) -> None:
  """Refuses a config whose fields differ from what the file implies, listing every override.

  `expected` maps dotted config fields to the value the file needs (a callable value is a predicate,
  with the value to suggest in its `suggest` attribute).
  """
  diffs = []
  for dotted, want in expected.items():
    have = get(config, dotted)
    ok = want(have) if callable(want) else _same(have, want)
    if not ok:
      suggest = getattr(want, 'suggest', want)
      diffs.append((dotted, have, suggest))
  if diffs:
    listed = '; '.join(f'{k}={v!r} (the file: {s!r})' for k, v, s in diffs)
    flags = ' '.join(f'--config.{k}={_flag(s)}' for k, _, s in diffs)
    raise ConversionError(f'{source} is {what}, which the config does not describe: {listed}. '
                          f'Nothing was written. Pass {flags} (here and whenever this run is used).')


def one_of(*values):
  """A predicate for check_fields: the config's value is any of `values` (the first is suggested)."""
  predicate = lambda value: any(_same(value, v) for v in values)
  predicate.suggest = values[0]
  return predicate


def proportional(values):
  """A predicate for check_fields: a sequence proportional to `values` (a FIR kernel)."""
  target = np.asarray(values, np.float64)

  def predicate(value):
    try:
      v = np.asarray(value, np.float64)
    except (TypeError, ValueError):
      return False
    return v.shape == target.shape and v.sum() != 0 and np.allclose(v / v.sum(), target / target.sum())
  predicate.suggest = tuple(values)
  return predicate


# ---------------------------------------------------------------------------------------------------
# The run folder.


def check_workdir_free(workdir: str) -> None:
  """Refuses a workdir that holds a run: a conversion never overwrites one."""
  if os.path.exists(config_utils.config_path(workdir)) or os.path.isdir(
      os.path.join(workdir, 'checkpoints')):
    raise ConversionError(f'{workdir} already holds a run (config.json or checkpoints/); convert into '
                          'a new --workdir.')


def write_run(exp: experiment.Experiment, converted: Converted, step: int,
              meta: Mapping[str, Any]) -> str:
  """The run folder: an Orbax checkpoint at `step` and config.json, as a run of `exp.config` writes.

  params <- the file's online params; every EMA copy <- the file's EMA copy (or its only weights);
  the method's extra state from `init_extra` (a CD/CT target network: a copy of the online params),
  its target network replaced by the file's where it has one; a fresh optimizer state.
  """
  config = exp.config
  to_device = lambda tree: jax.device_put(tree, exp.state_shardings.params)
  params = to_device(converted.params)
  # The state is created sharded, as the trainer creates a run's first state (trainer.restore_or_init):
  # params an argument, not a constant; run once, so compiled unoptimised on CPU.
  init = jax.jit(lambda key, p: exp.init_state_fn(p)(key),
                 in_shardings=(sharding.replicated(exp.mesh), exp.state_shardings.params),
                 out_shardings=exp.state_shardings)
  options = {'xla_backend_optimization_level': 0} if jax.default_backend() == 'cpu' else None
  key = jax.random.PRNGKey(config.seed)
  state = init.lower(key, params).compile(compiler_options=options)(key, params)
  ema = params if converted.ema is None else to_device(converted.ema)
  state = state.replace(ema_params=tuple(ema for _ in config.training.ema_decays))
  if converted.target is not None and 'target_params' in state.extra:
    state = state.replace(extra={**state.extra, 'target_params': to_device(converted.target)})
  ckpt = checkpointing.Checkpointer(os.path.join(exp.workdir, 'checkpoints'), async_save=False)
  try:
    ckpt.save(step, state.items(), {'step': step, 'method': config.method, **meta}, force=True)
  finally:
    ckpt.close()
  # Last: a folder with a config.json and no checkpoint never looks like a finished run.
  if jax.process_index() == 0:
    config_utils.save_config(config, exp.workdir)
  return os.path.join(exp.workdir, 'checkpoints', str(step))


def describe(names: Sequence[str], limit: int = 4) -> str:
  names = list(names)
  shown = ', '.join(names[:limit])
  return shown + (f' and {len(names) - limit} more' if len(names) > limit else '')

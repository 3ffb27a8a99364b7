r"""Released checkpoints into cm_jax run folders: `python -m cm_jax.convert`.

  python -m cm_jax.convert --source=edm_imagenet64_ema.pt --config=configs/imagenet64_edm.py \
      --workdir=runs/imagenet64_edm_released

Sources (one module each): openai/consistency_models_cifar10's flax msgpack States (`cm_cifar10`),
openai/consistency_models' PyTorch state dicts (`cm_pytorch`), NVlabs/edm network pickles (`edm`) and
NVlabs/edm2 ones (`edm2`). The file is read without its repository's code (and without PyTorch), its
tensors are mapped onto the config's network and checked against it, and only then is a run folder
written: config.json and an Orbax checkpoint (params, optimizer state, EMA copies, the method's extra
state) at step training.num_steps, as a finished run of that config. `--mode=sample/edit/eval`,
`teacher.workdir` of a CD run, and `--mode=train` (which resumes it) take it as they take any run.
"""

import os
import re
from typing import Callable

import jax
import ml_collections

from cm_jax import config_utils, experiment
from cm_jax.convert import cm_cifar10, cm_pytorch, common, edm, edm2
from cm_jax.errors import ConversionError

FORMATS = {module.NAME: module for module in (cm_cifar10, cm_pytorch, edm, edm2)}


def detect_format(path: str) -> str:
  """The format of a checkpoint file, from its first bytes (for pickles, the class names in them)."""
  if not os.path.isfile(path):
    raise ConversionError(f'--source={path} does not exist (or is not a file).')
  with open(path, 'rb') as f:
    head = f.read(1 << 22)
  if edm.detect(path, head):
    # The class names of the pickled torch_utils.persistence objects: EDM's preconditioners are
    # EDMPrecond (VP/VE/iDDPMPrecond: refused by its reader), EDM2's is Precond.
    classes = set(re.findall(rb'class_name[^A-Za-z]{1,8}([A-Za-z_][A-Za-z0-9_]*)', head))
    if classes & {b'EDMPrecond', b'VPPrecond', b'VEPrecond', b'iDDPMPrecond'}:
      return edm.NAME
    if b'Precond' in classes:
      return edm2.NAME
    _, network = edm.load_snapshot(path)
    return edm2.NAME if network.class_name == 'Precond' else edm.NAME
  for name in (cm_pytorch.NAME, cm_cifar10.NAME):
    if FORMATS[name].detect(path, head):
      return name
  raise ConversionError(f'{path} is none of the formats cm_jax converts ({", ".join(FORMATS)}); '
                        'name one with --source_format if it is one of them.')


def convert(config: ml_collections.ConfigDict, source: str, workdir: str,
            source_format: str = 'auto', step: int | None = None,
            log: Callable[[str], None] = print) -> str:
  """Converts `source` into a run of `config` in `workdir`; returns the checkpoint's directory.

  Args:
    config: the config the converted run is used with (the same overrides at every later use).
    source: the checkpoint file.
    workdir: a new run folder.
    source_format: one of FORMATS, or 'auto' to tell it from the file.
    step: the checkpoint's step; None means config.training.num_steps (a finished run).
    log: where the report of what was read goes.

  Raises:
    ConversionError: the file cannot be read or does not fit the config (nothing is written).
    ConfigError: the config itself is invalid.
  """
  config_utils.check_local_dir(workdir)
  workdir = os.path.abspath(workdir)
  common.check_workdir_free(workdir)
  name = detect_format(source) if source_format == 'auto' else source_format
  if name not in FORMATS:
    raise ConversionError(f'--source_format={name!r} is not one of auto, {", ".join(FORMATS)}.')
  built = []

  def network():
    # Built when a format has checked what the file says of the config (clearer advice first).
    if not built:
      built.append(experiment.build(config, workdir))
    return built[0].abstract_state.params, built[0].model.network
  converted = FORMATS[name].read(source, config, network)
  abstract, _ = network()
  exp = built[0]
  num_params, num_tensors = common.count(abstract)
  step = int(config.training.num_steps if step is None else step)
  meta = {'converted_from': os.path.abspath(source), 'source_format': name}
  if converted.source_step is not None:
    meta['source_step'] = converted.source_step
  path = common.write_run(exp, converted, step, meta)
  if jax.process_index() == 0:
    for line in converted.report:
      log(line)
    log(f'Wrote {workdir}: config.json and the checkpoint of step {step} ({path}): a {config.method} '
        f'run of {config.model.name} with {num_params:,} parameters in {num_tensors} tensors.')
  return path

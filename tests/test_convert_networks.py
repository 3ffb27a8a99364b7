"""The networks added for converted EDM and EDM2 checkpoints ('songunet', 'dhariwalunet', 'edm2'): their
parameter counts against the reference code's, and what they share with 'ncsnpp' and 'adm'.

Reference counts, from the reference code's own constructors (tests/fixtures/convert/make_fixtures.py's
checkouts, PyTorch on the meta device): EDM's ImageNet-64 DhariwalUNet 295,899,267 parameters in 541
tensors (as consistency_models' ImageNet-64 UNetModel); EDM2's img64 UNet S / M / L / XL 280,209,253 /
497,803,045 / 777,492,197 / 1,119,276,709 in 198 tensors, to which cm_jax adds the Fourier features'
frequencies and phases (EDM2 buffers, our params, as NCSN++'s W).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cm_jax.errors import ConfigError
from cm_jax.networks import get_network
from configs import default, imagenet64_edm


def _abstract(model_config, image_size: int, channels: int = 3):
  net = get_network(model_config, image_size, channels)
  x = jnp.zeros((1, image_size, image_size, channels))
  labels = jnp.zeros((1,), jnp.int32) if model_config.num_classes else None
  rngs = {'params': jax.random.key(0), 'dropout': jax.random.key(1)}
  return jax.eval_shape(lambda: net.init(rngs, x, jnp.zeros((1,)), labels))['params']


def _count(tree):
  leaves = jax.tree.leaves(tree)
  return sum(int(np.prod(leaf.shape)) for leaf in leaves), len(leaves)


def _shapes(tree):
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(path): leaf.shape for path, leaf in flat}


@pytest.mark.parametrize('nf, count', [(192, 280_209_253), (384, 1_119_276_709)])  # S and XL.
def test_edm2_img64_parameter_counts(nf, count):
  config = default.get_config().model
  config.update(dict(name='edm2', nf=nf, ch_mult=(1, 2, 3, 4), num_res_blocks=3,
                     attn_resolutions=(16, 8), num_head_channels=64, num_classes=1000))
  params = _abstract(config, 64)
  assert _count(params) == (count + 2 * nf, 198 + 2)


def test_dhariwalunet_is_adm_from_128_channels():
  config = imagenet64_edm.get_config().model
  adm = _abstract(config, 64)
  config.name = 'dhariwalunet'
  dhariwal = _abstract(config, 64)
  assert _shapes(dhariwal) == _shapes(adm) and _count(dhariwal) == (295_899_267, 541)
  # Below 64 channels EDM's DhariwalUNet has no attention heads, so no attention layer.
  config.update(dict(nf=16, ch_mult=(1, 2), attn_resolutions=(8,)))
  assert not [k for k in _shapes(_abstract(config, 16)) if 'attn' in k]


def test_songunet_differs_from_ncsnpp_only_in_its_label_table():
  config = default.get_config().model
  ncsnpp = _shapes(_abstract(config, 8, 1))
  config.name = 'songunet'
  assert _shapes(_abstract(config, 8, 1)) == ncsnpp
  config.num_classes = 10
  songunet = _shapes(_abstract(config, 8, 1))
  # The table maps labels to the 2 nf Fourier features (before the MLP), not to its 4 nf outputs.
  assert songunet.pop("['Embed_0']['embedding']") == (10, 2 * config.nf)
  assert songunet == ncsnpp


def test_variant_configs_are_checked():
  config = default.get_config().model
  config.update(dict(name='edm2', num_head_channels=-1))
  with pytest.raises(ConfigError, match="num_head_channels must be positive for 'edm2'"):
    get_network(config, 8, 1)
  config.update(dict(name='dhariwalunet', nf=6, ch_mult=(1, 2)))
  with pytest.raises(ConfigError, match='cannot split into 1 groups|cannot split'):
    get_network(config, 8, 1)

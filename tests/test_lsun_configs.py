"""The LSUN-256 configs: the reference's settings at full size, and each config built, sharded (FSDP
over 2 CPU devices) and trained for 2 steps at reduced size on mocked TFDS LSUN images."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from configs import lsun_bedroom256_cd, lsun_bedroom256_ct, lsun_bedroom256_edm
from tests import distributed_worker

# openai/consistency_models' UNetModel with the LSUN-256 arguments of scripts/launch.sh (script_util's
# create_model: image_size 256, num_channels 256, num_res_blocks 2, attention 32,16,8, 64-channel
# heads, no scale-shift norm, resblock_updown, unconditional), its parameters counted with torch.
REFERENCE_PARAMETERS = 526_304_771


def test_full_size_configs_are_the_reference_runs():
  assert lsun_bedroom256_edm.parameter_count(lsun_bedroom256_edm.get_config()) == REFERENCE_PARAMETERS
  edm, cd, ct = (m.get_config() for m in (lsun_bedroom256_edm, lsun_bedroom256_cd,
                                           lsun_bedroom256_ct))
  for config in (edm, cd, ct):
    assert (config.data.name, config.data.image_size, config.data.resize) == ('lsun/bedroom', 256, 'box')
    assert config.model.dtype == 'bfloat16' and config.training.batch_size == 256
    assert config.training.optimizer == 'radam' and config.noise.noise_cond_scale == 1000.0
  assert (edm.model.dropout, edm.training.lr, edm.sampling.num_steps) == (0.1, 1e-4, 40)
  c = cd.consistency
  assert (c.num_scales, c.target_ema, c.distance, cd.training.lr, cd.training.num_steps) == (
      40, 0.95, 'lpips', 1e-5, 600_000)
  assert tuple(cd.training.ema_decays) == (0.9999, 0.99994, 0.9999432189950708)
  assert tuple(cd.sampling.ts) == (0, 17, 39)
  c = ct.consistency
  assert (c.start_scales, c.end_scales, c.target_ema, c.scale_schedule, c.target_ema_schedule) == (
      2, 150, 0.95, 'ct', 'ct')
  assert (ct.training.lr, ct.training.num_steps, tuple(ct.sampling.ts)) == (5e-5, 1_000_000,
                                                                           (0, 67, 150))
  cat = lsun_bedroom256_ct.get_config('cat')
  assert cat.data.name == 'lsun/cat' and tuple(cat.sampling.ts) == (0, 62, 150)
  assert lsun_bedroom256_cd.get_config('cat').teacher.config.endswith('lsun_bedroom256_edm.py:cat')
  with pytest.raises(ValueError, match='bedroom'):
    lsun_bedroom256_edm.get_config('church')


_WORKER = textwrap.dedent("""
    import json, os, sys
    os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=2'
    os.environ['JAX_PLATFORMS'] = 'cpu'
    from unittest import mock
    import jax
    cache = os.environ.get('CM_JAX_TEST_XLA_CACHE')
    if cache:
      jax.config.update('jax_compilation_cache_dir', cache)
      jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)
    import tensorflow_datasets as tfds
    from cm_jax import sharding
    from cm_jax.evaluation import lpips
    from cm_jax.modes import train as train_mode
    from configs import lsun_bedroom256_cd, lsun_bedroom256_ct, lsun_bedroom256_edm
    from tests import distributed_worker
    root = sys.argv[1]
    sharding.FSDP_MIN_SIZE = 1  # Shard every leaf that divides: the reduced model is small.
    # LPIPS on the images as they are, as at full size (256x256 is not below 224, so never resized);
    # upsampling the reduced 32x32 images to 224x224 would multiply VGG's work by 49.
    # The upsampling itself is checked against the lpips package in test_lpips.
    lpips_at_any_size = lpips.lpips_distance
    lpips.lpips_distance = lambda *args, **kwargs: lpips_at_any_size(*args, resize_to=None, **kwargs)

    def reduced(config, category):
      m = config.model  # The LSUN ADM's structure (attention, 64-channel heads, up/down blocks) at 32x32.
      m.nf, m.ch_mult, m.num_res_blocks, m.attn_resolutions = 32, (1, 2), 1, (16,)
      config.data.image_size = 32
      config.data.data_dir = os.path.join(root, 'tfds')
      t = config.training
      t.batch_size, t.num_steps, t.log_every, t.checkpoint_every, t.sample_every = 2, 2, 1, 2, 0
      config.mesh.fsdp = 2
      if config.method == 'cd':
        config.consistency.num_scales = 8
        config.sampling.ts = (0, 4, 7)
      if config.method == 'ct':
        # LPIPS (a VGG, the slowest part on CPU) is exercised by the CD run; CT's distance goes
        # through the same code.
        config.consistency.distance = 'l2'
      config.teacher.workdir, config.teacher.config = os.path.join(root, 'edm_' + category), ''
      return config

    results = {}
    random_lpips = lambda: lpips.random_lpips_params(0)
    # Mock LSUN: random JPEGs of random sizes, center-cropped and resized by the pipeline.
    with tfds.testing.mock_data(num_examples=16), \\
        mock.patch.object(tfds.core.DatasetBuilder, 'is_prepared', return_value=True):
      for name, module in (('edm', lsun_bedroom256_edm), ('cd', lsun_bedroom256_cd),
                           ('ct', lsun_bedroom256_ct)):
        config = reduced(module.get_config('bedroom'), 'bedroom')
        out = train_mode.run(config, os.path.join(root, name + '_bedroom'), load_lpips=random_lpips,
                             final_samples=False)
        summary = distributed_worker.summary(out)
        summary['dtype'] = config.model.dtype
        results[name] = summary
    with open(os.path.join(root, 'out.json'), 'w') as f:
      json.dump(results, f)
""")


@pytest.mark.slow
def test_lsun_configs_build_shard_and_train_at_reduced_size(tmp_path):
  env = dict(os.environ)
  env.pop('XLA_FLAGS', None)
  import jax  # pylint: disable=g-import-not-at-top
  if jax.config.jax_compilation_cache_dir:
    env['CM_JAX_TEST_XLA_CACHE'] = jax.config.jax_compilation_cache_dir
  proc = subprocess.run([sys.executable, '-c', _WORKER, str(tmp_path)], cwd=distributed_worker.REPO,
                        env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  with open(tmp_path / 'out.json') as f:
    results = json.load(f)
  assert set(results) == {'edm', 'cd', 'ct'}
  for name, summary in results.items():
    assert summary['mesh'] == {'data': 1, 'fsdp': 2}, name
    assert [s for s, _ in summary['losses']] == [0, 1], name
    assert all(loss == loss and abs(loss) < 1e6 for _, loss in summary['losses']), name
    for item in ('params', 'opt_state', 'ema_params'):
      layout = summary[item]
      # Sharded over fsdp = 2: no device holds more than half of a sharded leaf; float32 state.
      assert layout['sharded'] >= layout['leaves'] // 2, (name, item, layout)
      assert layout['max_device_fraction_of_sharded'] == 0.5, (name, item, layout)
      assert layout['dtypes'] == ['float32'], (name, item, layout)
    assert summary['dtype'] == 'bfloat16'

"""cm_jax.convert: released checkpoint formats into run folders, proven by parity with the reference code.

Each fixture under tests/fixtures/convert/ is a tiny network's checkpoint in its source's own format,
written by the source's own code, with that code's outputs on fixed inputs (make_fixtures.py there).
A test converts it into a run folder with `cm_jax.convert.convert`, restores the run as
`--mode=sample` does (`cm_jax.inference.restore`), and compares our denoiser D(x, sigma) and, for
consistency-model sources, consistency function f(x, sigma) with the reference's, at sigma from 0.002
to 80.

Tolerance: 2e-5 absolute on outputs of magnitude about 1 (1.9 at most). Both sides compute in
float32 with the same weights; they differ only in the order of floating-point sums (convolutions,
GroupNorm statistics, attention, FIR filters done as strided slices here and as convolutions there),
each about 1e-7 relative, over some 30 layers. Measured: at most 3.0e-6 (README lists each). What
a wrong mapping does, measured on these fixtures: q and k swapped in one attention layer 2e-3 (ADM,
whose tiny random attention is nearly uniform) to 2e-2 (NCSN++), a 3x3 kernel transposed or flipped
0.6-0.8, two decoder blocks swapped 0.7: all at least 100 times the tolerance.
"""

import os
import pickle
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from cm_jax import checkpointing, convert, inference
from cm_jax.convert import common, edm, torch_pickle
from cm_jax.errors import ConversionError, USER_ERRORS
from cm_jax.networks import adm
from configs import default, digits_edm
from tests import tiny

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures', 'convert')
TOLERANCE = 2e-5


def _fixture(name: str) -> str:
  return os.path.join(FIXTURES, name)


def _config(method: str, num_channels: int = 3, noise_cond_scale: float = 1.0,
            **model) -> ml_collections.ConfigDict:
  config = default.get_config()
  config.method = method
  config.data.image_size, config.data.num_channels = 8, num_channels
  config.model.update(model)
  config.noise.noise_cond_scale = noise_cond_scale
  config.training.ema_decays = (0.9999, 0.999)
  config.training.num_steps = 20
  if method == 'cd':
    config.teacher.workdir = '/nonexistent/teacher'  # Never loaded: inference needs no teacher.
  return config


_NCSNPP = dict(nf=4, ch_mult=(1, 1), num_res_blocks=1, attn_resolutions=(4,))
_ADM = dict(name='adm', nf=32, ch_mult=(1, 1), num_res_blocks=1, num_head_channels=16,
            resblock_updown=True, use_new_attention_order=True)
CASES = {
    # fixture: (config, outputs to compare: D only for EDM networks, D and f for consistency models)
    'cm_cifar10_ct_tiny': (
        lambda: _config('ct', **_NCSNPP), 'cm_cifar10_ct_tiny.msgpack', ('D', 'f')),
    'cm_imagenet64_tiny': (
        lambda: _config('cd', noise_cond_scale=1000.0, num_classes=5, use_scale_shift_norm=True,
                        attn_resolutions=(4,), **_ADM), 'cm_imagenet64_tiny.pt', ('D', 'f')),
    'cm_lsun256_tiny': (
        lambda: _config('ct', noise_cond_scale=1000.0, num_classes=0, use_scale_shift_norm=False,
                        attn_resolutions=(8, 4), **_ADM), 'cm_lsun256_tiny.pt', ('D', 'f')),
    'edm_ncsnpp_tiny': (  # A digits NCSN++ with two levels and attention at 4x4.
        lambda: _config('edm', num_channels=1, **dict(_NCSNPP, nf=8, ch_mult=(1, 2), dropout=0.13)),
        'edm_ncsnpp_tiny.pkl', ('D',)),
    'edm_ddpmpp_cond_tiny': (
        lambda: _config('edm', name='songunet', num_classes=3, embedding_type='positional',
                        progressive_input='none', fir_kernel=(1, 1), **_NCSNPP),
        'edm_ddpmpp_cond_tiny.pkl', ('D',)),
    'edm_adm_cond_tiny': (
        lambda: _config('edm', name='dhariwalunet', nf=8, ch_mult=(1, 1), num_res_blocks=1,
                        attn_resolutions=(4,), num_classes=3, num_head_channels=64,
                        use_scale_shift_norm=True, resblock_updown=True),
        'edm_adm_cond_tiny.pkl', ('D',)),
    'edm2_img64_tiny': (
        lambda: _config('edm', name='edm2', nf=8, ch_mult=(1, 1), num_res_blocks=1,
                        attn_resolutions=(8, 4), num_classes=3, num_head_channels=4),
        'edm2_img64_tiny.pkl', ('D',)),
}


def _outputs(run, params, ref) -> dict[str, np.ndarray]:
  """Our D and f on the fixture's inputs, with `params` of the restored run."""
  model = run.exp.model
  labels = jnp.asarray(ref['labels']) if run.exp.config.model.num_classes else None
  both = jax.jit(lambda p, x, s: (model.denoise(p, x, s, labels), model.consistency(p, x, s, labels)))
  args = (params, jnp.asarray(ref['x']), jnp.asarray(ref['sigmas']))
  # Compiled once per network: unoptimised, as cm_jax compiles one-off programs on CPU (faster).
  d, f = both.lower(*args).compile({'xla_backend_optimization_level': 0})(*args)
  return {'D': np.asarray(d), 'f': np.asarray(f)}


def _max_error(ours: np.ndarray, theirs: np.ndarray) -> float:
  assert ours.shape == theirs.shape
  return float(np.abs(ours - theirs).max())


@pytest.mark.parametrize('name', list(CASES))
def test_converted_run_computes_what_the_reference_computed(name, tmp_path):
  make_config, source, keys = CASES[name]
  config = make_config()
  lines = []
  convert.convert(config, _fixture(source), str(tmp_path / 'run'), log=lines.append)
  assert any(line.startswith('Read ') and 'parameters' in line for line in lines)
  assert any(line.startswith('EMA chosen') for line in lines)
  run = inference.restore(config, str(tmp_path / 'run'))  # As --mode=sample restores a run.
  assert run.step == config.training.num_steps and len(run.state.ema_params) == 2
  ref = np.load(_fixture(name + '.npz'))
  copies = {'': run.state.ema_params[1]}
  if name.startswith('cm_cifar10'):
    # A consistency_models_cifar10 State holds three weight sets: the EMA (sampled), the online
    # params (resumed) and the target network, each where cm_jax keeps it.
    ckpt = checkpointing.Checkpointer(str(tmp_path / 'run' / 'checkpoints'), read_only=True)
    abstract = checkpointing.with_shardings(run.exp.abstract_state, run.exp.state_shardings)
    extra = ckpt.restore_items(run.step, {'extra': abstract.extra})['extra']
    assert ckpt.restore_meta(run.step)['source_step'] == 800_000
    ckpt.close()
    copies = {'_params_ema': run.state.ema_params[1], '_params': run.state.params,
              '_target_params': extra['target_params']}
    assert _max_error(ref['f_params'], ref['f_params_ema']) > 0.1  # The three sets differ.
  for suffix, params in copies.items():
    ours = _outputs(run, params, ref)
    for key in keys:
      error = _max_error(ours[key], ref[key + suffix])
      assert error < TOLERANCE, (name, key + suffix, error)
      assert np.abs(ref[key + suffix]).max() > 0.5  # Outputs that a wrong mapping would change.


def test_edm_adm_block_with_two_heads_matches_edm():
  """DhariwalUNet's attention below 64 channels has no heads, so the tiny network has none: one of
  EDM's UNetBlocks with 2 heads of 8 channels checks its per-head (channel, q/k/v) interleave."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  _, block = edm.load_snapshot(_fixture('edm_adm_block.pkl'))
  ref = np.load(_fixture('edm_adm_block.npz'))

  class ResAttn(nn.Module):
    new_order: bool

    @nn.compact
    def __call__(self, x, emb):
      h = adm.ResBlock(16, use_scale_shift_norm=True, edm_groups=True, name='res')(x, emb, False)
      return adm.AttentionBlock(2, self.new_order, edm_groups=True, name='attn')(h)

  tensors = torch_pickle.state_dict(block, 'b.')
  for new_order in (True, False):
    net = ResAttn(new_order)
    abstract = jax.eval_shape(lambda: net.init(jax.random.key(0), ref['x'], ref['emb']))['params']
    layout = 'split_first' if new_order else 'heads_first'
    rules = {('res',) + p: r for p, r in edm.sub_rules(abstract['res'], 'b', {
        'in_norm': 'norm0', 'in_conv': 'conv0', 'emb_proj': 'affine', 'out_norm': 'norm1',
        'out_conv': 'conv1', 'skip': 'skip'}).items()}
    rules.update({('attn',) + p: r for p, r in edm.attention_rules(abstract['attn'], 'b', 2,
                                                                    layout).items()})
    params = common.build_params(abstract, rules, tensors, {'b.conv0.resample_filter': '',
                                                            'b.skip.resample_filter': ''},
                                 'edm_adm_block.pkl', 'the test block')
    out = jax.jit(net.apply)({'params': params}, ref['x'], ref['emb'])
    assert _max_error(np.asarray(out), ref['out']) < TOLERANCE


# ---------------------------------------------------------------------------------------------------
# Refusals: before anything is written, naming what differs.


def test_a_config_of_another_width_is_refused_with_the_override(tmp_path):
  config = CASES['cm_imagenet64_tiny'][0]()
  config.model.nf = 64
  with pytest.raises(ConversionError, match=r'model.nf=64 \(the file: 32\).*--config.model.nf=32'):
    convert.convert(config, _fixture('cm_imagenet64_tiny.pt'), str(tmp_path / 'run'))
  assert not os.path.exists(tmp_path / 'run')


def test_a_mismatch_only_the_tensors_show_names_the_first_tensor(tmp_path):
  config = CASES['cm_imagenet64_tiny'][0]()
  config.model.num_res_blocks = 2  # Nothing in the file's shapes says how many blocks a level has.
  # Level 0 then has two blocks: the file's second (its downsampling block) fits our enc_2_res, and
  # the first tensor without a place is the attention of the file's enc_3 at 4x4.
  with pytest.raises(ConversionError, match=r'its tensor input_blocks\.3\.1\.norm\.weight \(32,\) '
                                            r'has no place in config.model \(ADM nf=32'):
    convert.convert(config, _fixture('cm_imagenet64_tiny.pt'), str(tmp_path / 'run'))
  assert not os.path.exists(tmp_path / 'run')


def test_edm_refusals_say_which_network_to_use(tmp_path):
  config = CASES['edm_adm_cond_tiny'][0]()
  config.model.name = 'adm'  # Its 8-channel GroupNorms have 2 groups in EDM, 32 in 'adm'.
  with pytest.raises(ConversionError, match="model.name='adm'.*--config.model.name=dhariwalunet"):
    convert.convert(config, _fixture('edm_adm_cond_tiny.pkl'), str(tmp_path / 'run'))
  config = CASES['edm_ddpmpp_cond_tiny'][0]()
  config.noise.noise_cond_scale = 1000.0
  with pytest.raises(ConversionError, match='noise.noise_cond_scale=1000.0 .the file: 1.0.'):
    convert.convert(config, _fixture('edm_ddpmpp_cond_tiny.pkl'), str(tmp_path / 'run'))
  assert not os.path.exists(tmp_path / 'run')


def test_formats_are_told_apart():
  assert {name: convert.detect_format(_fixture(source)) for name, (_, source, _) in CASES.items()} == {
      'cm_cifar10_ct_tiny': 'cm_cifar10', 'cm_imagenet64_tiny': 'cm_pytorch',
      'cm_lsun256_tiny': 'cm_pytorch', 'edm_ncsnpp_tiny': 'edm', 'edm_ddpmpp_cond_tiny': 'edm',
      'edm_adm_cond_tiny': 'edm', 'edm2_img64_tiny': 'edm2'}
  assert ConversionError in USER_ERRORS


# ---------------------------------------------------------------------------------------------------
# Reading PyTorch files without PyTorch.


def test_torch_files_read_as_torch_reads_them(tmp_path):
  import torch  # pylint: disable=g-import-not-at-top
  ours = torch_pickle.load(_fixture('cm_imagenet64_tiny.pt'))
  theirs = torch.load(_fixture('cm_imagenet64_tiny.pt'), map_location='cpu')
  assert list(ours) == list(theirs)
  assert all(np.array_equal(ours[k], theirs[k].numpy()) for k in theirs)
  # Views, transposes, float16, bfloat16 and integers; the zip and the legacy layouts.
  base = torch.randn(64, generator=torch.Generator().manual_seed(0))
  state = {'t': torch.randn(3, 5).t(), 'view': base[7:27].view(4, 5), 'half': base[:6].half(),
           'bf16': base[:6].bfloat16(), 'int': torch.arange(5), 'scalar': torch.tensor(2.5)}
  for legacy in (False, True):
    path = str(tmp_path / f'state_{legacy}.pt')
    torch.save(state, path, _use_new_zipfile_serialization=not legacy)
    loaded = torch_pickle.load(path)
    for key, value in state.items():
      expected = value.float().numpy() if value.dtype == torch.bfloat16 else value.numpy()
      assert loaded[key].dtype == expected.dtype and np.array_equal(loaded[key], expected), key


class _Unsafe:
  def __reduce__(self):
    return (os.system, ('echo unsafe',))


def test_the_unpickler_refuses_what_it_does_not_know(tmp_path):
  path = tmp_path / 'unsafe.pkl'
  path.write_bytes(pickle.dumps({'ema': _Unsafe()}))
  with pytest.raises(ConversionError, match='refusing to load (posix|os|nt).system'):
    torch_pickle.load(str(path))
  with pytest.raises(ConversionError, match='does not exist'):
    torch_pickle.load(str(tmp_path / 'missing.pkl'))


def test_edm_pickle_records_and_state_dict():
  snapshot, network = edm.load_snapshot(_fixture('edm_ncsnpp_tiny.pkl'))
  assert network.class_name == 'EDMPrecond' and snapshot['loss_fn'].class_name == 'EDMLoss'
  assert network.init_kwargs['model_type'] == 'SongUNet'
  tensors = torch_pickle.state_dict(network)
  assert list(tensors)[:2] == ['model.map_noise.freqs', 'model.map_augment.weight']
  assert tensors['model.map_noise.freqs'].shape == (8,)  # nf Fourier frequencies (a buffer).
  # The resampling filter buffers are outer([1, 3, 3, 1]) / 64.
  np.testing.assert_allclose(tensors['model.enc.4x4_down.conv0.resample_filter'][0, 0],
                             np.outer([1, 3, 3, 1], [1, 3, 3, 1]) / 64)


def test_qkv_layouts_are_permutations_of_each_other():
  rows = np.arange(3 * 12)
  for a in ('split_first', 'heads_first', 'interleaved'):
    for b in ('split_first', 'heads_first', 'interleaved'):
      there = common.reorder_qkv(rows, a, b, heads=3)
      assert sorted(there) == list(rows)
      np.testing.assert_array_equal(common.reorder_qkv(there, b, a, heads=3), rows)
  # q of head 1, channel 2 (4 channels a head): row 6 split first, 14 heads first, 18 interleaved.
  assert [common.qkv_rows(layout, 3, 4)[0, 1, 2]
          for layout in ('split_first', 'heads_first', 'interleaved')] == [6, 14, 18]


# ---------------------------------------------------------------------------------------------------
# A converted EDM network as the teacher of a CD run, end to end.


def test_cd_distils_a_converted_edm_teacher(tmp_path, digits_data_dir):
  teacher_dir = str(tmp_path / 'teacher')
  convert.convert(tiny.fixture_network(tiny.edm_config(digits_data_dir)),
                  _fixture('edm_ncsnpp_tiny.pkl'), teacher_dir, log=lambda line: None)
  config = tiny.fixture_network(tiny.cd_config(digits_data_dir, teacher_dir, steps=3))
  out = tiny.train(config, str(tmp_path / 'cd'))  # cm_jax.modes.train.run, without final samples.
  assert out.step == 3 and len(out.losses) == 3
  assert all(np.isfinite(loss) and loss > 0 for _, loss in out.losses)
  # The teacher the CD run loaded (cm_jax.teacher) computes what EDM computed.
  ref = np.load(_fixture('edm_ncsnpp_tiny.npz'))
  teacher_out = jax.jit(out.exp.model.denoise)(out.frozen['teacher_params'], jnp.asarray(ref['x']),
                                               jnp.asarray(ref['sigmas']))
  assert _max_error(np.asarray(teacher_out), ref['D']) < TOLERANCE


def test_a_converted_run_resumes_training(tmp_path, digits_data_dir):
  """Written at step 1 of 2, `--mode=train` resumes it: its optimizer state and EMA copies restore."""
  config = tiny.fixture_network(tiny.edm_config(digits_data_dir, steps=2))
  convert.convert(config, _fixture('edm_ncsnpp_tiny.pkl'), str(tmp_path / 'run'), step=1,
                  log=lambda line: None)
  out = tiny.train(tiny.fixture_network(tiny.edm_config(digits_data_dir, steps=2)),
                   str(tmp_path / 'run'))
  assert out.step == 2 and [step for step, _ in out.losses] == [1]
  assert np.isfinite(out.losses[0][1])


def test_the_command_line_converts(tmp_path):
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  command = (f'{sys.executable} -m cm_jax.convert --source={_fixture("edm_ncsnpp_tiny.pkl")} '
             f'--config=configs/digits_edm.py --workdir={tmp_path / "run"} --config.model.nf=8 '
             # The fixture is EDM's NCSN++ layout (BigGAN blocks, FIR, attention at 4x4), not the
             # digits network's: the overrides the converter's error asks for.
             '--config.model.attn_resolutions="(4,)" --config.model.resblock_type=biggan '
             '--config.model.fir=True')
  result = subprocess.run(command, shell=True, cwd=root, capture_output=True, text=True, timeout=300,
                          check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  assert 'EDMPrecond(sigma_data=0.5) around an EDM SongUNet' in result.stdout
  assert os.path.isdir(tmp_path / 'run' / 'checkpoints' / str(digits_edm.get_config().training.num_steps))
  # Again into the same folder: refused, with the reason, and the run left as it was.
  again = subprocess.run(command, shell=True, cwd=root, capture_output=True, text=True, timeout=300,
                         check=False)
  assert again.returncode != 0 and 'ConversionError' in again.stderr
  assert 'already holds a run' in again.stderr

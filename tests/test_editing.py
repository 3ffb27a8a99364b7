"""Zero-shot editing (CM Alg. 4): exact known components, Gaussian closed forms, inputs and errors."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from cm_jax import edit_tasks, editing, karras, sampling
from cm_jax.modes import edit as edit_mode
from cm_jax.errors import ConfigError
from tests import gaussian

MU, S0, EPS, T = 0.3, 0.5, 0.002, 80.0
SIGMAS = [T, 2.0, 0.5, 0.1]


def exact_f():
  return gaussian.consistency_function(MU, S0, EPS)


def wild_f(x, sigma):
  """A nonlinear stand-in for a network that mixes pixels and channels: nothing is kept by chance."""
  s = karras.bcast(sigma, x)
  return jnp.tanh(x / s + jnp.roll(x, 1, axis=1) - jnp.mean(x, axis=-1, keepdims=True)) * 1.5


def references(shape, seed=0):
  return jax.random.uniform(jax.random.PRNGKey(seed), shape, minval=-1.0, maxval=1.0)


# --------------------------------------------------------------------------------------------------
# The bases of Alg. 4.
# --------------------------------------------------------------------------------------------------
def test_luminance_basis():
  q = editing.luminance_basis()
  np.testing.assert_allclose(q.T @ q, np.eye(3), atol=1e-6)
  w = np.array([0.2989, 0.5870, 0.1140])
  np.testing.assert_allclose(q[:, 0], w / np.linalg.norm(w), atol=1e-6)


@pytest.mark.parametrize('factor', [2, 4, 8])
def test_patch_basis(factor):
  q = editing.patch_basis(factor)
  np.testing.assert_allclose(q.T @ q, np.eye(factor ** 2), atol=1e-5)
  np.testing.assert_allclose(q[:, 0], np.full(factor ** 2, 1.0 / factor), atol=1e-6)


def test_components_are_orthogonal_projections():
  x, y = references((3, 8, 8, 3), 1), references((3, 8, 8, 3), 2)
  for components in (editing.colorization_components(), editing.superres_components(2),
                     editing.superres_components(4),
                     editing.inpainting_components(editing.named_mask('center', 8))):
    np.testing.assert_allclose(components.from_basis(components.to_basis(x)), x, atol=1e-5)
    merged = components.merge(y, x)
    np.testing.assert_allclose(components.merge(y, merged), merged, atol=1e-5)  # Idempotent.
    # What it keeps of y and what of x are orthogonal: |merge|^2 = |P y|^2 + |(I - P) x|^2.
    kept, rest = components.observe(y), x - components.observe(x)
    np.testing.assert_allclose(jnp.sum(merged ** 2), jnp.sum(kept ** 2) + jnp.sum(rest ** 2), rtol=1e-4)


def test_superres_observation_is_nearest_upsampling_of_patch_means():
  y = references((2, 8, 8, 1))
  np.testing.assert_allclose(editing.superres_components(2).observe(y), editing.patch_means(np.asarray(y), 2),
                             atol=1e-6)


# --------------------------------------------------------------------------------------------------
# Each task keeps the reference's known components exactly at its last step.
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('clip', [False, True])
def test_inpainting_keeps_the_known_pixels_exactly(clip):
  y = references((4, 8, 8, 1))
  mask = editing.named_mask('lower_half', 8)
  out = np.asarray(editing.inpaint(wild_f, jax.random.PRNGKey(0), y, mask, SIGMAS, EPS, clip))
  known = np.broadcast_to(mask[None, :, :, None] == 0, out.shape)
  np.testing.assert_array_equal(out[known], np.asarray(y)[known])
  assert np.abs(out[~known] - np.asarray(y)[~known]).mean() > 0.1  # The hole is generated.


@pytest.mark.parametrize('clip', [False, True])
def test_colorization_keeps_the_luminance_exactly(clip):
  y = references((4, 8, 8, 3))
  out = np.asarray(editing.colorize(wild_f, jax.random.PRNGKey(0), y, SIGMAS, EPS, clip))
  np.testing.assert_allclose(editing.luminance(out), editing.luminance(np.asarray(y)), atol=2e-6)
  assert np.abs(out - np.asarray(y)).mean() > 0.1


@pytest.mark.parametrize('shape,factor', [((4, 8, 8, 1), 2), ((2, 16, 16, 3), 4)])
def test_superres_keeps_the_patch_means_exactly(shape, factor):
  y = np.asarray(references(shape))
  out = np.asarray(editing.super_resolve(wild_f, jax.random.PRNGKey(0), jnp.asarray(y), factor, SIGMAS,
                                         EPS, clip_denoised=True))
  np.testing.assert_allclose(editing.patch_means(out, factor), editing.patch_means(y, factor), atol=2e-6)
  assert np.abs(out - y).mean() > 0.1
  # clip_denoised also brings the result into the image range, so saving it keeps the means too.
  assert np.abs(out).max() <= 1.0 + 1e-5


def test_unknown_components_follow_the_gaussian_exactly():
  # Pixels (and channels) of this Gaussian are independent and the exact f acts on each alike, so
  # Alg. 4 samples the unknown components from their marginal: mean MU (Q^T 1), std sqrt(S0^2 + eps^2).
  shape = (2048, 8, 8, 3)
  y = jnp.full(shape, -0.9)  # Far from MU: leaking reference values into the unknowns would show.
  std = np.sqrt(S0 ** 2 + EPS ** 2)
  key = jax.random.PRNGKey(1)
  mask = editing.named_mask('lower_half', 8)
  hole = np.asarray(editing.inpaint(exact_f(), key, y, mask, SIGMAS, EPS))[:, 4:]
  assert hole.mean() == pytest.approx(MU, abs=0.01) and hole.std() == pytest.approx(std, rel=0.01)
  q = editing.luminance_basis()
  coeffs = np.asarray(editing.colorize(exact_f(), key, y, SIGMAS, EPS)) @ q
  for k in (1, 2):
    assert coeffs[..., k].mean() == pytest.approx(MU * q[:, k].sum(), abs=0.01)
    assert coeffs[..., k].std() == pytest.approx(std, rel=0.01)
  out = np.asarray(editing.super_resolve(exact_f(), key, y, 2, SIGMAS, EPS))
  detail = out - editing.patch_means(out, 2)  # The non-constant part of each patch: mean-free.
  assert abs(detail.mean()) < 0.005
  assert detail.std() == pytest.approx(std * np.sqrt(3 / 4), rel=0.01)  # 3 of 4 dimensions.


def test_stroke_and_denoising_start_from_the_input():
  x = references((4, 8, 8, 1))
  key = jax.random.PRNGKey(2)
  # Denoising with no later level is one step from the input at its own noise level.
  np.testing.assert_array_equal(editing.denoise(wild_f, key, x, 0.4, EPS),
                                wild_f(x, jnp.full((4,), 0.4)))
  # Stroke-guided: the strokes noised to sigmas[0], then Alg. 1 from there.
  out = editing.stroke_guided(wild_f, key, x, [3.0, 0.5], EPS)
  keys = jax.random.split(key, 2)
  start = x + 3.0 * jax.random.normal(keys[0], x.shape)
  expected = sampling.consistency_steps(wild_f, keys[1:], start, [3.0, 0.5], EPS)
  np.testing.assert_array_equal(out, expected)
  with pytest.raises(ConfigError, match='decrease strictly'):
    editing.denoise(wild_f, key, x, 0.4, EPS, later_sigmas=[0.5])


def test_denoising_exact_for_gaussian_data():
  key = jax.random.PRNGKey(3)
  clean = MU + S0 * jax.random.normal(key, (4096, 4, 4, 1))
  noisy = clean + 0.4 * jax.random.normal(jax.random.PRNGKey(4), clean.shape)
  out = np.asarray(editing.denoise(exact_f(), key, noisy, 0.4, EPS))
  # The PF-ODE maps N(MU, S0^2 + 0.4^2) onto N(MU, S0^2 + eps^2): out = MU + r (noisy - MU), so
  # out - clean = (r - 1)(clean - MU) + r 0.4 n has variance (1 - r)^2 S0^2 + r^2 0.4^2.
  r = np.sqrt(S0 ** 2 + EPS ** 2) / np.sqrt(S0 ** 2 + 0.4 ** 2)
  assert out.std() == pytest.approx(np.sqrt(S0 ** 2 + EPS ** 2), rel=0.01)
  rmse = np.sqrt(np.mean((out - np.asarray(clean)) ** 2))
  assert rmse == pytest.approx(np.sqrt((1 - r) ** 2 * S0 ** 2 + r ** 2 * 0.4 ** 2), rel=0.01)
  assert rmse < 0.85 * np.sqrt(np.mean((np.asarray(noisy) - np.asarray(clean)) ** 2))


def test_slerp_and_interpolation_endpoints():
  za, zb = jax.random.normal(jax.random.PRNGKey(5), (2, 3, 8, 8, 1))
  path = editing.slerp(za, zb, jnp.linspace(0, 1, 5))
  assert path.shape == (3, 5, 8, 8, 1)
  np.testing.assert_allclose(path[:, 0], za, atol=1e-5)
  np.testing.assert_allclose(path[:, -1], zb, atol=1e-5)
  # Orthogonal equal-norm noises: the midpoint is (za + zb) / sqrt(2) and every norm is kept.
  e0, e1 = jnp.zeros((1, 4)).at[0, 0].set(2.0), jnp.zeros((1, 4)).at[0, 1].set(2.0)
  mid = editing.slerp(e0, e1, jnp.array([0.25, 0.5]))
  np.testing.assert_allclose(mid[0, 1], (e0[0] + e1[0]) / np.sqrt(2), atol=1e-6)
  np.testing.assert_allclose(jnp.linalg.norm(mid[0], axis=-1), [2.0, 2.0], atol=1e-5)
  out = editing.interpolate(wild_f, jax.random.PRNGKey(6), za, zb, 5, [T], EPS)
  np.testing.assert_allclose(out[:, 0], wild_f(T * za, jnp.full((3,), T)), atol=1e-5)
  np.testing.assert_allclose(out[:, -1], wild_f(T * zb, jnp.full((3,), T)), atol=1e-5)
  # Multistep: each endpoint is Alg. 1 with its own later noise.
  out = editing.interpolate(wild_f, jax.random.PRNGKey(6), za, zb, 3, [T, 1.0], EPS)
  key_a, key_b = jax.random.split(jax.random.split(jax.random.PRNGKey(6), 1)[0])
  step_a, step_b = jax.random.normal(key_a, za.shape), jax.random.normal(key_b, za.shape)
  for z, step, end in ((za, step_a, 0), (zb, step_b, -1)):
    x = wild_f(T * z, jnp.full((3,), T))
    expected = wild_f(x + np.sqrt(1.0 - EPS ** 2) * step, jnp.full((3,), 1.0))
    np.testing.assert_allclose(out[:, end], expected, atol=1e-5)


def test_interpolation_rows_do_not_depend_on_padding_rows():
  # Batches are padded to a multiple of the devices: a row's noise must not depend on the padding.
  za, zb = jax.random.normal(jax.random.PRNGKey(5), (2, 8, 8, 8, 1))
  full = editing.interpolate(wild_f, jax.random.PRNGKey(6), za, zb, 3, [T, 1.0, 0.3], EPS)
  part = editing.interpolate(wild_f, jax.random.PRNGKey(6), za[:6], zb[:6], 3, [T, 1.0, 0.3], EPS)
  np.testing.assert_allclose(part, full[:6], atol=1e-6)


def test_colorization_of_grey_images_says_it_needs_three_channels():
  with pytest.raises(ConfigError, match='3 channels'):
    editing.colorize(wild_f, jax.random.PRNGKey(0), references((2, 8, 8, 1)), SIGMAS, EPS)
  with pytest.raises(ConfigError, match='divide the image size'):
    editing.super_resolve(wild_f, jax.random.PRNGKey(0), references((2, 8, 8, 1)), 3, SIGMAS, EPS)


def test_editors_are_jittable():
  # Masks and references may be traced; the time points and factors are static.
  y = references((2, 8, 8, 3))
  mask = jnp.asarray(editing.named_mask('center', 8))
  key = jax.random.PRNGKey(0)
  fn = jax.jit(lambda key, y, mask: (editing.inpaint(wild_f, key, y, mask, [T, 0.5], EPS),
                                     editing.super_resolve(wild_f, key, y, 2, [T, 0.5], EPS, True)))
  inpainted, upsampled = fn(key, y, mask)
  np.testing.assert_allclose(inpainted, editing.inpaint(wild_f, key, y, mask, [T, 0.5], EPS), atol=1e-5)
  np.testing.assert_allclose(upsampled, editing.super_resolve(wild_f, key, y, 2, [T, 0.5], EPS, True),
                             atol=1e-5)


# --------------------------------------------------------------------------------------------------
# Baselines and errors.
# --------------------------------------------------------------------------------------------------
def test_baselines_and_region_error():
  images = np.zeros((1, 2, 2, 1), np.float32)
  images[0, :, :, 0] = [[-1.0, 1.0], [0.5, 0.5]]
  mask = np.array([[0, 0], [1, 1]], np.float32)
  filled = editing.mean_fill(images, mask)
  np.testing.assert_allclose(filled[0, 1, :, 0], [0.0, 0.0])  # The mean of the known row.
  np.testing.assert_allclose(filled[0, 0, :, 0], [-1.0, 1.0])
  # Error on [0, 1] intensities over the hole only: |0.5 - 0| / 2 = 0.25.
  assert editing.region_rmse(filled, images, mask) == pytest.approx(0.25)
  assert editing.region_rmse(filled, images) == pytest.approx(np.sqrt(2 * 0.25 ** 2 / 4))
  np.testing.assert_allclose(editing.patch_means(images, 2), np.full((1, 2, 2, 1), 0.25))
  assert editing.luminance(np.ones((1, 1, 1, 3))) == pytest.approx(0.9999)


def test_named_masks():
  assert editing.named_mask('lower_half', 8)[4:].all() and not editing.named_mask('lower_half', 8)[:4].any()
  center, border = editing.named_mask('center', 8), editing.named_mask('border', 8)
  np.testing.assert_array_equal(center + border, np.ones((8, 8)))
  assert center.sum() == 16
  with pytest.raises(ConfigError, match='named mask'):
    editing.named_mask('triangle', 8)


# --------------------------------------------------------------------------------------------------
# Command-line inputs: files, masks, checks before anything is restored.
# --------------------------------------------------------------------------------------------------
def _save(path, array):
  Image.fromarray(array).save(path)
  return str(path)


def test_image_files_of_the_wrong_size_or_channels(tmp_path):
  grey8 = _save(tmp_path / 'a.png', np.full((8, 8), 200, np.uint8))
  rgb8 = _save(tmp_path / 'b.png', np.full((8, 8, 3), 100, np.uint8))
  grey16 = _save(tmp_path / 'c.png', np.full((16, 16), 50, np.uint8))
  assert edit_tasks.load_image_files(grey8, 8, 1).shape == (1, 8, 8, 1)
  with pytest.raises(ConfigError, match='is 16x16; this run edits 8x8.*edit.resize=True'):
    edit_tasks.load_image_files(grey16, 8, 1)
  assert edit_tasks.load_image_files(grey16, 8, 1, resize=True).shape == (1, 8, 8, 1)
  with pytest.raises(ConfigError, match='3 channel.*1-channel.*edit.resize=True'):
    edit_tasks.load_image_files(rgb8, 8, 1)
  converted = edit_tasks.load_image_files(rgb8, 8, 1, resize=True)
  assert converted.shape == (1, 8, 8, 1) and converted[0, 0, 0, 0] == 100
  # Colorization takes grey files as R = G = B; super-resolution takes low-resolution files.
  np.testing.assert_array_equal(edit_tasks.load_image_files(grey8, 8, 3, accept_grey=True)[0, 0, 0],
                                [200, 200, 200])
  assert edit_tasks.load_image_files(grey8, 16, 1, accept_sizes=(8,)).shape == (1, 8, 8, 1)
  with pytest.raises(ConfigError, match='does not exist'):
    edit_tasks.load_image_files(str(tmp_path / 'missing.png'), 8, 1)
  os.makedirs(tmp_path / 'empty')
  with pytest.raises(ConfigError, match='no image files'):
    edit_tasks.load_image_files(str(tmp_path / 'empty'), 8, 1)


def test_mask_files(tmp_path):
  square = np.zeros((8, 8), np.uint8)
  square[2:5, 3:6] = 255
  path = _save(tmp_path / 'mask.png', square)
  np.testing.assert_array_equal(edit_tasks.load_mask(path, 8), square / 255)
  np.testing.assert_array_equal(edit_tasks.load_mask('upper_half', 8), editing.named_mask('upper_half', 8))
  with pytest.raises(ConfigError, match='is 8x8.*16x16.*edit.resize=True'):
    edit_tasks.load_mask(path, 16)
  assert edit_tasks.load_mask(path, 16, resize=True).sum() == 4 * square.astype(bool).sum()
  with pytest.raises(ConfigError, match='no white pixel'):
    edit_tasks.load_mask(_save(tmp_path / 'black.png', np.zeros((8, 8), np.uint8)), 8)
  with pytest.raises(ConfigError, match='neither a named mask'):
    edit_tasks.load_mask('nowhere.png', 8)


def test_default_edit_time_points():
  from configs import digits_cd
  config = digits_cd.get_config()
  sigmas = edit_tasks.edit_sigmas(config)
  grid = sampling.sigmas_from_indices(range(18), 18, config.noise)
  assert sigmas == pytest.approx(grid[:17])  # Every level but eps (which costs nothing).
  config.edit.task = 'interpolation'
  assert edit_tasks.edit_sigmas(config) == [80.0]  # One-step samples of the slerped noise.
  config.edit.ts = (0, 11, 17)
  assert edit_tasks.edit_sigmas(config) == pytest.approx(grid[:12:11])  # The trailing eps is free.
  config.edit.sigmas = (10.0, 1.0)
  assert edit_tasks.edit_sigmas(config) == [10.0, 1.0]


@pytest.mark.parametrize('overrides,match', [
    (dict(task='colorization'), 'Colorization needs RGB images.*3 channels.*1-channel'),
    (dict(task='superres', superres_factor=3), 'superres_factor=3 must be >= 2 and divide'),
    (dict(task='warp'), "edit.task='warp' is not one of 'inpainting', 'colorization'"),
    (dict(task='inpainting', mask='nowhere.png'), 'neither a named mask'),
    (dict(task='interpolation', interpolation_points=1), 'interpolation_points=1'),
    (dict(task='denoising', noise_sigma=0.0), 'noise_sigma=0.0 must be above'),
])
def test_cli_errors_come_before_anything_is_restored(tmp_path, overrides, match):
  from configs import digits_cd
  config = digits_cd.get_config()
  config.edit.update(overrides)
  # tmp_path holds no run: the config error must come first.
  with pytest.raises(ConfigError, match=match):
    edit_mode.run(config, str(tmp_path))


# --------------------------------------------------------------------------------------------------
# --mode=edit end to end on a tiny trained EDM run (its PF-ODE is the consistency function).
# --------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_edit_mode_end_to_end(tmp_path, digits_data_dir):
  from tests import tiny
  workdir = str(tmp_path / 'edm')
  config = tiny.edm_config(digits_data_dir, steps=2)
  tiny.train(config, workdir)
  config.edit.num_images, config.edit.batch_size, config.edit.ts = 10, 4, (0, 9)
  results = {}
  for task in ('inpainting', 'superres', 'denoising', 'stroke'):
    config.edit.task, config.edit.num_draws = task, 2 if task == 'superres' else 1
    results[task] = edit_mode.run(config, workdir)
  config.edit.num_draws = 1
  config.edit.task, config.edit.interpolation_source, config.edit.interpolation_points = (
      'interpolation', 'inputs', 3)
  results['interpolation'] = edit_mode.run(config, workdir)
  for task, result in results.items():
    for name in ('input.png', 'result.png', 'reference.png', 'edits.npz', 'metrics.json'):
      assert os.path.exists(os.path.join(result['dir'], name)), (task, name)
  # 2 time points x 4 network evaluations of a 3-level Heun ODE per consistency step.
  assert results['inpainting']['nfe'] == 8 and results['inpainting']['dir'].endswith('inpainting_nfe8')
  with np.load(os.path.join(results['inpainting']['dir'], 'edits.npz')) as npz:
    assert npz['result'].shape == (10, 8, 8, 1) and npz['result'].dtype == np.uint8
    np.testing.assert_array_equal(npz['result'][:, :4], npz['reference'][:, :4])  # Known upper half.
    np.testing.assert_array_equal(npz['input'][:, 4:], 127)  # The hole, shown mid-grey (0).
    inpainted, reference = npz['result'], npz['reference']
  with np.load(os.path.join(results['superres']['dir'], 'edits.npz')) as npz:
    means = lambda a: editing.patch_means(a.astype(np.float64), 2)
    assert np.abs(means(npz['result']) - means(npz['reference'])).max() <= 1.0  # uint8 rounding.
    assert npz['draws'].shape == (2, 10, 8, 8, 1)
    np.testing.assert_array_equal(npz['draws'][0], npz['result'])
  assert results['superres']['num_draws'] == 2 and 'rmse_mean_of_draws' in results['superres']
  # The recorded errors are those of the written images (uint8: within half a level, 1/510) and of
  # the baseline recomputed here from the real images.
  to_unit = lambda a: a.astype(np.float64) / 127.5 - 1.0
  mask = editing.named_mask('lower_half', 8)
  assert results['inpainting']['rmse'] == pytest.approx(
      editing.region_rmse(to_unit(inpainted), to_unit(reference), mask), abs=1 / 255)
  assert results['inpainting']['baseline_rmse'] == pytest.approx(
      editing.region_rmse(editing.mean_fill(to_unit(reference), mask), to_unit(reference), mask),
      abs=1e-6)
  for task in ('superres', 'denoising'):
    assert 0 < results[task]['rmse'] < 1 and 0 < results[task]['baseline_rmse'] < 1
  assert results['interpolation']['num_images'] == 15  # 5 pairs x 3 points.
  # Files of the wrong size are refused before anything is restored.
  _save(tmp_path / 'big.png', np.zeros((16, 16), np.uint8))
  config.edit.task = 'inpainting'
  with pytest.raises(ConfigError, match='16x16'):
    edit_mode.run(config, workdir, str(tmp_path / 'big.png'))
  _save(tmp_path / 'small.png', np.full((4, 4), 255, np.uint8))
  config.edit.task = 'superres'
  low = edit_mode.run(config, workdir, str(tmp_path / 'small.png'))
  assert low['num_images'] == 1 and 'rmse' not in low  # No reference for a file input.

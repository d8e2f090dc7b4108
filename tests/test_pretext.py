"""Colorization and context encoder: Lab conversion vs scikit-image, the ab bins, both losses
against numpy formulas, and both `:smoke` recipes end to end."""

import json
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import skimage.color
import skimage.data

from configs import colorization_r50, context_encoder_r50
from sslvl_jax import train
from sslvl_jax.data import color
from sslvl_jax.errors import ConfigError
from sslvl_jax.methods import colorization, context_encoder


def _test_images():
  rng = np.random.default_rng(0)
  photos = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea()]
  return [rng.uniform(size=(64, 64, 3))] + [p[::4, ::4] / 255.0 for p in photos]


def test_rgb_to_lab_and_back_match_scikit_image():
  worst_lab, worst_rgb = 0.0, 0.0
  for rgb in _test_images():
    want = skimage.color.rgb2lab(rgb)
    worst_lab = max(worst_lab, np.abs(np.asarray(color.rgb_to_lab(rgb)) - want).max())
    worst_rgb = max(worst_rgb, np.abs(np.asarray(color.lab_to_rgb(want)) -
                                      skimage.color.lab2rgb(want)).max())
  # out-of-gamut Lab too: both clip to [0, 1] (scikit-image warns about negative Z)
  lab = np.random.default_rng(1).uniform([0, -100, -100], [100, 100, 100], size=(4096, 3))
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    want = skimage.color.lab2rgb(lab)
  worst_rgb = max(worst_rgb, np.abs(np.asarray(color.lab_to_rgb(lab)) - want).max())
  assert worst_lab < 2e-3  # float32 on device vs scikit-image float64 (L in [0, 100])
  assert worst_rgb < 1e-4


def _numpy_bins(levels):
  v = np.linspace(0.0, 1.0, levels)
  cells = set()
  for r in v:
    g, b = np.meshgrid(v, v, indexing="ij")
    ab = skimage.color.rgb2lab(np.stack([np.full_like(g, r), g, b], -1))[..., 1:].reshape(-1, 2)
    cells.update(map(tuple, np.round(ab / 10).astype(int)))
  return np.asarray(sorted(cells), np.float32) * 10


def test_gamut_bins_match_scikit_image_grid():
  bins = color.ab_gamut_bins()
  np.testing.assert_array_equal(bins, _numpy_bins(64))
  assert len(bins) == 261


@pytest.mark.slow
def test_gamut_bins_are_those_of_every_8bit_colour():
  np.testing.assert_array_equal(color.ab_gamut_bins(), _numpy_bins(256))


def test_soft_encoding_matches_numpy():
  bins = color.ab_gamut_bins()
  ab = np.random.default_rng(0).uniform(-80, 80, size=(50, 2)).astype(np.float32)
  got = np.asarray(color.soft_encode(jnp.asarray(ab), bins))
  d2 = ((ab[:, None] - bins[None]) ** 2).sum(-1)
  want = np.zeros_like(got)
  for i, row in enumerate(d2):
    near = np.argsort(row)[:5]
    w = np.exp(-row[near] / (2 * 5.0 ** 2))
    want[i, near] = w / w.sum()
  np.testing.assert_allclose(got, want, atol=1e-5)


def _numpy_colorization_loss(logits, ab, bins):
  """Zhang et al.'s rebalanced loss with the prior of this batch (step 0), float64."""
  q = len(bins)
  d2 = ((ab[..., None, :] - bins) ** 2).sum(-1).reshape(-1, q)
  targets = np.zeros_like(d2)
  for i, row in enumerate(d2):
    near = np.argsort(row)[:5]
    w = np.exp(-row[near] / 50.0)
    targets[i, near] = w / w.sum()
  prior = np.bincount(d2.argmin(-1), minlength=q) / len(d2)
  kernel = np.exp(-((bins[:, None] - bins[None]) ** 2).sum(-1) / 50.0)
  smooth = kernel @ prior
  smooth /= smooth.sum()
  weights = 1.0 / (0.5 * smooth + 0.5 / q)
  weights /= (smooth * weights).sum()
  z = logits.reshape(-1, q).astype(np.float64)
  logp = z - z.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  ce = -(targets * logp).sum(-1)
  return (weights[targets.argmax(-1)] * ce).mean(), prior


def test_colorization_loss_at_step_0_matches_numpy(tmp_path):
  s = train.setup(colorization_r50.get_config("smoke"), str(tmp_path))
  batch = next(s.batches)
  rgb = np.asarray(batch["views0"][:, 0]) / 255.0
  lab = skimage.color.rgb2lab(rgb)
  ab = lab[:, ::4, ::4, 1:]
  x = colorization.lightness_input(color.rgb_to_lab(jnp.asarray(rgb)))
  np.testing.assert_allclose(np.asarray(x[..., 0]), (lab[..., 0] - 50) / 50, atol=1e-4)
  decode = jax.jit(lambda p, m, x: s.method.decode(s.method.merge(p, m), x, ab.shape[1:3]))
  logits = np.asarray(decode(s.state.params, s.state.model_state, x))
  loss, (_, _, extras) = jax.jit(s.method.forward_loss)(s.state.params, s.state, batch,
                                                        jax.random.key(0))
  want, prior = _numpy_colorization_loss(logits, ab, s.method.bins)
  assert float(loss) == pytest.approx(want, rel=1e-4)
  np.testing.assert_allclose(np.asarray(extras["ab_prior"]), prior, atol=1e-6)


def test_context_encoder_loss_is_l2_on_the_masked_region():
  rng = np.random.default_rng(0)
  pred, target = (rng.normal(size=(2, 32, 32, 3)).astype(np.float32) for _ in range(2))
  region = context_encoder.MASKS.get("center")(None, 2, 32, 32, 4)
  hole = context_encoder.erode(region, 1)
  want_region = np.zeros((32, 32), bool)
  want_region[8:24, 8:24] = True
  want_hole = np.zeros((32, 32), bool)
  want_hole[9:23, 9:23] = True
  np.testing.assert_array_equal(np.asarray(region[1]), want_region)
  np.testing.assert_array_equal(np.asarray(hole[1]), want_hole)
  w = np.where(want_hole, 1.0, np.where(want_region, 10.0, 0.0))[None, ..., None]
  want = (w * (pred - target) ** 2).sum() / (2 * 16 * 16 * 3)
  got = context_encoder.masked_l2(pred, target, region, hole, 10.0)
  assert float(got) == pytest.approx(want, rel=1e-5)
  grad = np.asarray(jax.grad(context_encoder.masked_l2, argnums=1)(pred, target, region, hole,
                                                                  10.0))
  assert np.all(grad[:, ~want_region] == 0)
  assert np.all(grad[:, want_region] != 0)


def test_random_masks_cover_at_most_a_quarter():
  key = jax.random.key(0)
  blocks = np.asarray(context_encoder.MASKS.get("random_block")(key, 64, 32, 32, 4))
  assert 1 / 16 <= blocks.mean(axis=(1, 2)).min() and blocks.mean(axis=(1, 2)).max() <= 1 / 4
  regions = np.asarray(context_encoder.MASKS.get("random_region")(key, 64, 32, 32, 4))
  np.testing.assert_allclose(regions.mean(axis=(1, 2)), 0.25, atol=2 / 1024)


def test_context_encoder_rejects_the_adversarial_term(tmp_path):
  c = context_encoder_r50.get_config("smoke")
  c.loss.adversarial_weight = 0.001
  with pytest.raises(ConfigError, match="loss.adversarial_weight"):
    train.setup(c, str(tmp_path))


@pytest.mark.slow  # mostly compilation
@pytest.mark.parametrize("module", [colorization_r50, context_encoder_r50])
def test_smoke_recipe_trains(tmp_path, module):
  train.run(module.get_config("smoke"), str(tmp_path))
  with open(os.path.join(tmp_path, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  losses = [r["train/loss"] for r in rows if "train/loss" in r]
  assert len(losses) == 2 and all(np.isfinite(losses))

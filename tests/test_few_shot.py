"""Few-shot ridge probe: closed form vs lstsq, the k-per-class draws, the evaluator on digits."""

from __future__ import annotations

import numpy as np
import pytest
from ml_collections import ConfigDict

from configs import common
from sslvl_jax import parallel
from sslvl_jax.data import builtin
from sslvl_jax.errors import ConfigError
from sslvl_jax.evals import EVALUATORS, few_shot as fs


@pytest.mark.parametrize("n,d,l2_reg", [(12, 20, 0.5), (60, 8, 1.0), (5, 3, 1e-3)])
def test_ridge_equals_lstsq_on_the_augmented_system(n, d, l2_reg):
  rng = np.random.default_rng(n)
  x = np.concatenate([rng.normal(size=(n, d)), np.ones((n, 1))], 1)
  y = rng.normal(size=(n, 4))
  # ridge with an unregularised bias = least squares on [x; sqrt(l2) [I 0]] w = [y; 0]
  penalty = np.sqrt(l2_reg) * np.eye(d + 1)[:d]
  want = np.linalg.lstsq(np.concatenate([x, penalty]), np.concatenate([y, np.zeros((d, 4))]),
                         rcond=None)[0]
  np.testing.assert_allclose(fs.ridge(x, y, l2_reg), want, rtol=1e-8, atol=1e-10)


def test_augment_centres_normalises_rows_and_appends_a_bias():
  x = np.array([[4.0, 5.0], [1.0, -1.0]])
  np.testing.assert_allclose(fs.augment(x, np.array([1.0, 1.0])),
                             [[0.6, 0.8, 1.0], [0.0, -1.0, 1.0]])


def test_draws_exactly_k_per_class_deterministic_and_nested():
  labels = np.repeat(np.arange(5), [7, 9, 30, 12, 25])
  np.random.default_rng(0).shuffle(labels)
  for k in (1, 5, 7):
    idx = fs.sample_shots(labels, 5, k, seed=3)
    assert len(set(idx)) == len(idx) == 5 * k
    np.testing.assert_array_equal(np.bincount(labels[idx], minlength=5), [k] * 5)
    np.testing.assert_array_equal(idx, fs.sample_shots(labels, 5, k, seed=3))
  assert not np.array_equal(fs.sample_shots(labels, 5, 5, 0), fs.sample_shots(labels, 5, 5, 1))
  five, seven = fs.sample_shots(labels, 5, 5, 2), fs.sample_shots(labels, 5, 7, 2)
  assert set(five) <= set(seven)
  with pytest.raises(ConfigError, match="8 shots need 8 train examples of class 0, which has 7"):
    fs.sample_shots(labels, 5, 8, seed=0)


def pixels(split: str) -> tuple[np.ndarray, np.ndarray]:
  """The built-in digits as flat 8x8 pixel features."""
  images, labels = builtin.digits(split)
  return images.reshape(len(images), -1), labels


def test_more_shots_classify_raw_digits_better():
  (tx, ty), (vx, vy) = pixels("train"), pixels("test")
  res = fs.few_shot(tx, ty, vx, vy, num_classes=10, shots=(1, 25), seeds=3)
  assert set(res) == {"1shot_mean", "1shot_std", "25shot_mean", "25shot_std"}
  # measured (l2_reg 1): 1-shot 0.64 +- 0.02, 25-shot 0.91 +- 0.01 over 3 seeds (chance 0.1)
  assert res["25shot_mean"] > res["1shot_mean"] + 0.15
  assert res["25shot_mean"] > 0.8 and res["1shot_mean"] > 0.3
  assert 0 < res["1shot_std"] < 0.2
  single = [fs.few_shot_top1(tx, ty, vx, vy, num_classes=10, k=1, seed=s) for s in range(3)]
  assert res["1shot_mean"] == pytest.approx(np.mean(single))


def pixel_features(params, model_state, extras, images):
  """uint8 images -> their flattened pixels (a fixed feature map, no parameters)."""
  del params, model_state, extras
  return images[..., 0].reshape(images.shape[0], -1).astype(np.float32)


def test_evaluator_on_digits_equals_the_math_on_its_features():
  mesh = parallel.make_mesh()
  data = common.digits_images(crop_groups=((8, (1.0, 1.0), 1),), image_size=8)
  cfg = ConfigDict(dict(type="few_shot", shots=(2, 10), seeds=2, l2_reg=0.5, batch_size=512))
  ev = EVALUATORS.get("few_shot")(cfg, {"image_features": pixel_features}, mesh, data, "fs")
  got = ev.run(None, None, None)
  train_f, train_l, test_f, test_l, n = ev.train_test(None, None, None)
  assert (len(train_l), len(test_l), n) == (1500, 297, 10)
  want = fs.few_shot(train_f, train_l, test_f, test_l, num_classes=10, shots=(2, 10), seeds=2,
                     l2_reg=0.5)
  assert got == {**want, "skipped": 0}
  assert got["10shot_mean"] > got["2shot_mean"]


@pytest.mark.parametrize("setting,match", [
    (dict(shots=(0, 5)), r"evals.fs.shots=\(0, 5\): give positive integers"),
    (dict(seeds=0), "evals.fs.seeds=0: give a positive integer"),
    (dict(l2_reg=0.0), "evals.fs.l2_reg=0.0: give a number > 0"),
    (dict(shot=5), "evals.fs.shot: not a setting of a few_shot evaluator"),
])
def test_bad_settings_fail_when_built(setting, match):
  data = common.digits_images(crop_groups=((8, (1.0, 1.0), 1),), image_size=8)
  with pytest.raises(ConfigError, match=match):
    EVALUATORS.get("few_shot")(ConfigDict(dict(type="few_shot", **setting)),
                               {"image_features": pixel_features}, parallel.make_mesh(), data,
                               "fs")

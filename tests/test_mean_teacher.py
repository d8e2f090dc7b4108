"""Mean teacher: the step-0 loss against numpy, the paper's ramp-up and EMA schedules, the seeded
labelled subset, and a smoke run with the classifier evaluator."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import mean_teacher_r50
from sslvl_jax import data, optim, train
from sslvl_jax.data import builtin, examples
from sslvl_jax.errors import ConfigError
from sslvl_jax.methods.base import context
from sslvl_jax.methods.mean_teacher import sigmoid_rampup


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
  return train.setup(mean_teacher_r50.get_config("smoke"), str(tmp_path_factory.mktemp("mt")))


def _log_softmax(z):
  z = z - z.max(axis=1, keepdims=True)
  return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def test_loss_at_step_zero_is_labelled_ce_plus_ramped_softmax_mse(smoke):
  s = smoke
  batch = next(s.batches)
  rows = np.arange(len(batch["label"]))
  labels = np.where(rows % 3 == 0, rows % 10, -1).astype(np.int32)  # 6 of 16 rows labelled
  batch = {**batch, "label": jax.device_put(labels, batch["label"].sharding)}
  rng = jax.random.key(3)
  loss, (m, _, _) = jax.jit(s.method.forward_loss)(s.state.params, s.state, batch, rng)

  student_view, teacher_view = s.method.views(batch, 0, context(s.state, rng).stream("augment"))
  student = s.method.merge(s.state.params, s.state.model_state)
  teacher = s.method.teacher_model(s.state.extras["teacher"])
  zs = np.asarray(student.classifier(student.features(student_view, train=True)), np.float64)
  zt = np.asarray(teacher.classifier(teacher.features(teacher_view, train=True)), np.float64)
  rows = labels >= 0
  ce = -_log_softmax(zs)[rows, labels[rows]].mean()
  mse = ((np.exp(_log_softmax(zs)) - np.exp(_log_softmax(zt))) ** 2).mean()
  weight = s.config.loss.consistency_weight * math.exp(-5.0)  # step 0 of the ramp-up
  np.testing.assert_allclose(float(m["ce"]), ce, rtol=1e-5)
  np.testing.assert_allclose(float(m["consistency"]), mse, rtol=1e-4)
  assert mse > 1e-5  # the two views differ, so the term is tested
  np.testing.assert_allclose(float(m["consistency_weight"]), weight, rtol=1e-6)
  np.testing.assert_allclose(float(loss), ce + weight * mse, rtol=1e-6)
  assert float(m["labelled"]) == rows.sum()


def test_sigmoid_rampup_is_exp_minus_5_one_minus_t_squared():
  for length in (1, 40, 469):
    for step in (0, 1, length // 2, length - 1, length, 3 * length):
      want = math.exp(-5.0 * (1.0 - min(step / length, 1.0)) ** 2)
      assert float(sigmoid_rampup(jnp.int32(step), length)) == pytest.approx(want, rel=1e-6)
  assert float(sigmoid_rampup(jnp.int32(0), 0)) == 1.0


def test_teacher_ema_decay_is_099_during_the_rampup_then_0999(smoke):
  method = smoke.method
  ramp = method.rampup_steps
  assert ramp == round(5 * 1500 / 16)  # consistency_rampup_epochs=5 of the smoke run
  tx = method.ema()
  student = {"w": jnp.arange(3.0)}

  def update(state, _):
    _, state = tx.update(student, state)
    return state, (state.hyperparams["decay"], optim.teacher_params(state)["w"])

  state = optim.seed_teacher(tx, {"w": jnp.full(3, 10.0)})
  _, (decays, teachers) = jax.jit(lambda s: jax.lax.scan(update, s, length=ramp + 3))(state)
  want = np.array([0.99] * ramp + [0.999] * 3)
  np.testing.assert_allclose(np.asarray(decays), want, rtol=1e-7)
  teacher = np.full(3, 10.0)
  for k, m in enumerate(want):
    teacher = m * teacher + (1 - m) * np.arange(3.0)
    if k in (0, ramp - 1, ramp, ramp + 2):
      np.testing.assert_allclose(np.asarray(teachers[k]), teacher, rtol=1e-5)


def test_labelled_subset_has_the_fraction_and_is_fixed_per_key():
  source = builtin.DigitsSource("train")
  keys = [source[i]["key"] for i in range(len(source))]
  n = len(keys)
  for fraction in (0.1, 0.5):
    picked = [examples.is_labelled(k, fraction, 0) for k in keys]
    sigma = math.sqrt(n * fraction * (1 - fraction))
    assert abs(sum(picked) - n * fraction) < 3 * sigma
    assert picked == [examples.is_labelled(k, fraction, 0) for k in keys]  # deterministic
  other = [examples.is_labelled(k, 0.1, 1) for k in keys]
  assert other != [examples.is_labelled(k, 0.1, 0) for k in keys]  # the seed picks another subset
  assert all(examples.is_labelled(k, 1.0, 0) for k in keys)

  cfg = mean_teacher_r50.get_config("digits").data
  transform = data.example_transform(cfg, "labelled_views", train=True)
  rng = np.random.default_rng(0)
  for i in range(100):
    record = source[i]
    out = transform(record, rng)
    want = record["label"] if examples.is_labelled(record["key"], 0.1, 0) else -1
    assert int(out["label"]) == want and out["views0"].shape == (2, 32, 32, 3)


def test_labelled_fraction_out_of_range_fails_before_training(tmp_path):
  cfg = mean_teacher_r50.get_config("smoke")
  cfg.data.labelled_fraction = 0.0
  with pytest.raises(ConfigError, match="data.labelled_fraction"):
    train.setup(cfg, str(tmp_path))


def test_smoke_trains_and_the_classifier_evaluator_reports_top1(tmp_path):
  cfg = mean_teacher_r50.get_config("smoke")
  full = mean_teacher_r50.get_config("digits")
  cfg.evals = {name: full.evals[name] for name in ("teacher", "student")}
  final = train.run(cfg, str(tmp_path))
  assert np.isfinite(final["train/loss"]) and final["train/teacher_momentum"] == pytest.approx(0.99)
  for name in ("teacher", "student"):
    assert 0.0 <= final[f"{name}/top1"] <= final[f"{name}/top5"] <= 1.0
    saved = json.loads(next((tmp_path / "evals").glob(f"{name}_4_*.json")).read_text())
    assert saved["settings"]["predict"] == f"{name}_logits"


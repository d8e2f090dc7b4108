"""BYOL / SimSiam / DINO: the teacher as an optax EMA state, schedules, and the lecture's ablations."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import byol_r50, common, dino_vits16, simsiam_r50
from sslvl_jax import optim, train
from sslvl_jax.methods.base import TrainState


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_momentum_schedule_matches_byol_formula():
  total = 100
  sched = optim.cosine_ramp(0.996, 1.0, total)
  for k in (0, 10, 50, 99, 100):
    want = 1 - (1 - 0.996) * (math.cos(math.pi * k / total) + 1) / 2
    assert float(sched(k)) == pytest.approx(want, abs=1e-7)


def _setup(cfg, tmp_path):
  return train.setup(cfg, str(tmp_path))


def test_dino_teacher_starts_as_student_and_follows_the_ema(tmp_path):
  s = _setup(dino_vits16.get_config("smoke"), tmp_path)
  teacher0 = optim.teacher_params(s.state.extras["teacher"]["ema"])
  for a, b in zip(_leaves(teacher0), _leaves(s.state.params)):
    np.testing.assert_array_equal(a, b)
  step = train.make_train_step(s.method, s.tx, s.schedule, s.mesh)
  sched = optim.cosine_ramp(s.config.teacher.momentum, 1.0, s.total_steps)
  state, _ = step(s.state, next(s.batches), jax.random.key(0))  # lr is 0 at step 0 (warmup)
  student1 = _leaves(state.params)
  teacher1 = _leaves(optim.teacher_params(state.extras["teacher"]["ema"]))
  state, _ = step(state, next(s.batches), jax.random.key(0))
  student2 = _leaves(state.params)
  teacher2 = _leaves(optim.teacher_params(state.extras["teacher"]["ema"]))
  assert any(not np.allclose(a, b) for a, b in zip(student1, student2))
  m1 = float(sched(1))
  for t2, t1, s2 in zip(teacher2, teacher1, student2):
    np.testing.assert_allclose(t2, m1 * t1 + (1 - m1) * s2, rtol=1e-5, atol=1e-6)


def test_byol_target_uses_its_own_init_by_default(tmp_path):
  s = _setup(byol_r50.get_config("smoke"), tmp_path)
  teacher = _leaves(optim.teacher_params(s.state.extras["teacher"]["ema"]))
  student = _leaves(s.state.params)
  assert any(a.ndim > 1 and not np.allclose(a, b) for a, b in zip(teacher, student))


@pytest.mark.parametrize("module", [byol_r50, dino_vits16])
def test_teacher_gets_no_gradient(tmp_path, module):
  s = _setup(module.get_config("smoke"), tmp_path)
  batch = next(s.batches)
  ema = s.state.extras["teacher"]["ema"]

  def loss_of_teacher(tparams):
    extras = {**s.state.extras, "teacher": {**s.state.extras["teacher"],
                                            "ema": optim.set_teacher_params(ema, tparams)}}
    state = TrainState(s.state.step, s.state.params, s.state.opt_state, s.state.model_state, extras)
    return s.method.forward_loss(s.state.params, state, batch, jax.random.key(0))[0]

  grads = jax.jit(jax.grad(loss_of_teacher))(optim.teacher_params(ema))
  assert all(np.all(g == 0) for g in _leaves(grads))
  # ...while the student does get one.
  g_student = jax.jit(jax.grad(
      lambda p: s.method.forward_loss(p, s.state, batch, jax.random.key(0))[0]))(s.state.params)
  assert any(np.any(g != 0) for g in _leaves(g_student))


def test_dino_teacher_temperature_warms_up_per_epoch(tmp_path):
  s = _setup(dino_vits16.get_config("smoke"), tmp_path)
  cfg = s.config.loss
  spe = s.config.schedule["steps_per_epoch"]
  table = np.linspace(cfg.warmup_teacher_temp, cfg.teacher_temp, cfg.teacher_temp_warmup_epochs)
  for epoch in (0, 1, cfg.teacher_temp_warmup_epochs - 1, cfg.teacher_temp_warmup_epochs + 3):
    for frac in (0.0, 0.7):  # constant within an epoch
      step = jnp.float32(math.ceil((epoch + frac) * spe))
      want = table[epoch] if epoch < len(table) else cfg.teacher_temp
      assert float(s.method.teacher_temp(step)) == pytest.approx(want, rel=1e-6)


# ---- The lecture's ablations, as behaviour on the built-in digits (short runs of `:digits`) ----

def _short_digits_run(module, tmp_path, *, steps: int, lr: float, **overrides):
  """Train `module`'s `:digits` config for `steps` AdamW steps; (rows of metrics.jsonl, error)."""
  c = module.get_config("digits")
  common.cpu_adamw(c, lr=lr, steps=steps)
  c.optim.warmup_steps = 5
  c.log_every_steps, c.evals = 5, {}
  c.update_from_flattened_dict({k.replace("__", "."): v for k, v in overrides.items()})  # a__b: c.a.b
  try:
    train.run(c, str(tmp_path))
    error = None
  except RuntimeError as e:
    error = str(e)
  with open(tmp_path / "metrics.jsonl") as f:
    return [json.loads(line) for line in f], error


@pytest.mark.slow  # ~40 s per run on an idle 2-core machine
def test_simsiam_collapses_without_stop_gradient(tmp_path):
  rows, error = _short_digits_run(simsiam_r50, tmp_path / "sg", steps=80, lr=3e-3)
  assert error is None and len(rows) == 16
  assert min(r["train/rankme"] for r in rows) > 8  # measured: >= 14.5 at batch 128
  assert rows[-1]["train/embed_std"] > 0.8 * rows[-1]["train/embed_std_healthy"]
  rows, error = _short_digits_run(simsiam_r50, tmp_path / "no_sg", steps=80, lr=3e-3,
                                  loss__stop_gradient=False)
  # Measured (8 CPU devices): rank 40 -> 5.4 at step 40 -> below 2 (z = +-u) at step 60, with
  # embedding std falling to 0.4 x healthy; with stop-gradient it stays >= 13.
  assert error is not None and "collapse detected" in error and "train/rankme" in error
  assert rows[0]["train/rankme"] > 8  # it started healthy and collapsed while training


@pytest.mark.slow  # ~40 s per run on an idle 2-core machine
def test_dino_one_dimension_dominates_without_centering(tmp_path):
  """Without centering the sharpened teacher puts all its mass on one output (entropy -> 0)."""
  rule = (("train/teacher_entropy", "<", 1.0),)  # uniform would be ln 256 = 5.5
  # The paper's head (no BN) and teacher temperature: the `:digits` BN head resists this collapse.
  kw = dict(steps=30, lr=1e-3, teacher__momentum=0.99, collapse_rules=rule,
            model__heads__head__use_bn=False, loss__teacher_temp=0.04)
  rows, error = _short_digits_run(dino_vits16, tmp_path / "centred", **kw)
  assert error is None
  assert min(r["train/teacher_entropy"] for r in rows) > 1.5  # measured: 2.2 -> 3.3
  rows, error = _short_digits_run(dino_vits16, tmp_path / "uncentred", loss__centering=False, **kw)
  # Measured: entropy 1.9 -> 0.7 at step 20 (while the centred teacher's rises), 0.56 by step 60.
  assert error is not None and "collapse detected" in error and "teacher_entropy" in error

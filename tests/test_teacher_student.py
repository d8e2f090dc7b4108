"""BYOL / SimSiam / DINO: the teacher as an optax EMA state, schedules, and the lecture's ablations."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import byol_r50, dino_vits16, simsiam_r50
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

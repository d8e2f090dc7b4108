"""BYOL / SimSiam / DINO: the teacher as an optax EMA state, schedules, and the collapse ablations."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import ConfigDict

from configs import byol_r50, dino_vits16, simsiam_r50
from sslvl_jax import metrics, optim, train
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
  step = train.make_train_step(s.method, s.tx, s.lr_schedule, s.mesh)
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
  spe = s.schedule.steps_per_epoch
  table = np.linspace(cfg.warmup_teacher_temp, cfg.teacher_temp, cfg.teacher_temp_warmup_epochs)
  for epoch in (0, 1, cfg.teacher_temp_warmup_epochs - 1, cfg.teacher_temp_warmup_epochs + 3):
    for frac in (0.0, 0.7):  # constant within an epoch
      step = jnp.float32(math.ceil((epoch + frac) * spe))
      want = table[epoch] if epoch < len(table) else cfg.teacher_temp
      assert float(s.method.teacher_temp(step)) == pytest.approx(want, rel=1e-6)


# ---- The papers' collapse ablations, side by side with the healthy run on the built-in digits ---
# Each test trains `:digits` twice with the same seed (monitors logged, rules off), asserts the
# paper's claim as a ratio between the two runs, and checks the config's collapse rules: silent on
# the healthy run (and, for SimSiam, tripping on the ablated one). Margins were measured over seeds
# 0-4 (README, "Collapse tests"); one device, so the runs are cheap and the mesh is not the subject.

def _adamw(c, lr: float, steps: int) -> None:
  """c.optim -> AdamW (wd 0.05, 30 warm-up steps) keeping its freeze, clipping and constant-lr
  rules; total_steps = steps."""
  keep = {k: c.optim[k] for k in ("freeze_rules", "clip_grad_per_tensor", "constant_lr_rules")
          if k in c.optim}
  c.optim = ConfigDict(dict(name="adamw", lr=lr, weight_decay=0.05, warmup_steps=30, **keep))
  c.total_steps = steps


def _digits_run(module, tmp_path, *, steps: int, lr: float, **overrides) -> list[dict]:
  """Rows of metrics.jsonl after `steps` AdamW steps of `module`'s `:digits` recipe, no rules."""
  c = module.get_config("digits")
  _adamw(c, lr=lr, steps=steps)
  c.optim.warmup_steps = 5
  c.log_every_steps, c.evals, c.num_devices, c.collapse_rules = 5, {}, 1, ()
  c.update_from_flattened_dict({k.replace("__", "."): v for k, v in overrides.items()})  # a__b: c.a.b
  train.run(c, str(tmp_path))
  with open(tmp_path / "metrics.jsonl") as f:
    return [json.loads(line) for line in f]


def _tail(rows: list[dict], key: str) -> float:
  """Mean of `key` over the last quarter of the logged steps (one log step is noisy)."""
  return float(np.mean([r[key] for r in rows[-max(len(rows) // 4, 1):]]))


def _trips(rows: list[dict], rules) -> bool:
  """Whether the collapse rules would have stopped a run that logged `rows`."""
  try:
    for r in rows:
      metrics.check_collapse(r, rules, r["step"])
  except RuntimeError:
    return True
  return False


def test_collapse_rule_stops_training(tmp_path):
  c = simsiam_r50.get_config("smoke")
  c.collapse_rules, c.num_devices = (("train/rankme", ">", 0.0),), 1  # trips at the first log step
  with pytest.raises(RuntimeError, match=r"collapse detected at step 2: train/rankme"):
    train.run(c, str(tmp_path))


@pytest.mark.slow  # ~1 min on an idle 2-core machine
def test_simsiam_collapses_without_stop_gradient(tmp_path):
  """Without stop-gradient the embeddings lose their rank (the SimSiam paper's Fig. 2 ablation)."""
  kw = dict(steps=120, lr=1e-3)
  healthy = _digits_run(simsiam_r50, tmp_path / "sg", **kw)
  ablated = _digits_run(simsiam_r50, tmp_path / "no_sg", loss__stop_gradient=False, **kw)
  assert ablated[0]["train/rankme"] > 0.8 * healthy[0]["train/rankme"]  # both start healthy
  # Measured, last-quarter RankMe ablated / healthy: 0.08-0.37 (healthy 11.6-23.0).
  assert _tail(ablated, "train/rankme") < 0.6 * _tail(healthy, "train/rankme")
  rules = simsiam_r50.get_config("digits").collapse_rules
  assert not _trips(healthy, rules) and _trips(ablated, rules)


@pytest.mark.slow  # ~30 s on an idle 2-core machine
def test_dino_one_output_dominates_without_centering(tmp_path):
  """Without centering the sharpened teacher puts its mass on one output for every image."""
  # The paper's head (no BN) and teacher temperature: the `:digits` BN head resists this collapse.
  kw = dict(steps=40, lr=1e-3, teacher__momentum=0.99, model__heads__head__use_bn=False,
            loss__teacher_temp=0.04)
  healthy = _digits_run(dino_vits16, tmp_path / "centred", **kw)
  ablated = _digits_run(dino_vits16, tmp_path / "uncentred", loss__centering=False, **kw)
  # Measured, last quarter, uncentred / centred: teacher entropy 0.01-0.24 of the centred one's
  # (centred 3.9-4.4 of ln 256 = 5.5), top output's batch mass 2.2-10x the centred one's.
  assert _tail(ablated, "train/teacher_entropy") < 0.5 * _tail(healthy, "train/teacher_entropy")
  assert _tail(ablated, "train/teacher_top_mass") > 1.6 * _tail(healthy, "train/teacher_top_mass")
  rules = dino_vits16.get_config("digits").collapse_rules
  assert not _trips(healthy, rules)


def test_collapse_monitors_only_on_log_steps_and_on_a_row_subsample():
  from sslvl_jax.methods.ssl import MONITOR_ROWS, collapse_monitors  # pylint: disable=g-import-not-at-top
  z = jax.random.normal(jax.random.key(0), (MONITOR_ROWS + 44, 32))
  fn = jax.jit(collapse_monitors)
  on, off = fn(z, jnp.bool_(True)), fn(z, jnp.bool_(False))
  head = z[:MONITOR_ROWS]  # computed independently on the subsample
  s = np.linalg.svd(np.asarray(head, np.float64), compute_uv=False)
  p = s / s.sum() + 1e-7
  np.testing.assert_allclose(float(on["rankme"]), np.exp(-(p * np.log(p)).sum()), rtol=1e-4)
  np.testing.assert_allclose(float(on["embed_std"]), float(metrics.embedding_std(head)), rtol=1e-6)
  assert all(float(v) == 0.0 for v in off.values())  # a non-log step computes nothing

"""SimCLR, MoCo v2/v3, Barlow Twins, VICReg: smoke runs, MoCo queue / shuffle BN / EMA, lr rules."""

import functools
import importlib
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from ml_collections import ConfigDict

from configs import common, mocov2_r50
from sslvl_jax import durations, methods, optim, parallel, train
from sslvl_jax.methods import contrastive
from sslvl_jax.methods.base import TrainState

CONFIGS = ["simclr_r50", "mocov2_r50", "mocov3_vits16", "barlow_r50", "vicreg_r50"]


def l2n(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.mark.slow  # ~15 s each on an idle 2-core machine, mostly compilation
@pytest.mark.parametrize("name", CONFIGS)
def test_smoke_config_trains_four_steps(tmp_path, name):
  c = importlib.import_module(f"configs.{name}").get_config("smoke")
  final = train.run(c, str(tmp_path))
  with open(tmp_path / "metrics.jsonl") as f:
    rows = [json.loads(line) for line in f]
  assert [r["step"] for r in rows] == [2, 4]
  assert all(np.isfinite(r["train/loss"]) and r["train/loss"] > 0 for r in rows)
  assert np.isfinite(final["train/grad_norm"]) and final["train/embed_std"] > 0


# ---- MoCo v2 queue, exercised through the method's loss with a deterministic view pipeline -----

def moco_method(batch: int, queue: int):
  """MoCo v2 smoke model, views = CLIP-normalised crops (no randomness), one global BN group."""
  c = mocov2_r50.get_config("smoke")
  c.augment.views0 = ("clip",)
  c.model.bn_group_size = batch
  c.loss.queue_size = queue
  schedule = durations.Schedule(total_steps=10, steps_per_epoch=1.0, global_batch_size=batch)
  return methods.get("mocov2")(c, parallel.make_mesh(), schedule)


def clip_view(crops):
  mean, std = np.array(common.CLIP_MEAN), np.array(common.CLIP_STD)
  return ((crops / 255.0 - mean) / std).astype(np.float32)


def embed(method, params, model_state, images):
  model = nnx.merge(method.graphdef, params, jax.tree.map(jnp.array, model_state))
  out = model.projector(model.backbone(jnp.asarray(images), train=True)["pooled"], train=True)
  return l2n(out)


def test_mocov2_step_enqueues_newest_keys_fifo_and_loss_matches_reference():
  n, temp = 16, 0.2
  method = moco_method(n, 2 * n)
  params, model_state = method.init_model(jax.random.key(0))
  extras = method.init_extras(params, model_state, jax.random.key(1))
  queue0 = np.asarray(extras["queue"])
  np.testing.assert_allclose(np.linalg.norm(queue0, axis=1), 1.0, rtol=1e-5)
  step = jax.jit(method.forward_loss)
  rng = np.random.default_rng(0)
  keys = []
  for s in range(3):
    crops = rng.integers(0, 256, (n, 2, 32, 32, 3), dtype=np.uint8)
    batch = parallel.host_to_global(method.mesh, {"views0": crops})
    state = TrainState(step=jnp.int32(s), params=params, opt_state=None, model_state=model_state,
                       extras=extras)
    loss, (_, _, new) = step(params, state, batch, jax.random.key(s))
    # Params never change here, so the EMA key encoder stays equal to the query encoder.
    q = embed(method, params, model_state, clip_view(crops[:, 0]))
    k = embed(method, params, model_state, clip_view(crops[:, 1]))
    keys.append(k)
    if s == 0:  # CE([q.k+, q.queue] / T, class 0), mean over the global batch
      logits = np.concatenate([np.sum(q * k, 1, keepdims=True), q @ queue0.T], 1) / temp
      ref = np.mean(np.log(np.exp(logits).sum(1)) - logits[:, 0])
      np.testing.assert_allclose(float(loss), ref, rtol=1e-4)
    extras = new
    assert int(extras["queue_ptr"]) == ((s + 1) * n) % (2 * n)
  queue = np.asarray(extras["queue"])
  np.testing.assert_allclose(queue[:n], keys[2], atol=2e-5)   # wrapped round: step 3 overwrote
  np.testing.assert_allclose(queue[n:], keys[1], atol=2e-5)   # step 1's keys (the oldest)


def test_shuffle_bn_normalises_each_key_with_a_random_group():
  n, groups = 16, 4
  method = moco_method(n, 2 * n)
  params, model_state = method.init_model(jax.random.key(0))
  x = np.random.default_rng(1).normal(size=(n, 16, 16, 3)).astype(np.float32)
  key = jax.random.key(7)

  @jax.jit
  def shuffled_keys(x):
    net = nnx.merge(method.graphdef, params, jax.tree.map(jnp.array, model_state))
    fn = functools.partial(contrastive.encode, net, heads=("projector",), bn_groups=groups)
    xs = jax.device_put(x, parallel.data_sharding(method.mesh))
    return contrastive.shuffled(fn, xs, key, method.mesh)

  perm = np.asarray(jax.random.permutation(key, n))
  ref = np.zeros((n, 16))
  g = n // groups
  for j in range(groups):  # brute force: each group of the permuted batch with its own BN stats
    rows = perm[j * g:(j + 1) * g]
    ref[rows] = embed(method, params, model_state, x[rows])
  np.testing.assert_allclose(l2n(shuffled_keys(x)), ref, atol=2e-5)
  unshuffled = np.concatenate([embed(method, params, model_state, x[j * g:(j + 1) * g])
                               for j in range(groups)])
  assert np.abs(ref - unshuffled).max() > 1e-3  # the permutation matters


# ---- MoCo v2 through the training loop: EMA timing and queue checkpointing --------------------

def restore(workdir, step):
  mgr = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
  return mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]


def teacher(state):
  return state["extras"]["teacher"]["ema"]["inner_state"]["ema"]


def moco_run_config(total_steps):
  c = mocov2_r50.get_config("smoke")
  c.total_steps = total_steps
  c.teacher.update(momentum=0.5, momentum_end=0.5)  # a momentum that makes the timing visible
  c.optim.lr_per_256 = 3.0
  c.checkpoint_every_steps, c.keep_checkpoints = 1, 10
  return c


@pytest.mark.slow
def test_mocov2_key_encoder_ema_timing_and_queue_survive_resume(tmp_path):
  full, split = str(tmp_path / "full"), str(tmp_path / "split")
  train.run(moco_run_config(4), full)
  # A run stopped after step 2: the straight run's step-2 checkpoint (state + data iterator).
  shutil.copytree(os.path.join(full, "checkpoints", "2"), os.path.join(split, "checkpoints", "2"))
  train.run(moco_run_config(4), split)  # resumes at step 2
  a, b = restore(full, 4), restore(split, 4)
  for key in ("queue", "queue_ptr"):
    np.testing.assert_array_equal(np.asarray(a["extras"][key]), np.asarray(b["extras"][key]))
  for x, y in zip(jax.tree.leaves(teacher(a)), jax.tree.leaves(teacher(b))):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert int(a["extras"]["queue_ptr"]) == (4 * 16) % 64
  # Key encoder after step s: k_s = m k_{s-1} + (1 - m) q_{s-1}, with q_{s-1} the query params the
  # step started from (updated BEFORE computing the keys), not the params after the step.
  m, moved = 0.5, False
  for s in (2, 3, 4):
    prev, cur = restore(full, s - 1), restore(full, s)
    for k_prev, q_prev, q_cur, k_cur in zip(*(jax.tree.leaves(t) for t in (
        teacher(prev), prev["params"], cur["params"], teacher(cur)))):
      k_prev, q_prev, q_cur, k_cur = (np.asarray(t, np.float64) for t in (k_prev, q_prev, q_cur,
                                                                          k_cur))
      np.testing.assert_allclose(k_cur, m * k_prev + (1 - m) * q_prev, rtol=1e-5, atol=1e-6)
      moved |= np.abs(k_cur - (m * k_prev + (1 - m) * q_cur)).max() > 1e-4
  assert moved  # the after-the-step formula would not have matched


# ---- optim.lr_multiplier_rules (Barlow Twins' bias/BN lr) --------------------------------------

def test_lr_multiplier_rules_scale_only_matching_params():
  params = {"layer": {"kernel": jnp.ones((4, 4)), "bias": jnp.ones((4,))},
            "bn": {"scale": jnp.ones((4,)), "bias": jnp.zeros((4,))}}
  grads = jax.tree.map(lambda p: jnp.arange(p.size, dtype=jnp.float32).reshape(p.shape) + 1.0,
                       params)
  base = dict(name="lars", lr=0.5, weight_decay=1e-3, momentum=0.9, warmup_steps=0)
  factor = 0.0048 / 0.2

  def first_update(**kw):
    schedule = durations.Schedule(total_steps=10, steps_per_epoch=1.0, global_batch_size=256)
    tx, _ = optim.build(ConfigDict(dict(base, **kw)), params, schedule)
    return tx.update(grads, tx.init(params), params)[0]

  plain = first_update()
  scaled = first_update(lr_multiplier_rules=((r"/(bias|scale)$", factor),))
  np.testing.assert_allclose(scaled["layer"]["kernel"], plain["layer"]["kernel"], rtol=1e-6)
  for path in (("layer", "bias"), ("bn", "scale"), ("bn", "bias")):
    g = np.asarray(grads[path[0]][path[1]])
    # 1-D params: no decay, no trust ratio, first momentum step = g: update = -lr * factor * g.
    np.testing.assert_allclose(scaled[path[0]][path[1]], -0.5 * factor * g, rtol=1e-6)

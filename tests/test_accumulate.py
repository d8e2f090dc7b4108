"""config.microbatches: gradient caching equals the full-batch gradient; accumulation's state rule."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from ml_collections import ConfigDict

from configs import clip_vitb16, dino_vits16, mocov2_r50, siglip_vitb16, unicl_vitb16
from sslvl_jax import accumulate, durations, parallel, rngs, train
from sslvl_jax.errors import ConfigError
from sslvl_jax.methods.base import Method, TrainState


def test_split_keeps_rows_on_their_device_and_merge_inverts_it():
  n, k, m = 4, 3, 2  # 4 devices, 3 micro-batches of 2 rows per device
  x = np.arange(n * k * m)
  micro = np.asarray(accumulate.split(jnp.asarray(x), k, n))
  share = x.reshape(n, k * m)  # device d holds share[d]
  for j in range(k):  # micro-batch j = rows [j*m, (j+1)*m) of every device's share, device-major
    np.testing.assert_array_equal(micro[j], share[:, j * m:(j + 1) * m].ravel())
  np.testing.assert_array_equal(np.asarray(accumulate.merge(jnp.asarray(micro), n)), x)
  with pytest.raises(ConfigError, match="microbatches=5"):
    accumulate.check_microbatches(24, 4, 5)


def _grads(s, k, batch, rng):
  fn = jax.jit(accumulate.value_and_grad(s.method, k, s.mesh))
  (loss, (m, _, _)), grads = fn(s.state.params, s.state, batch, rng)
  return float(loss), jax.device_get(m), jax.device_get(grads)


def _assert_trees_close(a, b, rtol=1e-5):
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    x, y = np.asarray(x), np.asarray(y)
    np.testing.assert_allclose(x, y, rtol=rtol, atol=rtol * max(np.abs(y).max(), 1e-12),
                               err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("recipe,ks,fsdp", [(clip_vitb16, (4,), 1), (siglip_vitb16, (2,), 1),
                                            (unicl_vitb16, (4,), 4)])
def test_gradient_caching_equals_the_full_batch_gradient(tmp_path, recipe, ks, fsdp):
  c = recipe.get_config("smoke")
  c.global_batch_size = 32  # 4 examples per device on 8 devices
  c.mesh.fsdp = fsdp  # 4: parameters sharded, the gradient sums stay on their shards
  s = train.setup(c, str(tmp_path))
  if fsdp > 1:
    assert any("fsdp" in str(x.sharding.spec) for x in jax.tree.leaves(s.state.params))
  assert s.method.has_embedding_loss()
  batch, rng = next(s.batches), jax.random.key(1)
  loss1, m1, g1 = _grads(s, 1, batch, rng)
  scale = [p for p in jax.tree_util.tree_leaves_with_path(g1) if "logit_scale" in str(p[0])]
  assert scale and abs(float(scale[0][1])) > 0  # the temperature really gets a gradient
  for k in ks:
    loss_k, m_k, g_k = _grads(s, k, batch, rng)
    np.testing.assert_allclose(loss_k, loss1, rtol=1e-6)
    _assert_trees_close(g_k, g1)  # temperature (and SigLIP's bias) included: not k times larger
    _assert_trees_close(m_k, m1)


class _Toy(nnx.Module):
  def __init__(self, rngs):
    self.lin = nnx.Linear(3, 2, rngs=rngs)
    self.bn = nnx.BatchNorm(3, momentum=0.9, use_bias=False, use_scale=False, rngs=rngs)


class _ToyMethod(Method):
  """Mean squared error after BatchNorm, and a DINO-like centre of the outputs in the extras."""

  def build_model(self, rngs):
    return _Toy(rngs)

  def init_extras(self, params, model_state, rng):
    return {"center": jnp.zeros(2), "count": jnp.int32(0)}

  def loss(self, model, extras, batch, ctx):
    y = model.lin(model.bn(batch["x"], use_running_average=False))
    center = 0.9 * extras["center"] + 0.1 * y.mean(0)  # from the step's centre, like DINO's
    loss = jnp.mean(jnp.square(y - extras["center"]))
    return loss, {"y_mean": y.mean()}, {"center": center, "count": extras["count"] + 1}


def test_accumulation_state_rule_running_means_and_centre_as_one_batch():
  mesh = parallel.make_mesh()
  n, k = mesh.devices.size, 4
  method = _ToyMethod(ConfigDict(), mesh, durations.Schedule(1, 1.0, 8 * k))
  params, model_state = method.init_model(jax.random.key(0))
  extras = method.init_extras(params, model_state, None)
  extras["center"] = jnp.array([0.3, -0.2])
  state = TrainState(jnp.int32(0), params, None, model_state, extras)
  x = np.random.default_rng(0).normal(size=(n * k * 2, 3)).astype(np.float32) * [1, 2, 3] + 1
  batch = {"x": jnp.asarray(x)}
  fn = jax.jit(accumulate.value_and_grad(method, k, mesh))
  (_, (_, ms, ex)), _ = fn(params, state, batch, jax.random.key(0))
  (_, (_, ms1, ex1)), _ = jax.jit(accumulate.value_and_grad(method, 1, mesh))(
      params, state, batch, jax.random.key(0))
  # the centre moves by the mean output of the whole batch, as with one batch ...
  np.testing.assert_allclose(ex["center"], ex1["center"], rtol=1e-5, atol=1e-6)
  assert int(ex["count"]) == 1  # ... and integer state is one step's, not k
  # BN: running mean = full batch's; running var = mean of the micro-batch variances
  micro = np.asarray(accumulate.split(jnp.asarray(x), k, n))
  np.testing.assert_allclose(ms["bn"]["mean"][...], ms1["bn"]["mean"][...], rtol=1e-5, atol=1e-6)
  want_var = 0.9 + 0.1 * np.mean([m.var(0, ddof=0) for m in micro], axis=0)
  np.testing.assert_allclose(ms["bn"]["var"][...], want_var, rtol=1e-5)


def _one_step(recipe, k, tmp_path):
  """The state after one train step of the recipe's smoke config with k micro-batches, and the
  state it started from (same seed and batch for every k). The photometric augmentation is made
  deterministic (normalisation only): micro-batch i draws its own keys, so random colour jitter
  would differ between k = 1 and k = 2."""
  c = recipe.get_config("smoke")
  c.global_batch_size, c.microbatches, c.total_steps, c.log_every_steps = 32, k, 2, 1
  for group in c.augment:
    c.augment[group] = ("clip",)
  s = train.setup(c, str(tmp_path / f"k{k}"))
  start = jax.device_get(s.state)
  step = train.make_train_step(s.method, s.tx, s.lr_schedule, s.mesh)
  state, m = step(s.state, next(s.batches), rngs.seed_key(0))
  s.batches.close()
  return start, jax.device_get(state), jax.device_get(m)


@pytest.mark.slow  # ~20 s each, mostly compilation
def test_moco_teacher_takes_one_ema_step_per_step_with_microbatches(tmp_path):
  """MoCo v2 (gradient caching through the queue and shuffle BN): the key encoder's EMA runs
  once before the micro-batches, so the teacher after the step is bitwise the one-batch teacher,
  and the queue receives the whole batch once."""
  start, one, _ = _one_step(mocov2_r50, 1, tmp_path)
  _, two, m = _one_step(mocov2_r50, 2, tmp_path)
  assert np.isfinite(m["train/loss"]) and m["train/rankme"] > 1
  for a, b in zip(jax.tree.leaves(one.extras["teacher"]["ema"]),
                  jax.tree.leaves(two.extras["teacher"]["ema"])):
    np.testing.assert_array_equal(a, b)
  assert int(two.extras["queue_ptr"]) == int(one.extras["queue_ptr"]) == 32
  unchanged = np.asarray(start.extras["queue"])[32:]  # the rest of the ring is untouched
  np.testing.assert_array_equal(np.asarray(two.extras["queue"])[32:], unchanged)


@pytest.mark.slow
def test_dino_centre_with_microbatches_is_the_full_batch_formula(tmp_path):
  """DINO (accumulation, multi-crop): the centre after a step with 2 micro-batches is
  m c + (1 - m) mean(teacher outputs of the whole batch), the value of the one-batch step."""
  start, one, _ = _one_step(dino_vits16, 1, tmp_path)
  _, two, m = _one_step(dino_vits16, 2, tmp_path)
  assert np.isfinite(m["train/loss"])
  assert not np.allclose(one.extras["center"], start.extras["center"])  # it moved
  np.testing.assert_allclose(two.extras["center"], one.extras["center"], rtol=1e-5, atol=1e-7)

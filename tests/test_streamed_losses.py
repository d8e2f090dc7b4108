"""Streamed (chunk_size > 0) contrastive losses equal the dense ones, use less memory, and SigLIP's
ring loop does not grow the program with the device count."""

from __future__ import annotations

import functools
import re
from typing import Any, Callable

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from sslvl_jax import losses
from tests.test_losses import normed, raw, scalar

D = 8
BATCH, REP = P("data"), P()


def data_mesh(n_dev: int = 8) -> jax.sharding.Mesh:
  """A 1-D ("data",) mesh over the first `n_dev` devices."""
  return jax.make_mesh((n_dev,), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=jax.devices()[:n_dev])


def sharded(fn: Callable[..., Any], specs: tuple, n_dev: int = 8, **kw: Any) -> Callable[..., Any]:
  """`fn` on `data_mesh(n_dev)`, collectives over "data", replicated output."""
  return jax.shard_map(functools.partial(fn, axis_name="data", **kw), mesh=data_mesh(n_dev),
                       in_specs=specs, out_specs=P())


# (name, loss, make(rng, n) -> args, specs, float args, kwargs, global batch, chunk_size)
CASES = [
    ("clip", losses.clip_loss, lambda r, n: (normed(r, n), normed(r, n), scalar(10.0)),
     (BATCH, BATCH, REP), (0, 1, 2), {}, 64, 16),
    # 96 rows over 8 devices: chunks of 32 neither divide nor are divided by the local batch of 12.
    ("align", losses.clip_loss, lambda r, n: (normed(r, n), normed(r, n), scalar(10.0)),
     (BATCH, BATCH, REP), (0, 1, 2), {"label_smoothing": 0.1}, 96, 32),
    ("unicl", losses.unicl_loss,
     lambda r, n: (normed(r, n), normed(r, n), r.integers(0, 7, n).astype(np.int32), scalar(10.0)),
     (BATCH,) * 3 + (REP,), (0, 1, 3), {}, 96, 32),
    ("nt_xent", losses.nt_xent_loss, lambda r, n: (normed(r, n), normed(r, n), scalar(0.2)),
     (BATCH, BATCH, REP), (0, 1, 2), {}, 64, 16),
    ("moco_v3", losses.moco_v3_loss,
     lambda r, n: tuple(raw(r, n, D) for _ in range(4)) + (scalar(0.2),), (BATCH,) * 4 + (REP,),
     (0, 1, 2, 3, 4), {}, 64, 4),
    # SigLIP chunks split each device's (8, 8) block into (8, 4) pieces.
    ("siglip", losses.siglip_loss,
     lambda r, n: (normed(r, n), normed(r, n), scalar(10.0), scalar(-5.0)),
     (BATCH,) * 2 + (REP,) * 2, (0, 1, 2, 3), {}, 64, 4),
]


def assert_streamed_equals_dense(dense_fn, streamed_fn, args, floats, name):
  both = jax.jit(lambda *a: (jax.value_and_grad(dense_fn, argnums=floats)(*a),
                             jax.value_and_grad(streamed_fn, argnums=floats)(*a)))
  (value, grads), (s_value, s_grads) = both(*args)
  np.testing.assert_allclose(s_value, value, rtol=1e-5, atol=1e-5, err_msg=f"{name} value")
  for i, g, sg in zip(floats, grads, s_grads):
    np.testing.assert_allclose(sg, g, rtol=1e-5, atol=1e-5, err_msg=f"{name} gradient of input {i}")


@pytest.mark.parametrize("case", CASES, ids=lambda c: c[0])
def test_streamed_equals_dense_on_8_devices(case):
  name, loss, make, specs, floats, kw, n, chunk = case
  args = make(np.random.default_rng(0), n)
  assert_streamed_equals_dense(sharded(loss, specs, **kw),
                               sharded(loss, specs, chunk_size=chunk, **kw), args, floats, name)


def test_streamed_equals_dense_on_one_device():
  rng = np.random.default_rng(1)
  args = (normed(rng, 64), normed(rng, 64), scalar(10.0))
  assert_streamed_equals_dense(functools.partial(losses.clip_loss, label_smoothing=0.1),
                               functools.partial(losses.clip_loss, label_smoothing=0.1,
                                                 chunk_size=16), args, (0, 1, 2), "clip 1 device")


@pytest.mark.parametrize("loss", [losses.clip_loss, losses.siglip_loss], ids=["clip", "siglip"])
def test_streamed_over_two_mesh_axes_equals_single_device(loss):
  """axis_name a tuple (data, fsdp) on a 4 x 2 mesh: positives and ring order use its flat index."""
  rng = np.random.default_rng(4)
  args = (normed(rng, 64), normed(rng, 64), scalar(10.0))
  args += (scalar(-5.0),) if loss is losses.siglip_loss else ()
  axes = ("data", "fsdp")
  mesh = jax.make_mesh((4, 2), axes, axis_types=(jax.sharding.AxisType.Auto,) * 2)
  specs = (P(axes),) * 2 + (REP,) * (len(args) - 2)
  streamed = jax.shard_map(functools.partial(loss, axis_name=axes, chunk_size=4), mesh=mesh,
                           in_specs=specs, out_specs=P())
  assert_streamed_equals_dense(loss, streamed, args, tuple(range(len(args))), "two mesh axes")


def test_chunk_size_must_divide_the_batch():
  rng = np.random.default_rng(2)
  img, txt = normed(rng, 64), normed(rng, 64)
  with pytest.raises(ValueError, match="chunk_size=24 does not divide the global batch of 64"):
    losses.clip_loss(img, txt, scalar(10.0), chunk_size=24)
  with pytest.raises(ValueError, match="chunk_size=3 does not divide the local batch"):
    sharded(losses.siglip_loss, (BATCH,) * 2 + (REP,) * 2, chunk_size=3)(
        img, txt, scalar(10.0), scalar(-5.0))


def grad_temp_bytes(loss, specs, args, floats, **kw) -> int:
  """Per-device temporary bytes of the compiled jit(grad(loss)) on the 8-device mesh."""
  shapes = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(data_mesh(), spec))
            for a, spec in zip(args, specs)]
  fn = jax.jit(jax.grad(sharded(loss, specs, **kw), argnums=floats))
  return fn.lower(*shapes).compile().memory_analysis().temp_size_in_bytes


def test_streamed_clip_needs_less_than_half_the_memory():
  n, d = 4096, 64
  args = (np.zeros((n, d), np.float32), np.zeros((n, d), np.float32), scalar(10.0))
  specs = (BATCH, BATCH, REP)
  dense = grad_temp_bytes(losses.clip_loss, specs, args, (0, 1, 2))
  streamed = grad_temp_bytes(losses.clip_loss, specs, args, (0, 1, 2), chunk_size=128)
  assert streamed < dense / 2, (f"streamed/dense temporaries {streamed / dense:.3f} "
                                f"({streamed} B vs {dense} B)")


def test_siglip_program_does_not_grow_with_devices():
  rng = np.random.default_rng(3)
  specs = (BATCH,) * 2 + (REP,) * 2

  def ppermutes(n_dev: int) -> int:
    args = (normed(rng, 8 * n_dev), normed(rng, 8 * n_dev), scalar(10.0), scalar(-5.0))
    text = jax.jit(jax.value_and_grad(sharded(losses.siglip_loss, specs, n_dev),
                                      argnums=(0, 1, 2, 3))).lower(*args).as_text()
    return len(re.findall(r"collective_permute", text))

  two, eight = ppermutes(2), ppermutes(8)
  assert two == eight and two > 0, f"collective_permutes: {two} on 2 devices, {eight} on 8"

"""Losses: values against numpy formulas on the global batch; 8-device shard_map vs single device.

Every reference below is written once against an array namespace `xp`: with numpy (float64) it gives
the value, with jax.numpy its gradient is the single-device plain-jnp reference gradient.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from sslvl_jax import losses, parallel

B, D, K_QUEUE, N_CROPS = 16, 8, 32, 4
BATCH, REP, CROPS = P(parallel.BATCH_AXES), P(), P(None, parallel.BATCH_AXES)


def sharded(fn: Callable[..., Any], specs: tuple, **kw: Any) -> Callable[..., Any]:
  """`fn` on the 8-device mesh, inputs split by `specs`, collectives over 'data', replicated output."""
  return jax.shard_map(functools.partial(fn, axis_name=parallel.BATCH_AXES, **kw),
                       mesh=parallel.make_mesh(), in_specs=specs, out_specs=P())


# ---- references (xp = numpy or jax.numpy) -----------------------------------------------------


def log_softmax(xp, a):
  a = a - a.max(axis=-1, keepdims=True)
  return a - xp.log(xp.exp(a).sum(axis=-1, keepdims=True))


def unit(xp, a):
  return a / xp.sqrt((a * a).sum(axis=-1, keepdims=True))


def off_diag_sq(xp, c):
  return (c ** 2).sum() - (xp.diagonal(c) ** 2).sum()


def clip_ref(xp, img, txt, scale, label_smoothing=0.0):
  def ce(logits):
    lp = log_softmax(xp, logits)
    return (-(1 - label_smoothing) * xp.diagonal(lp) - label_smoothing * lp.mean(axis=-1)).mean()
  logits = scale * img @ txt.T
  return (ce(logits) + ce(logits.T)) / 2


def siglip_ref(xp, img, txt, t, b):
  z = 2 * xp.eye(img.shape[0]) - 1
  return xp.logaddexp(0.0, -z * (t * img @ txt.T + b)).sum() / img.shape[0]


def nt_xent_ref(xp, z1, z2, temperature):
  """Textbook 2N x 2N form: each of the 2N views against all others, positive = its other view."""
  n = z1.shape[0]
  z = xp.concatenate([z1, z2])
  lp = log_softmax(xp, z @ z.T / temperature - 1e9 * xp.eye(2 * n))
  pos = xp.concatenate([xp.arange(n) + n, xp.arange(n)])
  return -lp[xp.arange(2 * n), pos].sum() / n


def byol_ref(xp, p1, p2, z1, z2):
  def reg(x, y):
    return ((unit(xp, x) - unit(xp, y)) ** 2).sum(axis=-1)
  return (reg(p1, z2) + reg(p2, z1)).mean()


def simsiam_ref(xp, p1, p2, z1, z2):
  def cos(x, y):
    return (unit(xp, x) * unit(xp, y)).sum(axis=-1).mean()
  return -(cos(p1, z2) + cos(p2, z1)) * 0.5


def moco_v3_ref(xp, q1, q2, k1, k2, temperature):
  def ctr(q, k):
    lp = log_softmax(xp, unit(xp, q) @ unit(xp, k).T / temperature)
    return -xp.diagonal(lp).mean() * 2 * temperature
  return ctr(q1, k2) + ctr(q2, k1)


def moco_queue_ref(xp, q, k, queue, temperature):
  logits = xp.concatenate([(q * k).sum(axis=-1, keepdims=True), q @ queue.T], axis=1)
  return -log_softmax(xp, logits / temperature)[:, 0].mean()


def dino_ref(xp, s, t, c, student_temp, teacher_temp, n_global_crops):
  total, n = 0.0, 0
  for iq in range(n_global_crops):
    q = xp.exp(log_softmax(xp, (t[iq] - c) / teacher_temp))
    for v in range(s.shape[0]):
      if v != iq:
        total, n = total - (q * log_softmax(xp, s[v] / student_temp)).sum(axis=-1).mean(), n + 1
  return total / n


def barlow_ref(xp, z1, z2, lambd):
  def bn(z):
    return (z - z.mean(axis=0)) / xp.sqrt(z.var(axis=0) + 1e-5)
  c = bn(z1).T @ bn(z2) / z1.shape[0]
  return ((xp.diagonal(c) - 1) ** 2).sum() + lambd * off_diag_sq(xp, c)


def vicreg_ref(xp, x, y):
  def std_cov(z):
    z = z - z.mean(axis=0)
    std = xp.sqrt(z.var(axis=0, ddof=1) + 1e-4)
    cov = z.T @ z / (z.shape[0] - 1)
    return xp.maximum(0.0, 1 - std).mean() / 2, off_diag_sq(xp, cov) / z.shape[1]
  (sx, cx), (sy, cy) = std_cov(x), std_cov(y)
  return 25 * ((x - y) ** 2).mean() + 25 * (sx + sy) + (cx + cy)


def unicl_ref(xp, img, txt, labels, scale):
  pos = labels[:, None] == labels[None, :]
  targets = pos / pos.sum(axis=1, keepdims=True)
  logits = scale * img @ txt.T
  def ce(lg):
    return -(targets * log_softmax(xp, lg)).sum(axis=1).mean()
  return (ce(logits) + ce(logits.T)) / 2


# ---- inputs ------------------------------------------------------------------------------------


def raw(rng, *shape):
  return rng.standard_normal(shape or (B, D)).astype(np.float32)


def normed(rng, n=B):
  return unit(np, raw(rng, n, D))


def scalar(v):
  return np.float32(v)


@dataclasses.dataclass(frozen=True)
class Case:
  """One loss, its reference, an input generator, the shard_map in_specs and hyper-parameters."""
  name: str
  loss: Callable[..., jax.Array]
  ref: Callable[..., Any]
  make: Callable[[np.random.Generator], tuple]
  specs: tuple
  online: tuple[int, ...]  # inputs with gradient; other float inputs must get exactly zero
  kw: dict = dataclasses.field(default_factory=dict)


CASES = [
    Case("clip", losses.clip_loss, clip_ref, lambda r: (normed(r), normed(r), scalar(10.0)),
         (BATCH, BATCH, REP), (0, 1, 2)),
    Case("align", losses.clip_loss, clip_ref, lambda r: (normed(r), normed(r), scalar(10.0)),
         (BATCH, BATCH, REP), (0, 1, 2), {"label_smoothing": 0.1}),
    Case("siglip", losses.siglip_loss, siglip_ref,
         lambda r: (normed(r), normed(r), scalar(10.0), scalar(-5.0)), (BATCH,) * 2 + (REP,) * 2,
         (0, 1, 2, 3)),
    Case("nt_xent", losses.nt_xent_loss, nt_xent_ref, lambda r: (normed(r), normed(r)),
         (BATCH, BATCH), (0, 1), {"temperature": 0.2}),
    Case("byol", losses.byol_loss, byol_ref, lambda r: tuple(raw(r) for _ in range(4)),
         (BATCH,) * 4, (0, 1)),
    Case("simsiam", losses.simsiam_loss, simsiam_ref, lambda r: tuple(raw(r) for _ in range(4)),
         (BATCH,) * 4, (0, 1)),
    Case("moco_v3", losses.moco_v3_loss, moco_v3_ref, lambda r: tuple(raw(r) for _ in range(4)),
         (BATCH,) * 4, (0, 1), {"temperature": 0.2}),
    Case("moco_queue", losses.moco_queue_loss, moco_queue_ref,
         lambda r: (normed(r), normed(r), normed(r, K_QUEUE)), (BATCH, BATCH, REP), (0,),
         {"temperature": 0.2}),
    Case("dino", losses.dino_loss, dino_ref,
         lambda r: (raw(r, N_CROPS, B, D), raw(r, 2, B, D), 0.1 * raw(r, D)), (CROPS, CROPS, REP),
         (0,), {"student_temp": 0.1, "teacher_temp": 0.04, "n_global_crops": 2}),
    Case("barlow_twins", losses.barlow_twins_loss, barlow_ref, lambda r: (raw(r), raw(r)),
         (BATCH, BATCH), (0, 1), {"lambd": 0.0051}),
    # Per-dimension scales so that the std hinge is active on some dimensions only.
    Case("vicreg", losses.vicreg_loss, vicreg_ref,
         lambda r: tuple(raw(r) * r.uniform(0.3, 1.7, D).astype(np.float32) for _ in range(2)),
         (BATCH, BATCH), (0, 1)),
    Case("unicl", losses.unicl_loss, unicl_ref,
         lambda r: (normed(r), normed(r), r.integers(0, 5, B).astype(np.int32), scalar(10.0)),
         (BATCH,) * 3 + (REP,), (0, 1, 3)),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_loss_global_batch_value_and_gradients(case: Case):
  args = case.make(np.random.default_rng(0))
  expected = case.ref(np, *[a.astype(np.float64) for a in args], **case.kw)

  single = case.loss(*args, **case.kw)
  np.testing.assert_allclose(single, expected, rtol=1e-5, atol=1e-6, err_msg="single vs numpy")

  floats = tuple(i for i, a in enumerate(args) if np.issubdtype(a.dtype, np.floating))
  value, grads = jax.jit(jax.value_and_grad(sharded(case.loss, case.specs, **case.kw),
                                            argnums=floats))(*args)
  np.testing.assert_allclose(value, single, rtol=1e-5, atol=1e-6, err_msg="sharded vs single")

  ref_grads = jax.grad(lambda *a: case.ref(jnp, *a, **case.kw), argnums=case.online)(*args)
  ref_grads = dict(zip(case.online, ref_grads))
  for i, g in zip(floats, grads):
    want = ref_grads.get(i, np.zeros_like(args[i]))
    np.testing.assert_allclose(g, want, rtol=1e-4, atol=1e-5, err_msg=f"gradient of input {i}")


def test_unicl_equals_clip_when_labels_are_distinct():
  rng = np.random.default_rng(1)
  img, txt, scale = normed(rng), normed(rng), scalar(14.0)
  labels = rng.permutation(B).astype(np.int32)
  np.testing.assert_allclose(losses.unicl_loss(img, txt, labels, scale),
                             losses.clip_loss(img, txt, scale), rtol=1e-7, atol=0)
  np.testing.assert_allclose(
      sharded(losses.unicl_loss, (BATCH,) * 3 + (REP,))(img, txt, labels, scale),
      sharded(losses.clip_loss, (BATCH, BATCH, REP))(img, txt, scale), rtol=1e-6, atol=0)


def test_byol_range_endpoints():
  rng = np.random.default_rng(2)
  p1, p2 = raw(rng), raw(rng)
  np.testing.assert_allclose(losses.byol_loss(p1, p2, 3 * p2, 0.5 * p1), 0.0, atol=1e-5)
  np.testing.assert_allclose(losses.byol_loss(p1, p2, -p2, -2 * p1), 8.0, rtol=1e-6)
  assert 0.0 < float(losses.byol_loss(p1, p2, raw(rng), raw(rng))) < 8.0


def test_moco_enqueue_is_a_fifo_ring():
  batches = [np.full((B, D), i + 1, np.float32) for i in range(4)]
  queue, ptr = jnp.zeros((3 * B, D)), jnp.int32(0)
  enqueue = jax.jit(losses.moco_enqueue)
  for keys in batches[:3]:
    queue, ptr = enqueue(queue, keys, ptr)
  np.testing.assert_array_equal(queue, np.concatenate(batches[:3]))
  assert int(ptr) == 0
  queue, ptr = enqueue(queue, batches[3], ptr)  # wraps around: the oldest block is overwritten
  np.testing.assert_array_equal(queue, np.concatenate([batches[3], batches[1], batches[2]]))
  assert int(ptr) == B
  with pytest.raises(ValueError, match="divisible"):
    losses.moco_enqueue(jnp.zeros((40, D)), batches[0], jnp.int32(0))


def test_dino_center_update_uses_global_mean_over_both_global_crops():
  rng = np.random.default_rng(3)
  center, teacher = raw(rng, D), raw(rng, 2, B, D)
  new = sharded(losses.dino_center_update, (REP, CROPS), momentum=0.9)(center, teacher)
  np.testing.assert_allclose(new, 0.9 * center + 0.1 * teacher.mean(axis=(0, 1)), rtol=1e-6,
                             atol=1e-6)


def test_dino_monitors_entropy_kl_and_top_mass():
  rng = np.random.default_rng(4)
  student, teacher, center = raw(rng, N_CROPS, B, D), raw(rng, 2, B, D), 0.1 * raw(rng, D)
  temps = {"student_temp": 0.1, "teacher_temp": 0.07}
  got = sharded(losses.dino_monitors, (CROPS, CROPS, REP), **temps)(student, teacher, center)
  log_q = log_softmax(np, (teacher.astype(np.float64) - center) / 0.07)
  log_p = log_softmax(np, student.astype(np.float64) / 0.1)
  q = np.exp(log_q)
  kls = [(q[iq] * (log_q[iq] - log_p[v])).sum(-1).mean()
         for iq in range(2) for v in range(N_CROPS) if v != iq]
  np.testing.assert_allclose(got["teacher_entropy"], -(q * log_q).sum(-1).mean(), rtol=1e-5)
  np.testing.assert_allclose(got["kl_teacher_student"], np.mean(kls), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(got["teacher_top_mass"], q.mean(axis=(0, 1)).max(), rtol=1e-5)


def test_dino_rejects_mismatched_global_crops():
  rng = np.random.default_rng(5)
  with pytest.raises(ValueError, match="global crops"):
    losses.dino_loss(raw(rng, N_CROPS, B, D), raw(rng, 2, B, D), np.zeros(D, np.float32), 0.1,
                     0.04, n_global_crops=3)

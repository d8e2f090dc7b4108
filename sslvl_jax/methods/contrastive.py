"""Contrastive and redundancy-reduction methods: SimCLR, MoCo v2, MoCo v3, Barlow Twins, VICReg.

All five read two views of crop group 0 and push each through the backbone and a chain of heads
(`encode_views`). SimCLR, Barlow Twins and VICReg are a pair loss on the two projections; the
MoCo methods add a momentum key encoder whose EMA step runs BEFORE the key forward pass.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sslvl_jax import losses
from sslvl_jax.errors import ConfigError
from sslvl_jax.methods import METHODS
from sslvl_jax.methods.base import StepContext
from sslvl_jax.methods.ssl import (DATA, SSLMethod, TeacherMixin, collapse_monitors, global_batch,
                                   head_out_dim)
from sslvl_jax.methods.teacher_student import run_state
from sslvl_jax.models import l2_normalize


def encode(model: nnx.Module, images: jax.Array, heads: Sequence[str], bn_groups: int = 1
           ) -> jax.Array:
  """Training-mode backbone features of `images` through `heads` in order (projector, predictor).

  bn_groups > 1: the backbone's BatchNorm statistics are taken per run of b/bn_groups consecutive
  examples (ResNet ghost BN), as MoCo v2's per-GPU BN.
  """
  kw = {"bn_groups": bn_groups} if bn_groups > 1 else {}
  x = model.backbone(images, train=True, **kw)["pooled"]
  for name in heads:
    x = getattr(model, name)(x, train=True)
  return x


def encode_views(model: nnx.Module, views: Sequence[jax.Array], heads: Sequence[str], *,
                 joint: bool = False) -> list[jax.Array]:
  """`encode` of each view: separate forwards (per-view BN), or one forward over all views (joint).

  joint=True is SimCLR's reference (views concatenated along the batch, BN statistics over 2N).
  The views are interleaved per example, not concatenated, so each device keeps its own rows and
  the reshape needs no communication; batch statistics do not depend on the order.
  """
  if not joint:
    return [encode(model, v, heads) for v in views]
  b, n = views[0].shape[0], len(views)
  out = encode(model, jnp.stack(views, 1).reshape(b * n, *views[0].shape[1:]), heads)
  out = out.reshape(b, n, *out.shape[1:])
  return [out[:, i] for i in range(n)]


def shuffled(fn: Callable[[jax.Array], jax.Array], images: jax.Array, key: jax.Array,
             mesh: Any) -> jax.Array:
  """fn on the global batch permuted by `jax.random.permutation(key, n)`, rows put back in order.

  MoCo's shuffle BN: with per-device (grouped) BN statistics, a key is normalised with a random
  set of other examples instead of the ones its query was normalised with.
  """
  perm = jax.random.permutation(key, images.shape[0])
  rows = NamedSharding(mesh, DATA)
  out = fn(jax.lax.with_sharding_constraint(images[perm], rows))
  return jax.lax.with_sharding_constraint(out[jnp.argsort(perm)], rows)


class TwoViewMethod(SSLMethod):
  """Base of the two-view methods: crop group 0's two views through the backbone and `heads`."""

  heads: tuple[str, ...] = ("projector",)
  joint_views: bool = False

  def embed(self, model: nnx.Module, batch: dict, rng: jax.Array) -> list[jax.Array]:
    """[head output of view 1, of view 2]."""
    return encode_views(model, self.views(batch, 0, rng), self.heads, joint=self.joint_views)


class PairLossMethod(TwoViewMethod):
  """A global-batch loss of the two projections; `config.loss` holds its keyword arguments."""

  pair_loss: Callable[..., jax.Array]
  normalize_embeddings: bool = False

  def embeddings(self, model: nnx.Module, extras: Any, batch: dict, ctx: StepContext):
    z1, z2 = self.embed(model, batch, ctx.stream("augment"))
    if self.normalize_embeddings:
      z1, z2 = l2_normalize(z1), l2_normalize(z2)
    return (z1, z2), extras

  def embedding_loss(self, model: nnx.Module, extras: Any, emb: Any, batch: dict,
                     ctx: StepContext):
    fn = functools.partial(self.pair_loss, **self.config.loss.to_dict())
    return (global_batch(fn, self.mesh, DATA, DATA)(*emb), collapse_monitors(emb[0], ctx.monitor),
            extras)


@METHODS.register("simclr")
class SimCLR(PairLossMethod):
  """SimCLR: NT-Xent (temperature `loss.temperature`) over 2N views; both views in one forward."""

  pair_loss = staticmethod(losses.nt_xent_loss)
  normalize_embeddings = True
  joint_views = True


@METHODS.register("barlow_twins")
class BarlowTwins(PairLossMethod):
  """Barlow Twins: cross-correlation of the batch-normalised projections towards the identity."""

  pair_loss = staticmethod(losses.barlow_twins_loss)


@METHODS.register("vicreg")
class VICReg(PairLossMethod):
  """VICReg: invariance (MSE) + variance hinge + covariance penalty of the two projections."""

  pair_loss = staticmethod(losses.vicreg_loss)


class MomentumContrast(TeacherMixin, TwoViewMethod):
  """Base of MoCo: query encoder (the student) + momentum key encoder (the teacher, an EMA).

  The reference updates the key encoder BEFORE computing the keys, with the current query params.
  Here that EMA step is `before_step` (ema_before_loss), on the params the step differentiates,
  once per step however many micro-batches there are, so step t uses
  k_t = m_t k_{t-1} + (1 - m_t) q_t with m_t the schedule at iteration t, exactly as the reference
  (at t = 0 the teacher is a copy, so the first step changes nothing). Doing it in
  `after_update` of the previous step would be the same update, but shifts the schedule index by
  one and skips the no-op step 0. The EMA covers the whole student tree; MoCo v3's teacher copy
  of the predictor is never used.
  """

  ema_before_loss = True

  def key_encoder(self, extras: Any) -> nnx.Module:
    """The key network (the teacher after this step's EMA update, `before_step`)."""
    return self.teacher_model(extras["teacher"])

  def with_teacher(self, extras: Any, key_net: nnx.Module) -> Any:
    """Extras holding the key network's new BN statistics."""
    return {**extras, "teacher": {**extras["teacher"], "state": run_state(key_net)}}

  def monitors(self, queries: jax.Array, extras: Any, ctx: StepContext) -> dict[str, jax.Array]:
    """Collapse monitors of the queries and the teacher momentum."""
    return {**collapse_monitors(queries, ctx.monitor),
            "teacher_momentum": self.teacher_momentum(extras["teacher"])}


@METHODS.register("mocov2")
class MocoV2(MomentumContrast):
  """MoCo v2: InfoNCE of each query against its key and a queue of past keys; not symmetrised.

  extras['queue'] is a (K, d) ring of L2-normalised keys (random unit vectors at init) with its
  write position extras['queue_ptr']; this step's global keys are enqueued after the loss.

  BN (`model.bn_group_size`, the reference's 32 images per GPU): query and key forwards use
  statistics per group of that many consecutive examples of the global batch, and with
  `model.shuffle_bn` the key forward runs on a random permutation of the global batch that is
  undone afterwards (the reference's shuffle BN). Grouped statistics alone are NOT equivalent: the
  key of example i would be normalised with the other views of exactly the examples its query was
  normalised with (or, with global query BN, a subset of them), so the pair shares batch statistics
  that the queued negatives lack, which is the leak shuffle BN removes. A group size of None means
  global (SyncBN) statistics, which is what solo-learn does and what moco#46 warns against.
  """

  def init_extras(self, params: Any, model_state: Any, rng: jax.Array) -> Any:
    k_teacher, k_queue = jax.random.split(rng)
    dim = head_out_dim(self.merge(params, model_state).projector, 0)
    queue = l2_normalize(jax.random.normal(k_queue, (self.config.loss.queue_size, dim)))
    return {**super().init_extras(params, model_state, k_teacher), "queue": queue,
            "queue_ptr": jnp.zeros((), jnp.int32)}

  def bn_groups(self, batch_size: int) -> int:
    """Number of BN groups in the global batch (1: global statistics)."""
    size = self.config.model.get("bn_group_size")
    if not size:
      return 1
    if batch_size % size:
      raise ConfigError(f"model.bn_group_size={size} does not divide the global batch {batch_size}")
    return batch_size // size

  def embeddings(self, model: nnx.Module, extras: Any, batch: dict, ctx: StepContext):
    """(queries, stop-gradient keys), both L2-normalised; extras with the updated teacher."""
    v1, v2 = self.views(batch, 0, ctx.stream("augment"))
    groups = self.bn_groups(v1.shape[0])
    q = l2_normalize(encode(model, v1, self.heads, groups))
    key_net = self.key_encoder(extras)
    key_fn = functools.partial(encode, key_net, heads=self.heads, bn_groups=groups)
    k = key_fn(v2) if not self.config.model.get("shuffle_bn", True) else shuffled(
        key_fn, v2, ctx.stream("method"), self.mesh)
    return (q, jax.lax.stop_gradient(l2_normalize(k))), self.with_teacher(extras, key_net)

  def embedding_loss(self, model: nnx.Module, extras: Any, emb: Any, batch: dict,
                     ctx: StepContext):
    q, k = emb
    loss = global_batch(losses.moco_queue_loss, self.mesh, DATA, DATA, P(), P())(
        q, k, extras["queue"], self.config.loss.temperature)
    queue, ptr = losses.moco_enqueue(extras["queue"], k, extras["queue_ptr"])
    return loss, self.monitors(q, extras, ctx), {**extras, "queue": queue, "queue_ptr": ptr}


@METHODS.register("mocov3")
class MocoV3(MomentumContrast):
  """MoCo v3: queries predictor(projector(x)), keys from the momentum projector, no queue.

  ctr(q1, k2) + ctr(q2, k1), each scaled by 2T (losses.moco_v3_loss); SyncBN (global statistics),
  each view in its own forward as the reference.
  """

  heads = ("projector", "predictor")

  def embeddings(self, model: nnx.Module, extras: Any, batch: dict, ctx: StepContext):
    """(q1, q2, k1, k2): raw queries and stop-gradient keys; extras with the updated teacher."""
    views = self.views(batch, 0, ctx.stream("augment"))
    q1, q2 = encode_views(model, views, self.heads)
    key_net = self.key_encoder(extras)
    k1, k2 = (jax.lax.stop_gradient(k) for k in encode_views(key_net, views, ("projector",)))
    return (q1, q2, k1, k2), self.with_teacher(extras, key_net)

  def embedding_loss(self, model: nnx.Module, extras: Any, emb: Any, batch: dict,
                     ctx: StepContext):
    fn = functools.partial(losses.moco_v3_loss, chunk_size=self.config.loss.get("chunk_size", 0))
    loss = global_batch(fn, self.mesh, DATA, DATA, DATA, DATA, P())(
        *emb, self.config.loss.temperature)
    return loss, self.monitors(emb[0], extras, ctx), extras

"""Self-distillation without negatives: BYOL, SimSiam and DINO."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from sslvl_jax import losses, metrics, parallel
from sslvl_jax.methods import METHODS
from sslvl_jax.methods.base import StepContext
from sslvl_jax.methods.ssl import DATA, SSLMethod, TeacherMixin, collapse_monitors, global_batch


def run_state(module: nnx.Module) -> Any:
  """The non-param variables (BN statistics) of a module after a forward pass."""
  return nnx.split(module, nnx.Param, ...)[2]


def project_predict(model: nnx.Module, views: list[jax.Array]
                    ) -> tuple[list[jax.Array], list[jax.Array]]:
  """(projections, predictions) of each view: backbone -> projector -> predictor, train mode."""
  z = [model.projector(model.features(v, train=True), train=True) for v in views]
  return z, [model.predictor(x, train=True) for x in z]


@METHODS.register("byol")
class Byol(TeacherMixin, SSLMethod):
  """BYOL: online predictor regresses the EMA target's projection of the other view (2 - 2cos, summed)."""

  def loss(self, model: nnx.Module, extras: Any, batch: dict, ctx: StepContext):
    v1, v2 = self.views(batch, 0, ctx.stream("augment"))
    (z1, _), (p1, p2) = project_predict(model, [v1, v2])
    target = self.teacher_model(extras["teacher"])  # train-mode BN with its own statistics
    t1, t2 = (jax.lax.stop_gradient(target.projector(target.features(v, train=True), train=True))
              for v in (v1, v2))
    loss = global_batch(losses.byol_loss, self.mesh, DATA, DATA, DATA, DATA)(p1, p2, t1, t2)
    teacher = {**extras["teacher"], "state": run_state(target)}
    m = {**collapse_monitors(z1, ctx.monitor), "teacher_momentum": self.teacher_momentum(teacher)}
    return loss, m, {**extras, "teacher": teacher}


@METHODS.register("simsiam")
class SimSiam(SSLMethod):
  """SimSiam: predictor vs stop-gradient projection of the other view, no teacher (averaged)."""

  def loss(self, model: nnx.Module, extras: Any, batch: dict, ctx: StepContext):
    (z1, z2), (p1, p2) = project_predict(model, self.views(batch, 0, ctx.stream("augment")))
    fn = lambda *a, axis_name: losses.simsiam_loss(  # noqa: E731
        *a, axis_name=axis_name, stop_gradient=self.config.loss.get("stop_gradient", True))
    loss = global_batch(fn, self.mesh, DATA, DATA, DATA, DATA)(p1, p2, z1, z2)
    return loss, collapse_monitors(z1, ctx.monitor), extras


@METHODS.register("dino")
class Dino(TeacherMixin, SSLMethod):
  """DINO: student matches the centred, sharpened EMA teacher across crops (multi-crop)."""

  def init_extras(self, params: Any, model_state: Any, rng: jax.Array) -> Any:
    out_dim = self.config.model.heads.head.out_dim
    return {**super().init_extras(params, model_state, rng),
            "center": jnp.zeros((1, out_dim), jnp.float32)}

  def teacher_temp(self, step: jax.Array) -> jax.Array:
    """Linear warmup per EPOCH (np.linspace over epochs, as the reference), then constant."""
    cfg = self.config.loss
    warm = int(cfg.get("teacher_temp_warmup_epochs", 0))
    if warm <= 0:
      return jnp.float32(cfg.teacher_temp)
    table = jnp.asarray(np.linspace(cfg.warmup_teacher_temp, cfg.teacher_temp, warm), jnp.float32)
    epoch = jnp.floor(step / self.schedule.steps_per_epoch).astype(jnp.int32)
    return jnp.where(epoch < warm, table[jnp.minimum(epoch, warm - 1)], cfg.teacher_temp)

  def logits(self, model: nnx.Module, groups: list[list[jax.Array]], train: bool,
             rng: jax.Array | None) -> jax.Array:
    """(n_crops, b, K): the backbone runs once per resolution group, the head once on all."""
    feats = []
    for g, crops in enumerate(groups):
      r = None if rng is None else jax.random.fold_in(rng, g)
      f = model.features(jnp.concatenate(crops), train=train, rng=r)
      feats.append(f.reshape(len(crops), -1, f.shape[-1]))
    feats = jnp.concatenate(feats)
    n, b, d = feats.shape
    return model.head(feats.reshape(n * b, d), train=train).astype(jnp.float32).reshape(n, b, -1)

  def loss(self, model: nnx.Module, extras: Any, batch: dict, ctx: StepContext):
    k_aug, k_drop = ctx.stream("augment"), ctx.stream("dropout")
    globals_ = self.views(batch, 0, k_aug)
    groups = [globals_] + [self.views(batch, g, k_aug) for g in range(1, self.num_groups(batch))]
    student = self.logits(model, groups, True, k_drop)
    teacher_net = self.teacher_model(extras["teacher"])
    teacher = jax.lax.stop_gradient(self.logits(teacher_net, [globals_], True, None))
    cfg = self.config.loss
    t_temp = self.teacher_temp(ctx.step)
    spec3 = P(None, parallel.BATCH_AXES, None)
    args = (student, teacher, extras["center"], cfg.student_temp, t_temp)
    loss = global_batch(losses.dino_loss, self.mesh, spec3, spec3, P(), P(), P())(*args)
    mon = global_batch(losses.dino_monitors, self.mesh, spec3, spec3, P(), P(), P())
    center = extras["center"]
    if cfg.get("centering", True):  # False: the paper's collapsing ablation (center stays 0)
      center = global_batch(losses.dino_center_update, self.mesh, P(), spec3, P())(
          center, teacher, cfg.center_momentum)
    m = {**metrics.only_when(ctx.monitor, lambda: mon(*args)),
         **collapse_monitors(student[0], ctx.monitor), "teacher_temp": t_temp,
         "teacher_momentum": self.teacher_momentum(extras["teacher"])}
    teacher_state = {**extras["teacher"], "state": run_state(teacher_net)}
    return loss, m, {**extras, "center": center, "teacher": teacher_state}

  @staticmethod
  def num_groups(batch: dict) -> int:
    """Number of crop-size groups in the batch (views0, views1, ...)."""
    return sum(1 for k in batch if k.startswith("views"))

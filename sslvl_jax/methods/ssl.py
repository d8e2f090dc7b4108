"""Shared pieces of the image-only self-supervised methods: model, views, teacher, monitors."""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from sslvl_jax import interop, metrics, models, optim, parallel
from sslvl_jax.data import device_ops
from sslvl_jax.errors import ConfigError
from sslvl_jax.methods.base import Method

DATA = P(parallel.BATCH_AXES)


class SSLModel(nnx.Module):
  """A backbone and its named heads (projector, predictor, DINO head, ...)."""

  def __init__(self, backbone: nnx.Module, heads: dict[str, nnx.Module]):
    self.backbone = backbone
    self.head_names = tuple(heads)
    for name, head in heads.items():
      setattr(self, name, head)

  def features(self, images: jax.Array, *, train: bool, rng: jax.Array | None = None) -> jax.Array:
    """Pooled backbone features (b, d)."""
    return self.backbone(images, train=train, rng=rng)["pooled"]


def global_batch(fn: Callable[..., jax.Array], mesh: Any, *specs: Any) -> Callable[..., jax.Array]:
  """`fn` (a losses.* function) on the global batch: shard_map over the data axis."""
  return parallel.sharded_loss(functools.partial(fn, axis_name=parallel.BATCH_AXES), mesh, specs)


class SSLMethod(Method):
  """Base of the image-only methods: multi-view batches, backbone + heads from the config.

  config.model.backbone: {name, **kwargs} from the model registry; config.model.heads:
  {head_name: {name, input, **kwargs}} from models.HEADS, `input` naming what the head reads
  ('backbone' by default, or another head: the predictor reads the projector). config.augment: {views<g>: (preset, ...)}:
  the device-side photometric preset of each view of crop group g (view i uses preset i mod n).
  """

  example = "multi_view"

  def backbone_config(self) -> dict:
    """JSON-able {'name', 'kwargs'} of the backbone (also written on export)."""
    model = self.config.model
    shared = {"dtype": model.get("dtype", "float32"), "remat": model.get("remat", "none")}
    return {"name": model.backbone.name,
            "kwargs": {**shared, **{k: v for k, v in model.backbone.items() if k != "name"}}}

  def build_backbone(self, rngs: nnx.Rngs) -> nnx.Module:
    """The image backbone (ViT or ResNet) of the config."""
    return interop.build_module(self.backbone_config(), rngs)

  def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
    backbone = self.build_backbone(rngs)
    dims = {"backbone": models.width_of(backbone)}
    heads, pending = {}, dict(self.config.model.heads.items())
    while pending:  # a head reads the backbone or another head (`input`, default the backbone)
      ready = [n for n, c in pending.items() if c.get("input", "backbone") in dims]
      if not ready:
        raise ConfigError(f"model.heads: unresolved inputs {sorted(pending)}; each head's "
                          "`input` must be 'backbone' or another head")
      for name in sorted(ready):
        cfg = pending.pop(name)
        kw = {k: v for k, v in cfg.items() if k not in ("name", "input")}
        heads[name] = models.HEADS.get(cfg.name)(dims[cfg.get("input", "backbone")], rngs=rngs, **kw)
        dims[name] = cfg.get("out_dim", head_out_dim(heads[name], dims["backbone"]))
    return SSLModel(backbone, heads)

  def views(self, batch: dict, group: int, rng: jax.Array) -> list[jax.Array]:
    """The augmented, normalised views of crop group `group`, each (b, h, w, 3) float32."""
    return device_ops.augment_views(batch[f"views{group}"], rng,
                                    tuple(self.config.augment[f"views{group}"]), group)

  def image_features(self, model: nnx.Module, extras: Any, images: jax.Array) -> jax.Array:
    """Pooled backbone features of `model` (the student, or the teacher: `network`)."""
    del extras
    return model.features(self.normalize(images), train=False)

  def predict_fns(self, role: str | None = None) -> dict[str, Callable]:
    """'image_features': pooled backbone features of the network `role` (teacher or student)."""
    return {"image_features": self._predict_fn(self.image_features, self.resolve_role(role))}

  def image_normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) of the first view's preset (what the training views get); (0, 1) for [0, 1]
    inputs. `normalize` (evaluation input scaling) applies it."""
    spec = device_ops.PHOTOMETRIC.get(tuple(self.config.augment.views0)[0])
    if spec.normalize is None:
      return (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    mean, std = device_ops.NORMALIZATIONS.get(spec.normalize)
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)

  def export_encoder(self, params: Any, model_state: Any, extras: Any, *,
                     role: str | None = None) -> tuple[dict, nnx.Module, dict]:
    """The backbone (heads are training-only) of the teacher or student: by default the one
    the evaluators use (`default_role`)."""
    role = self.resolve_role(role)
    net = self.network(self.predict_model(params, model_state), extras, role)
    return (self.backbone_config(), net.backbone,
            {"role": role, "tower": "image", "preprocessing": self.image_preprocessing()})


def head_out_dim(head: nnx.Module, default: int) -> int:
  """Output width of a head module (its last Linear), falling back to `default`."""
  layers = getattr(head, "layers", None)
  return int(layers[-1].out_features) if layers else default


MONITOR_ROWS = 256  # collapse monitors read the first rows of the global batch


def collapse_monitors(z: jax.Array, monitor: jax.Array | bool = True) -> dict[str, jax.Array]:
  """Per-dimension std of the L2-normalised embeddings and their effective rank (RankMe).

  Computed on the first MONITOR_ROWS rows of the global batch and only when `monitor` (train.py:
  on log steps; zeros otherwise), so no step gathers a whole (B, D) batch for an SVD.
  """
  z = jax.lax.stop_gradient(z[:MONITOR_ROWS])
  return metrics.only_when(monitor, lambda: {
      "embed_std": metrics.embedding_std(z), "rankme": metrics.rankme(z),
      "embed_std_healthy": jnp.float32(1.0 / np.sqrt(z.shape[-1]))})


class TeacherMixin:
  """A teacher kept as an optax EMA state of the student params (optim.teacher_ema), in
  extras['teacher']; one EMA step per training step, after the optimiser update (BYOL, DINO) or,
  with `ema_before_loss`, before the loss on the params the step differentiates (MoCo).

  config.teacher: momentum (start, cosine to `momentum_end` over training), init ('copy' or
  'independent': BYOL's reference draws the target with another seed), eval_on_teacher.
  """

  config: Any
  graphdef: Any
  ema_before_loss: bool = False
  ROLES = ("teacher", "student")

  def default_role(self) -> str:
    """'teacher' unless config.teacher.eval_on_teacher is False (each recipe declares it)."""
    return "teacher" if self.config.teacher.get("eval_on_teacher", True) else "student"

  def network(self, model: nnx.Module, extras: Any, role: str) -> nnx.Module:
    """The teacher of `extras` for role 'teacher', else the student `model`."""
    return self.teacher_model(extras["teacher"]) if role == "teacher" else model

  def init_extras(self, params: Any, model_state: Any, rng: jax.Array) -> Any:
    return {"teacher": self.init_teacher(params, model_state, rng)}

  def before_step(self, params: Any, extras: Any, step: jax.Array) -> Any:
    del step
    return self.with_ema_step(params, extras) if self.ema_before_loss else extras

  def after_update(self, params: Any, extras: Any, step: jax.Array) -> tuple[Any, Any]:
    del step
    return params, extras if self.ema_before_loss else self.with_ema_step(params, extras)

  def with_ema_step(self, params: Any, extras: Any) -> Any:
    """`extras` with the teacher one EMA step towards `params`."""
    return {**extras, "teacher": self.update_teacher(params, extras["teacher"])}

  def ema(self) -> Any:
    """The EMA transformation with its momentum schedule."""
    cfg = self.config.teacher
    total = self.schedule.total_steps
    return optim.teacher_ema(optim.cosine_ramp(cfg.momentum, cfg.get("momentum_end", 1.0), total))

  def init_teacher(self, params: Any, model_state: Any, rng: jax.Array) -> dict:
    """{'ema': EMA state holding the teacher params, 'state': the teacher's own BN statistics}."""
    if self.config.teacher.get("init", "copy") == "independent":
      other = self.build_model(nnx.Rngs(params=rng))
      _, params, _ = nnx.split(other, nnx.Param, ...)
    return {"ema": optim.seed_teacher(self.ema(), params),
            "state": jax.tree.map(jnp.array, model_state)}

  def update_teacher(self, params: Any, teacher: dict) -> dict:
    """One EMA step of the teacher towards the updated student."""
    _, ema_state = self.ema().update(params, teacher["ema"])
    return {**teacher, "ema": ema_state}

  def teacher_model(self, teacher: dict) -> nnx.Module:
    """The teacher network (module view)."""
    return self.merge(optim.teacher_params(teacher["ema"]), teacher["state"])

  def teacher_momentum(self, teacher: dict) -> jax.Array:
    """The momentum of the last EMA step (logged)."""
    return teacher["ema"].hyperparams["decay"]

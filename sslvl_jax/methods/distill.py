"""Knowledge distillation from a frozen pretrained teacher (Hinton et al. 2015; DeiT, Touvron et al.
2021): logits at a temperature, features through a learned projector, last-layer attention maps."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from ml_collections import ConfigDict

from sslvl_jax import losses, models
from sslvl_jax.errors import ConfigError
from sslvl_jax.methods import METHODS
from sslvl_jax.methods import pretrained
from sslvl_jax.methods.base import StepContext
from sslvl_jax.methods.ssl import SSLMethod, SSLModel
from sslvl_jax.registry import Registry


def hinton_kl(student: jax.Array, teacher: jax.Array, temperature: float) -> jax.Array:
  """T^2 x KL(softmax(teacher / T) || softmax(student / T)), averaged over the batch."""
  log_p = jax.nn.log_softmax(teacher.astype(jnp.float32) / temperature)
  log_q = jax.nn.log_softmax(student.astype(jnp.float32) / temperature)
  return temperature ** 2 * jnp.mean(jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1))


FEATURE_LOSSES: Registry[Callable[[jax.Array, jax.Array], jax.Array]] = Registry("feature loss")
FEATURE_LOSSES.add("cosine", lambda s, t: jnp.mean(  # 1 - cos, averaged over the batch
    1.0 - jnp.sum(losses.l2_normalize(s) * losses.l2_normalize(t), axis=-1)))
FEATURE_LOSSES.add("mse", lambda s, t: jnp.mean(  # mean over the batch and the teacher's dims
    jnp.square(s.astype(jnp.float32) - t.astype(jnp.float32))))


def cls_patch_attention(vit: models.ViT, images: jax.Array) -> jax.Array:
  """(b, heads, grid_h, grid_w): each head's last-layer [CLS] -> patch attention (registers and the
  [CLS] token left out)."""
  attn = vit.last_attention(images)
  gh, gw = images.shape[1] // vit.patch_size, images.shape[2] // vit.patch_size
  return attn[:, :, 0, 1 + vit.num_registers:].reshape(*attn.shape[:2], gh, gw)


def patch_distributions(maps: jax.Array, grid: tuple[int, int], heads: int) -> jax.Array:
  """(b, heads', gh * gw) distributions over patches of `maps` (b, h, gh', gw').

  Maps are bilinearly resized to `grid` (another resolution or patch size), renormalised to sum
  to 1 per head (the attention mass on [CLS] and registers removed) and averaged over heads
  unless there are `heads` of them (different head counts: one head-averaged map each).
  """
  b, h = maps.shape[:2]
  maps = maps.astype(jnp.float32)
  if maps.shape[2:] != tuple(grid):
    maps = jax.image.resize(maps, (b, h, *grid), method="linear")
  maps = jnp.maximum(maps.reshape(b, h, -1), 1e-12)
  maps = maps / maps.sum(-1, keepdims=True)
  return maps if h == heads else maps.mean(axis=1, keepdims=True)


def attention_kl(student: jax.Array, teacher: jax.Array) -> jax.Array:
  """KL(teacher || student) of [CLS] -> patch attention per head, averaged over heads and batch.

  Both are (b, heads, gh, gw) maps (`cls_patch_attention`); the teacher's are resized to the
  student's grid; with different head counts both sides are averaged over their heads first.
  """
  heads = student.shape[1] if student.shape[1] == teacher.shape[1] else 1
  s = patch_distributions(student, student.shape[2:], heads)
  t = patch_distributions(teacher, student.shape[2:], heads)
  return jnp.mean(jnp.sum(t * (jnp.log(t) - jnp.log(s)), axis=-1))


# target name -> loss(student output, teacher output, config.loss); the outputs have the same name.
TARGETS: Registry[Callable[[jax.Array, jax.Array, ConfigDict], jax.Array]] = Registry(
    "distillation target")
TARGETS.add("logits", lambda s, t, cfg: hinton_kl(s, t, cfg.get("temperature", 1.0)))
TARGETS.add("features",
            lambda s, t, cfg: FEATURE_LOSSES.get(cfg.get("feature_loss", "cosine"))(s, t))
TARGETS.add("attention", lambda s, t, cfg: attention_kl(s, t))
HEADS = {"logits": "logit_head", "features": "projector"}  # the student's linear head per target


def image_net(teacher: nnx.Module) -> nnx.Module:
  """The image encoder of a teacher (a two-tower's image tower, else the network itself)."""
  return teacher.image if isinstance(teacher, models.TwoTower) else teacher


def teacher_outputs(teacher: nnx.Module, images: jax.Array, names: tuple[str, ...]
                    ) -> dict[str, jax.Array]:
  """The teacher's outputs named in `names`: 'features' (pooled image features), 'logits' and
  'attention' (`cls_patch_attention`).

  No teacher here has a classifier, so its 'logits' are its output embedding: a two-tower's
  L2-normalised image embedding x exp(logit_scale) (the scale of its image-text logits), an
  image backbone's pooled features.
  """
  net = image_net(teacher)
  feats = net(images, train=False)["pooled"]
  out = {"features": feats, "logits": feats}
  if isinstance(teacher, models.TwoTower):
    out["logits"] = jnp.exp(teacher.logit_scale[...]) * losses.l2_normalize(
        teacher.image_proj(feats))
  if "attention" in names:
    out["attention"] = cls_patch_attention(net, images)
  return {k: out[k] for k in names}


@METHODS.register("distill")
class Distill(SSLMethod):
  """A student backbone (+ one linear head per logit / feature target) distilled from a frozen
  teacher loaded by sslvl_jax.methods.pretrained.

  config.teacher: source ('export:DIR' | 'checkpoint:WORKDIR' | 'open_clip:FILE' | 'openai:FILE' |
  'dino:FILE' | 'init:MODEL'), role / step / key (see pretrained.load). config.loss: targets
  {logits | features | attention: weight} (summed), temperature (logits), feature_loss ('cosine' |
  'mse'). The teacher's variables are method state (extras['teacher']): sharded and checkpointed
  with the run, never given to the optimiser; each student view is renormalised to the teacher's
  mean/std and resized to its image size on device.
  """

  def __init__(self, config: ConfigDict, mesh: Any, schedule: Any):
    super().__init__(config, mesh, schedule)
    self.weights = target_weights(config.loss)
    self.teacher = pretrained.load(config.teacher, "teacher")
    teacher = self.teacher.module()
    if "attention" in self.weights and not isinstance(image_net(teacher), models.ViT):
      raise ConfigError("loss.targets.attention needs a ViT teacher; "
                        f"{config.teacher.source} is a {type(image_net(teacher)).__name__}")
    self.teacher_graphdef, self.teacher_state = nnx.split(teacher)
    size = self.teacher_size()
    shapes = jax.eval_shape(lambda: teacher_outputs(
        teacher, jnp.zeros((1, size, size, 3)), tuple(self.weights)))
    self.head_dims = {HEADS[n]: int(shapes[n].shape[-1]) for n in self.weights if n in HEADS}

  def teacher_size(self) -> int:
    """The teacher's input size: its export's image size, else the student's."""
    prep = self.teacher.preprocessing
    return int(prep["image_size"]) if prep else int(self.config.data.image_size)

  def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
    backbone = self.build_backbone(rngs)
    if "attention" in self.weights and not isinstance(backbone, models.ViT):
      raise ConfigError("loss.targets.attention needs a ViT student; model.backbone is "
                        f"{self.config.model.backbone.name}")
    width = models.width_of(backbone)
    return SSLModel(backbone, {name: nnx.Linear(width, dim, rngs=rngs)
                               for name, dim in self.head_dims.items()})

  def init_extras(self, params: Any, model_state: Any, rng: jax.Array) -> Any:
    del params, model_state, rng
    return {"teacher": self.teacher_state}

  def teacher_input(self, views: jax.Array) -> jax.Array:
    """Student views (normalised for the student) as the teacher's input: its mean/std, size."""
    prep = self.teacher.preprocessing
    if prep is None:
      return views
    mean, std = (np.asarray(v, np.float32) for v in self.image_normalization())
    x = (views * std + mean - np.asarray(prep["mean"], np.float32)) / np.asarray(prep["std"],
                                                                                 np.float32)
    size = self.teacher_size()
    if x.shape[1:3] != (size, size):
      x = jax.image.resize(x, (x.shape[0], size, size, x.shape[3]), method="linear")
    return x

  def student_outputs(self, model: nnx.Module, views: jax.Array, rng: jax.Array | None
                      ) -> dict[str, jax.Array]:
    """The student's outputs matched to the teacher's (`teacher_outputs`), by target name."""
    pooled = model.features(views, train=rng is not None, rng=rng)
    out = {n: getattr(model, h)(pooled) for n, h in HEADS.items() if n in self.weights}
    if "attention" in self.weights:
      out["attention"] = cls_patch_attention(model.backbone, views)
    return out

  def loss(self, model: nnx.Module, extras: Any, batch: dict, ctx: StepContext):
    views = jnp.concatenate(self.views(batch, 0, ctx.stream("augment")))
    teacher = nnx.merge(self.teacher_graphdef, extras["teacher"])
    t = jax.lax.stop_gradient(teacher_outputs(teacher, self.teacher_input(views),
                                              tuple(self.weights)))
    s = self.student_outputs(model, views, ctx.stream("dropout"))
    parts = {n: TARGETS.get(n)(s[n], t[n], self.config.loss) for n in self.weights}
    loss = sum(w * parts[n] for n, w in self.weights.items())
    return loss, {f"{n}_loss": v for n, v in parts.items()}, extras


def target_weights(cfg: ConfigDict) -> dict[str, float]:
  """{target: weight > 0} of loss.targets, checked against TARGETS (ConfigError otherwise)."""
  given = dict(cfg.get("targets", {}))
  bad = sorted(set(given) - set(TARGETS.names()))
  if bad:
    raise ConfigError(f"loss.targets: unknown target(s) {bad}; use {', '.join(TARGETS.names())}")
  if any(float(w) < 0 for w in given.values()):
    raise ConfigError(f"loss.targets: weights must be >= 0, got {given}")
  weights = {n: float(w) for n, w in sorted(given.items()) if float(w) > 0}
  if not weights:
    raise ConfigError("loss.targets: give at least one target a weight > 0, e.g. "
                      "--config.loss.targets.logits=1")
  return weights

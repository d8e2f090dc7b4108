"""Mean teacher (Tarvainen & Valpola 2017): semi-supervised classification with an EMA teacher.

The student classifier (backbone + linear head) is trained with cross-entropy on the labelled
examples of each batch plus a consistency cost on every example: the squared difference of its
softmax on one augmented view and the EMA teacher's softmax on another view of the same image,
averaged over classes (the reference code's MSE), weighted by
`loss.consistency_weight * exp(-5 (1 - t)^2)` with t the fraction of `loss.consistency_rampup_*`
done. The teacher's EMA decay is `teacher.momentum` during the ramp-up and `teacher.momentum_end`
after it (0.99 then 0.999 in the paper). Labels come from the `labelled_views` example: those
outside the `data.labelled_fraction` subset are -1.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh
from ml_collections import ConfigDict

from sslvl_jax import models, optim
from sslvl_jax.data import examples
from sslvl_jax.durations import Schedule
from sslvl_jax.errors import ConfigError
from sslvl_jax.methods import METHODS
from sslvl_jax.methods.base import StepContext
from sslvl_jax.methods.ssl import SSLMethod, SSLModel, TeacherMixin
from sslvl_jax.methods.teacher_student import run_state


def sigmoid_rampup(step: jax.Array, rampup_steps: int) -> jax.Array:
  """exp(-5 (1 - t)^2) with t = step / rampup_steps clipped to [0, 1]; 1 without a ramp-up."""
  if rampup_steps <= 0:
    return jnp.float32(1.0)
  t = jnp.clip(jnp.asarray(step, jnp.float32) / rampup_steps, 0.0, 1.0)
  return jnp.exp(-5.0 * (1.0 - t) ** 2)


def step_decay(during: float, after: float, rampup_steps: int) -> optax.Schedule:
  """EMA decay `during` for the first `rampup_steps` updates, `after` from then on."""
  return optax.join_schedules([optax.constant_schedule(during), optax.constant_schedule(after)],
                              [rampup_steps])


def mean_teacher_loss(student_logits: jax.Array, teacher_logits: jax.Array, labels: jax.Array,
                      consistency_weight: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(CE over the rows with a label >= 0 + weight x mean squared softmax difference, metrics).

  The cross-entropy is averaged over the labelled rows of the batch (0 when there are none), the
  consistency over every row and class; the teacher's logits get no gradient.
  """
  student_logits = student_logits.astype(jnp.float32)
  teacher_logits = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32))
  labelled = labels >= 0
  count = jnp.sum(labelled)
  logp = jax.nn.log_softmax(student_logits)
  nll = -jnp.take_along_axis(logp, jnp.maximum(labels, 0)[:, None], axis=1)[:, 0]
  ce = jnp.sum(jnp.where(labelled, nll, 0.0)) / jnp.maximum(count, 1)
  consistency = jnp.mean((jax.nn.softmax(student_logits) - jax.nn.softmax(teacher_logits)) ** 2)
  hit = jnp.argmax(student_logits, axis=1) == labels
  accuracy = jnp.sum(hit & labelled) / jnp.maximum(count, 1)
  return ce + consistency_weight * consistency, {
      "ce": ce, "consistency": consistency, "consistency_weight": consistency_weight,
      "labelled": count.astype(jnp.float32), "labelled_top1": accuracy}


@METHODS.register("mean_teacher")
class MeanTeacher(TeacherMixin, SSLMethod):
  """Mean teacher: student CE on labelled rows + ramped softmax-MSE to the EMA teacher's view.

  config.model: backbone {name, ...} and num_classes (linear head); config.loss:
  consistency_weight, consistency_rampup_{steps,epochs,...}; config.teacher: momentum (during the
  ramp-up), momentum_end (after), eval_on_teacher (the k-NN features and `logits` come from the
  teacher, default True); config.data: labelled_fraction, labelled_seed; config.augment.views0:
  the photometric preset of the student's and the teacher's view.
  """

  example = "labelled_views"

  def __init__(self, config: ConfigDict, mesh: Mesh, schedule: Schedule):
    super().__init__(config, mesh, schedule)
    fraction = config.data.get("labelled_fraction")
    if fraction is None or not 0.0 < fraction <= 1.0:
      raise ConfigError(f"data.labelled_fraction={fraction!r}: mean teacher needs the fraction "
                        "of training labels it may use, in (0, 1] (e.g. 0.1)")
    if int(config.model.get("num_classes") or 0) < 2:
      raise ConfigError(f"model.num_classes={config.model.get('num_classes')!r}: set the number "
                        "of classes of the labels (>= 2)")
    crops = examples.crop_spec(config.data.get("crops"), config.data.get("crop_groups"))
    views = crops.groups[0][1]
    if views != 2:
      raise ConfigError(f"data crops: the first crop group has {views} views; mean teacher takes "
                        "2 (student and teacher)")
    if config.loss.consistency_weight < 0:
      raise ConfigError(f"loss.consistency_weight={config.loss.consistency_weight}: must be >= 0")
    self.rampup_steps = schedule.steps(config.loss, "consistency_rampup", default=0)

  def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
    backbone = self.build_backbone(rngs)
    head = nnx.Linear(models.width_of(backbone), int(self.config.model.num_classes), rngs=rngs)
    return SSLModel(backbone, {"classifier": head})

  def ema(self) -> optax.GradientTransformation:
    """The teacher EMA: decay `teacher.momentum` during the consistency ramp-up, then
    `teacher.momentum_end`."""
    cfg = self.config.teacher
    return optim.teacher_ema(step_decay(cfg.momentum, cfg.momentum_end, self.rampup_steps))

  @staticmethod
  def class_logits(net: nnx.Module, images: jax.Array, *, train: bool,
                   rng: jax.Array | None = None) -> jax.Array:
    """(b, num_classes) float32 logits of normalised images."""
    return net.classifier(net.features(images, train=train, rng=rng)).astype(jnp.float32)

  def loss(self, model: nnx.Module, extras: Any, batch: dict, ctx: StepContext):
    student_view, teacher_view = self.views(batch, 0, ctx.stream("augment"))
    student = self.class_logits(model, student_view, train=True, rng=ctx.stream("dropout"))
    teacher_net = self.teacher_model(extras["teacher"])  # train-mode BN with its own statistics
    teacher = self.class_logits(teacher_net, teacher_view, train=True)
    weight = self.config.loss.consistency_weight * sigmoid_rampup(ctx.step, self.rampup_steps)
    loss, m = mean_teacher_loss(student, teacher, batch["label"], weight)
    teacher_state = {**extras["teacher"], "state": run_state(teacher_net)}
    m["teacher_momentum"] = self.teacher_momentum(teacher_state)
    return loss, m, {**extras, "teacher": teacher_state}

  def logits(self, net: nnx.Module, extras: Any, images: jax.Array) -> jax.Array:
    """Class logits of uint8 images by `net` (the student, or the teacher: `network`)."""
    del extras
    return self.class_logits(net, self.normalize(images), train=False)

  def predict_fns(self, role: str | None = None) -> dict[str, Callable]:
    """'image_features' and 'logits' of the network `role` (k-NN, probe, classifier), and the
    'teacher_logits' and 'student_logits' of each network."""
    role = self.resolve_role(role)
    return {**super().predict_fns(role), "logits": self._predict_fn(self.logits, role),
            **{f"{r}_logits": self._predict_fn(self.logits, r) for r in self.ROLES}}

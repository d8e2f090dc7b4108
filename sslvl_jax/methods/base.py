"""The Method interface: what train.py knows about a pretraining method."""

from __future__ import annotations

import dataclasses
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from ml_collections import ConfigDict

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@flax.struct.dataclass
class TrainState:
  """Everything a step reads and writes; checkpointed whole.

  params: trainable nnx.Param state of the student; model_state: the rest of the model's variables
  (BatchNorm statistics, fixed buffers); extras: method state (teacher EMA state, DINO center,
  MoCo queue, ...); guard: counters of non-finite steps (train.new_guard).
  """

  step: jax.Array
  params: Any
  opt_state: Any
  model_state: Any
  extras: Any
  guard: Any = None


@dataclasses.dataclass
class StepContext:
  """Per-step inputs a loss may need besides params and batch."""

  rng: jax.Array
  step: jax.Array
  monitor: jax.Array | bool = True  # compute collapse monitors (train.py: only on log steps)


def context(state: TrainState, rng: jax.Array, monitor: jax.Array | bool = True) -> StepContext:
  """The StepContext of a step on `state`."""
  return StepContext(rng=rng, step=state.step, monitor=monitor)


class Method:
  """Base class of a pretraining method: a model, a loss, and optional state rules.

  Subclasses implement `build_model` and either `loss` or the pair `embeddings` + `embedding_loss`
  (a loss of per-example embeddings of the whole batch: the contrastive methods, which then get
  gradient caching with `config.microbatches`, see sslvl_jax.accumulate); they may override
  `init_extras` (teacher, queues), `after_update` (EMA, clamping), `image_features` /
  `text_features` (used by evaluators).
  `example` names the host transform (sslvl_jax.data.examples) that produces the method's batches.
  """

  example: str = "image_text"

  def __init__(self, config: ConfigDict, mesh: Mesh):
    self.config, self.mesh = config, mesh
    self.graphdef: nnx.GraphDef | None = None

  # ---- to implement -----------------------------------------------------------------------
  def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
    """The student model (all towers and heads)."""
    raise NotImplementedError

  def loss(self, model: nnx.Module, extras: Any, batch: dict, ctx: StepContext
           ) -> tuple[jax.Array, dict[str, jax.Array], Any]:
    """(global-batch loss, metrics, new extras) for one batch."""
    emb, extras = self.embeddings(model, extras, batch, ctx)
    return self.embedding_loss(model, extras, emb, batch, ctx)

  def embeddings(self, model: nnx.Module, extras: Any, batch: dict, ctx: StepContext
                 ) -> tuple[Any, Any]:
    """(pytree of per-example embeddings, leading axis the batch; extras after the forward)."""
    raise NotImplementedError(f"{type(self).__name__} has no embedding loss")

  def embedding_loss(self, model: nnx.Module, extras: Any, emb: Any, batch: dict,
                     ctx: StepContext) -> tuple[jax.Array, dict[str, jax.Array], Any]:
    """(global-batch loss, metrics, new extras) of the embeddings of the whole batch."""
    raise NotImplementedError(f"{type(self).__name__} has no embedding loss")

  def has_embedding_loss(self) -> bool:
    """Whether the loss is split into `embeddings` + `embedding_loss` (gradient caching)."""
    return type(self).embeddings is not Method.embeddings

  # ---- optional hooks ---------------------------------------------------------------------
  def init_extras(self, params: Any, model_state: Any, rng: jax.Array) -> Any:
    """Method state beside the student (teacher EMA state, center, queue)."""
    del params, model_state, rng
    return {}

  def after_update(self, params: Any, extras: Any, step: jax.Array) -> tuple[Any, Any]:
    """Runs after the optimiser step inside the jitted step (EMA update, clamps)."""
    del step
    return params, extras

  def image_features(self, model: nnx.Module, extras: Any, images: jax.Array) -> jax.Array:
    """Features of uint8 images for k-NN / linear probe / zero-shot."""
    raise NotImplementedError(f"{type(self).__name__} has no image features")

  def text_features(self, model: nnx.Module, extras: Any, tokens: jax.Array) -> jax.Array:
    """Embeddings of token ids, for zero-shot and retrieval."""
    raise NotImplementedError(f"{type(self).__name__} has no text tower")

  # ---- shared machinery -------------------------------------------------------------------
  def init_model(self, rng: jax.Array) -> tuple[Any, Any]:
    """Build the model; keep its graphdef; return (params, model_state) pytrees."""
    model = self.build_model(nnx.Rngs(params=rng))
    self.graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
    return params, model_state

  def merge(self, params: Any, model_state: Any) -> nnx.Module:
    """A module view of pytrees (inside jit: pure).

    The state pytrees are rebuilt here (tree.map) so that their Variables belong to the current
    trace and BatchNorm statistics may be updated in it.
    """
    copy = lambda t: jax.tree.map(lambda x: x, t)  # noqa: E731
    return nnx.merge(self.graphdef, copy(params), copy(model_state))

  def forward_loss(self, params: Any, state: TrainState, batch: dict, rng: jax.Array,
                   monitor: jax.Array | bool = True) -> tuple[jax.Array, tuple[dict, Any, Any]]:
    """Loss as a function of params, also returning (metrics, new model_state, new extras)."""
    model = self.merge(params, state.model_state)
    loss, metrics, extras = self.loss(model, state.extras, batch, context(state, rng, monitor))
    return loss, (metrics, nnx.split(model, nnx.Param, ...)[2], extras)

  def forward_embeddings(self, params: Any, state: TrainState, batch: dict, rng: jax.Array
                         ) -> tuple[Any, tuple[Any, Any]]:
    """`embeddings` as a function of params, also returning (new model_state, new extras)."""
    model = self.merge(params, state.model_state)
    emb, extras = self.embeddings(model, state.extras, batch, context(state, rng))
    return emb, (nnx.split(model, nnx.Param, ...)[2], extras)

  def forward_embedding_loss(self, params: Any, emb: Any, state: TrainState, batch: dict,
                             rng: jax.Array, monitor: jax.Array | bool = True
                             ) -> tuple[jax.Array, tuple[dict, Any]]:
    """`embedding_loss` as a function of params and embeddings, also returning (metrics, extras)."""
    loss, metrics, extras = self.embedding_loss(self.merge(params, state.model_state),
                                                state.extras, emb, batch,
                                                context(state, rng, monitor))
    return loss, (metrics, extras)

  def normalize(self, images: jax.Array) -> jax.Array:
    """uint8 (b, h, w, 3) -> float32 normalised with the data config's mean/std."""
    data = self.config.data
    mean = np.asarray(data.get("mean", IMAGENET_MEAN), np.float32) * 255.0
    std = np.asarray(data.get("std", IMAGENET_STD), np.float32) * 255.0
    return (images.astype(jnp.float32) - mean) / std

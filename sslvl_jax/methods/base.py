"""The Method interface: what train.py knows about a pretraining method."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh
from ml_collections import ConfigDict

from sslvl_jax import rngs
from sslvl_jax.data import device_ops
from sslvl_jax.durations import Schedule
from sslvl_jax.errors import ConfigError

IMAGENET_MEAN, IMAGENET_STD = device_ops.NORMALIZATIONS.get("imagenet")


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

  rng: jax.Array  # the step's key (sslvl_jax.rngs.step_key); draw from `stream`, not from it
  step: jax.Array
  monitor: jax.Array | bool = True  # compute collapse monitors (train.py: only on log steps)

  def stream(self, name: str) -> jax.Array:
    """This step's key of stream 'augment', 'dropout' or 'method' (sslvl_jax.rngs)."""
    return rngs.step_stream(self.rng, name)


def context(state: TrainState, rng: jax.Array, monitor: jax.Array | bool = True) -> StepContext:
  """The StepContext of a step on `state`."""
  return StepContext(rng=rng, step=state.step, monitor=monitor)


class Method:
  """Base class of a pretraining method: a model, a loss, and optional state rules.

  Subclasses implement `build_model` and either `loss` or the pair `embeddings` + `embedding_loss`
  (a loss of per-example embeddings of the whole batch: the contrastive methods, which then get
  gradient caching with `config.microbatches`, see sslvl_jax.accumulate); they may override
  `init_extras` (teacher, queues), `before_step` / `after_update` (EMA, clamping), `image_features` /
  `text_features` (used by evaluators).
  `example` names the host transform (sslvl_jax.data.examples) that produces the method's batches.
  `schedule` holds the run's step counts (total, per epoch, warm-up), resolved once by train.py.
  """

  example: str = "image_text"
  ROLES: tuple[str, ...] = ("student",)  # the networks it has, for evaluation and export

  def __init__(self, config: ConfigDict, mesh: Mesh, schedule: Schedule):
    self.config, self.mesh, self.schedule = config, mesh, schedule
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

  def before_step(self, params: Any, extras: Any, step: jax.Array) -> Any:
    """Runs once per step inside the jitted step, before the loss and its micro-batches, on the
    params the step differentiates (MoCo's key-encoder EMA); returns the extras the loss sees."""
    del params, step
    return extras

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
    """uint8 (b, h, w, 3) -> float32 on the 0-1 scale normalised with `image_normalization`."""
    return device_ops.normalize(images.astype(jnp.float32) / 255.0, *self.image_normalization())

  # ---- prediction and export (evaluators, export.py) ---------------------------------------
  def model_graphdef(self) -> nnx.GraphDef:
    """The model's graphdef: the one `init_model` kept, else built abstractly (no weights)."""
    if self.graphdef is None:
      abstract = nnx.eval_shape(lambda k: self.build_model(nnx.Rngs(params=k)), jax.random.key(0))
      self.graphdef = nnx.split(abstract, nnx.Param, ...)[0]
    return self.graphdef

  def predict_model(self, params: Any, model_state: Any) -> nnx.Module:
    """`merge` that does not rely on `init_model` having run (for the prediction functions)."""
    self.model_graphdef()
    return self.merge(params, model_state)

  def default_role(self) -> str:
    """The network evaluators and export use unless told otherwise (`--role`)."""
    return "student"

  def resolve_role(self, role: str | None) -> str:
    """`role` checked against ROLES; None: `default_role`."""
    if role is None:
      return self.default_role()
    if role not in self.ROLES:
      raise ConfigError(f"--role={role}: method {self.config.method!r} has no {role} network "
                        f"(it has: {', '.join(self.ROLES)})")
    return role

  def network(self, model: nnx.Module, extras: Any, role: str) -> nnx.Module:
    """The module of `role` (a resolved one): the student `model` itself here."""
    del extras, role
    return model

  def predict_fns(self, role: str | None = None
                  ) -> dict[str, Callable[[Any, Any, Any, jax.Array], jax.Array]]:
    """Pure prediction functions fn(params, model_state, extras, batch) -> (b, d) float32, by name,
    of the network `role` (None: `default_role`).

    'image_features': uint8 (b, h, w, 3) images -> features for k-NN / linear probe;
    'image_embed' / 'text_embed': images / token ids -> embeddings of a joint image-text space
    (zero-shot, retrieval). Only those the method has are present. Nothing is closed over but
    the method, so one jit of a function serves every state (evaluators jit each once).
    Default: `image_features` (and `text_features` as 'text_embed') where a subclass has them.
    """
    role = self.resolve_role(role)
    fns: dict[str, Callable] = {}
    if type(self).image_features is not Method.image_features:
      fns["image_features"] = self._predict_fn(self.image_features, role)
    if type(self).text_features is not Method.text_features:
      fns["text_embed"] = self._predict_fn(self.text_features, role)
    return fns

  def _predict_fn(self, fn: Callable[[nnx.Module, Any, jax.Array], jax.Array], role: str
                  ) -> Callable[[Any, Any, Any, jax.Array], jax.Array]:
    """fn(network, extras, x) as a pure function of (params, model_state, extras, x), in float32,
    the network being `role`'s."""
    def predict(params: Any, model_state: Any, extras: Any, x: jax.Array) -> jax.Array:
      net = self.network(self.predict_model(params, model_state), extras, role)
      return fn(net, extras, x).astype(jnp.float32)
    predict.__name__ = predict.__qualname__ = fn.__name__
    return predict

  def image_normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) on the 0-1 scale that `normalize` applies, from the config (data.mean/std)."""
    data = self.config.data
    return (tuple(float(v) for v in data.get("mean", IMAGENET_MEAN)),
            tuple(float(v) for v in data.get("std", IMAGENET_STD)))

  def image_preprocessing(self) -> dict:
    """What an exported image encoder expects: size, 0-1-scale mean/std, resize rule."""
    mean, std = self.image_normalization()
    return {"image_size": int(self.config.data.image_size), "mean": list(mean), "std": list(std),
            "resize": "shorter side, bicubic, then centre crop",
            "eval_resize_ratio": float(self.config.data.get("eval_resize_ratio", 1.0))}

  def export_encoder(self, params: Any, model_state: Any, extras: Any, *,
                     role: str | None = None) -> tuple[dict, nnx.Module, dict]:
    """(model_config, encoder module, info) to export: `model_config` ({'name', 'kwargs'})
    rebuilds the module (interop.build_module), which holds only the encoder's variables; `info`
    has 'role' (teacher / student), 'tower' (image / image_text), 'preprocessing' and, for text
    towers, 'tokenizer', all from the config the method was trained with. `role` None:
    `default_role`, the network the evaluators use."""
    raise NotImplementedError(f"{type(self).__name__} has no encoder export")

"""Image-text contrastive methods: CLIP (and ALIGN), SigLIP, SLIP and UniCL."""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from sslvl_jax import data, interop, losses, models, parallel
from sslvl_jax.data import device_ops
from sslvl_jax.data.examples import tokenizer
from sslvl_jax.errors import ConfigError
from sslvl_jax.methods import METHODS
from sslvl_jax.methods.base import Method, StepContext


def clamp_leaf(params: Any, name: str, lo: float, hi: float) -> Any:
  """Clip the leaf whose path ends in `name` to [lo, hi] (CLIP's logit-scale clamp)."""
  from sslvl_jax.optim import path_str  # pylint: disable=g-import-not-at-top
  return jax.tree_util.tree_map_with_path(
      lambda p, x: jnp.clip(x, lo, hi) if path_str(p).endswith(name) else x, params)


class ImageText(Method):
  """Two towers trained with a global-batch image-text loss; subclasses choose the loss."""

  example = "image_text"
  logit_bias_init: float | None = None

  def tower_configs(self) -> tuple[dict, dict]:
    """JSON-able {'name', 'kwargs'} of the image and text towers (also written on export)."""
    cfg = self.config.model
    shared = {"dtype": cfg.get("dtype", "float32"), "remat": cfg.get("remat", "none")}
    image = {"name": cfg.image.name,
             "kwargs": {**shared, **{k: v for k, v in cfg.image.items() if k != "name"}}}
    text_kw = {**shared, **{k: v for k, v in cfg.text.items() if k != "name"}}
    if "vocab_size" not in text_kw:  # from the tokenizer, so the two cannot disagree
      tok_spec = data.tokenizer_spec(self.config.data)
      text_kw.update(vocab_size=tokenizer(tok_spec).vocab_size, eot_id=tok_spec.eot_id,
                     pad_id=tok_spec.pad_id)
    text_kw.setdefault("context_length", self.config.data.context_length)
    return image, {"name": cfg.text.name, "kwargs": text_kw}

  def model_config(self) -> dict:
    """The exported model's {'name': 'two_tower', 'kwargs'} (interop.build_module rebuilds it)."""
    image, text = self.tower_configs()
    return {"name": "two_tower", "kwargs": {
        "image": image, "text": text, "embed_dim": self.config.model.embed_dim,
        "logit_scale_init": self.config.loss.logit_scale_init,
        "logit_bias_init": self.config.loss.get("logit_bias_init")}}

  def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
    return interop.build_module(self.model_config(), rngs)

  def embeddings(self, model: nnx.Module, extras: Any, batch: dict, ctx: StepContext
                 ) -> tuple[tuple[jax.Array, jax.Array], Any]:
    """L2-normalised (image, text) embeddings of a batch."""
    drop = ctx.stream("dropout")
    return (model.encode_image(self.normalize(batch["image"]), rng=jax.random.fold_in(drop, 0)),
            model.encode_text(batch["tokens"], rng=jax.random.fold_in(drop, 1))), extras

  def sharded_loss(self, fn: Any, *specs: Any) -> Any:
    """`fn` (a losses.* function) over the global batch, with the config's loss.chunk_size."""
    fn = functools.partial(fn, axis_name=parallel.BATCH_AXES,
                           chunk_size=self.config.loss.get("chunk_size", 0))
    return parallel.sharded_loss(fn, self.mesh, specs)

  def image_features(self, model: nnx.Module, extras: Any, images: jax.Array) -> jax.Array:
    return model.encode_image(self.normalize(images))

  def text_features(self, model: nnx.Module, extras: Any, tokens: jax.Array) -> jax.Array:
    return model.encode_text(tokens)

  def predict_fns(self, role: str | None = None) -> dict[str, Any]:
    """'image_features' (k-NN / probe) and 'image_embed' are the L2-normalised image embedding,
    'text_embed' the text one (of the only network, the student)."""
    role = self.resolve_role(role)
    image = self._predict_fn(self.image_features, role)
    return {"image_features": image, "image_embed": image,
            "text_embed": self._predict_fn(self.text_features, role)}

  def export_encoder(self, params: Any, model_state: Any, extras: Any, *,
                     role: str | None = None) -> tuple[dict, nnx.Module, dict]:
    """The two towers of `model_config` (the student: there is no teacher); what a subclass adds
    for its loss only (SLIP's SimCLR head) is left out."""
    role = self.resolve_role(role)
    net = self.predict_model(params, model_state)
    config = self.model_config()
    towers = nnx.eval_shape(lambda k: interop.build_module(config, nnx.Rngs(params=k)),
                            jax.random.key(0))
    for name in sorted(set(vars(net)) - set(vars(towers))):  # loss-only heads
      delattr(net, name)
    spec = data.tokenizer_spec(self.config.data)
    info = {"role": "student", "tower": "image_text", "preprocessing": self.image_preprocessing(),
            "tokenizer": {"model_path": spec.model_path, "context_length": spec.context_length,
                          "lowercase": spec.lowercase, "pad_id": spec.pad_id,
                          "bos_id": spec.bos_id, "eot_id": spec.eot_id,
                          "framing": "[BOS] pieces [EOT] [PAD]...; EOT kept on truncation",
                          "pool": self.config.model.text.get("pool", "first_eot")}}
    return config, net, info

  def after_update(self, params: Any, extras: Any, step: jax.Array) -> tuple[Any, Any]:
    max_scale = self.config.loss.get("max_logit_scale")
    if max_scale:
      params = clamp_leaf(params, "logit_scale", 0.0, math.log(max_scale))
    return params, extras


ROWS = P(parallel.BATCH_AXES)


@METHODS.register("clip")
class Clip(ImageText):
  """CLIP: symmetric InfoNCE over the global batch (ALIGN with loss.label_smoothing=0.1)."""

  def embedding_loss(self, model: nnx.Module, extras: Any, emb: Any, batch: dict,
                     ctx: StepContext) -> tuple[jax.Array, dict, Any]:
    scale = jnp.exp(model.logit_scale[...])
    fn = functools.partial(losses.clip_loss,
                           label_smoothing=self.config.loss.get("label_smoothing", 0.0))
    return self.sharded_loss(fn, ROWS, ROWS, P())(*emb[:2], scale), {"logit_scale": scale}, extras


@METHODS.register("siglip")
class SigLip(ImageText):
  """SigLIP: pairwise sigmoid loss, text chunks passed around the device ring."""

  def __init__(self, config: Any, mesh: Any, schedule: Any):
    super().__init__(config, mesh, schedule)
    chunk, local = config.loss.get("chunk_size", 0), config.global_batch_size // mesh.devices.size
    if chunk and chunk < local and local % chunk:  # blocks are cut into (local, chunk) pieces
      raise ConfigError(f"loss.chunk_size={chunk} does not divide the {local} examples per device "
                        "of a SigLIP block; choose a divisor of it (or 0: whole blocks)")

  def embedding_loss(self, model: nnx.Module, extras: Any, emb: Any, batch: dict,
                     ctx: StepContext) -> tuple[jax.Array, dict, Any]:
    scale, bias = jnp.exp(model.logit_scale[...]), model.logit_bias[...]
    loss = self.sharded_loss(losses.siglip_loss, ROWS, ROWS, P(), P())(*emb, scale, bias)
    return loss, {"logit_scale": scale, "logit_bias": bias}, extras


@METHODS.register("slip")
class Slip(Clip):
  """SLIP: CLIP loss + `loss.ssl_weight` x SimCLR loss on two augmented views through the shared
  image tower and its own MLP head (4096-4096-256 with BN), temperature `loss.ssl_temperature`."""

  example = "image_text_views"

  def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
    model = super().build_model(rngs)
    cfg = self.config.model.ssl_head
    model.ssl_head = models.MLPHead(models.width_of(model.image), [cfg.hidden_dim] * 2,
                                    cfg.out_dim, rngs=rngs)
    return model

  def embeddings(self, model: nnx.Module, extras: Any, batch: dict, ctx: StepContext
                 ) -> tuple[tuple[jax.Array, ...], Any]:
    """(image, text, view-1 projection, view-2 projection), all L2-normalised."""
    (img, txt), extras = super().embeddings(model, extras, batch, ctx)
    views = device_ops.augment_views(batch["views0"], ctx.stream("augment"),
                                     tuple(self.config.augment.views0))
    drop = ctx.stream("dropout")  # keys 0 and 1 are the CLIP towers'
    z = [models.l2_normalize(model.ssl_head(model.image(
        v, train=True, rng=jax.random.fold_in(drop, 2 + i))["pooled"], train=True))
         for i, v in enumerate(views)]
    return (img, txt, *z), extras

  def embedding_loss(self, model: nnx.Module, extras: Any, emb: Any, batch: dict,
                     ctx: StepContext) -> tuple[jax.Array, dict, Any]:
    clip, m, extras = super().embedding_loss(model, extras, emb, batch, ctx)
    fn = functools.partial(losses.nt_xent_loss, temperature=self.config.loss.ssl_temperature)
    ssl = self.sharded_loss(fn, ROWS, ROWS)(*emb[2:])
    w = self.config.loss.ssl_weight
    return clip + w * ssl, {**m, "clip_loss": clip, "ssl_loss": ssl}, extras


@METHODS.register("unicl")
class UniCl(Clip):
  """UniCL: image-text-label contrastive; pairs sharing a class label are all positives.

  Examples without a label (label < 0: plain image-text pairs) get a label of their own, so a
  batch can mix image-text and image-label data; with all labels distinct this is CLIP.
  """

  def embedding_loss(self, model: nnx.Module, extras: Any, emb: Any, batch: dict,
                     ctx: StepContext) -> tuple[jax.Array, dict, Any]:
    scale = jnp.exp(model.logit_scale[...])
    labels = batch["label"]
    labels = jnp.where(labels < 0, -1 - jnp.arange(labels.shape[0]), labels)
    loss = self.sharded_loss(losses.unicl_loss, ROWS, ROWS, ROWS, P())(*emb, labels, scale)
    return loss, {"logit_scale": scale}, extras

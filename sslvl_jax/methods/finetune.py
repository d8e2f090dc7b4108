"""Supervised fine-tuning of a pretrained image encoder with a new linear head (MAE / BEiT recipe).

The encoder comes from an exported encoder directory `finetune.init_from` (`python -m
sslvl_jax.finetune --from=SRC` writes one from any `sslvl_jax.methods.pretrained` source: a
training workdir, an export, a PyTorch CLIP / DINO checkpoint): its architecture, weights and
input normalisation. A two-tower export gives its image tower. Training examples are
one random-resized crop (+ flip) per image with its label (`data.crop_groups`); the loss is
softmax cross-entropy with label smoothing; a ViT encoder gets stochastic depth
(`finetune.drop_path`). Layer-wise lr decay is `optim.lr_multiplier_rules` as made by
`layer_decay_rules` from the encoder's parameter paths (the CLI sets them).
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh
from ml_collections import ConfigDict

from sslvl_jax import interop, models
from sslvl_jax.data import device_ops
from sslvl_jax.durations import Schedule
from sslvl_jax.errors import ConfigError
from sslvl_jax.methods import METHODS, pretrained
from sslvl_jax.methods.base import Method, StepContext

PREFIX = "encoder"  # where the encoder's parameters live in the fine-tuned model


def vit_layers(vit: models.ViT) -> tuple[list[tuple[str, int]], int]:
  """(regex, layer id) of a ViT's parameters and the head's id: embeddings 0, block i i + 1."""
  embed = (rf"^{PREFIX}/(patch_embed|cls_token|pos_embed|registers|ln_pre)/", 0)
  blocks = [(rf"^{PREFIX}/blocks/{i}/", i + 1) for i in range(len(vit.blocks))]
  return [embed, *blocks], len(vit.blocks) + 1


def resnet_layers(net: models.ResNet) -> tuple[list[tuple[str, int]], int]:
  """(regex, layer id) of a ResNet's parameters and the head's id: stem 0, stage s s."""
  stem = (rf"^{PREFIX}/(conv1|bn1)/", 0)
  stages = [(rf"^{PREFIX}/layer{s}/", s) for s in range(1, net.num_stages + 1)]
  return [stem, *stages], net.num_stages + 1


LAYERS: dict[type, Callable[[Any], tuple[list[tuple[str, int]], int]]] = {
    models.ViT: vit_layers, models.ResNet: resnet_layers}


def layer_decay_rules(encoder: nnx.Module, decay: float) -> tuple[tuple[str, float], ...]:
  """`optim.lr_multiplier_rules` of layer-wise lr decay: layer i of an encoder whose head is layer
  L gets decay ** (L - i) (BEiT / MAE `param_groups_lrd`); the head and the final norm keep 1."""
  if not 0 < decay <= 1:
    raise ConfigError(f"finetune.layer_decay={decay}: give a number in (0, 1] (MAE: 0.65 for "
                      "ViT-B, 0.75 for ViT-S / L; 1: no decay)")
  if type(encoder) not in LAYERS:
    raise ConfigError(f"finetune.layer_decay={decay}: no layer order for a "
                      f"{type(encoder).__name__} encoder; set it to 1.0")
  if decay == 1.0:
    return ()
  layers, head = LAYERS[type(encoder)](encoder)
  return tuple((rx, float(decay ** (head - i))) for rx, i in layers)


def load_pretrained(path: str) -> pretrained.Pretrained:
  """The exported encoder `finetune.init_from`, loaded (image towers only)."""
  return pretrained.load(ConfigDict(dict(source=f"export:{path}")), "finetune.init_from")


def encoder_config(config: ConfigDict, model_config: dict) -> dict:
  """The encoder's model config with the fine-tuning run's model.dtype / model.remat and
  finetune.drop_path (stochastic depth, ViTs only)."""
  out = copy.deepcopy(model_config)
  kwargs = out.setdefault("kwargs", {})
  kwargs.update({k: config.model[k] for k in ("dtype", "remat") if k in config.model})
  rate = float(config.finetune.get("drop_path", 0.0))
  if isinstance(interop.mapping.abstract_module(out), models.ViT):
    kwargs["drop_path_rate"] = rate
  elif rate:
    raise ConfigError(f"finetune.drop_path={rate}: the {out['name']} encoder has no stochastic "
                      "depth; set it to 0")
  return out


class Classifier(nnx.Module):
  """An encoder and a linear head on its pooled features."""

  def __init__(self, encoder: nnx.Module, num_classes: int, head_init_std: float, *,
               rngs: nnx.Rngs):
    self.encoder = encoder
    self.head = nnx.Linear(models.width_of(encoder), num_classes,
                           kernel_init=nnx.initializers.truncated_normal(head_init_std),
                           rngs=rngs)

  def features(self, images: jax.Array, *, train: bool, rng: jax.Array | None = None
               ) -> jax.Array:
    """Pooled encoder features (b, d)."""
    return self.encoder(images, train=train, rng=rng)["pooled"].astype(jnp.float32)

  def __call__(self, images: jax.Array, *, train: bool, rng: jax.Array | None = None
               ) -> jax.Array:
    """Class logits (b, num_classes) in float32."""
    return self.head(self.features(images, train=train, rng=rng))


@METHODS.register("finetune")
class FineTune(Method):
  """Full fine-tuning: encoder from `finetune.init_from` + a new head, smoothed cross-entropy.

  config.finetune: init_from (export dir), num_classes, label_smoothing, drop_path,
  head_init_std, layer_decay (checked against optim.lr_multiplier_rules).
  """

  example = "multi_view"

  def __init__(self, config: ConfigDict, mesh: Mesh, schedule: Schedule):
    super().__init__(config, mesh, schedule)
    cfg = config.finetune
    if not cfg.get("init_from"):
      raise ConfigError("finetune.init_from is not set; run python -m sslvl_jax.finetune "
                        "--from=DIR (a training workdir or an exported encoder)")
    self.source = load_pretrained(cfg.init_from)
    tower, _ = self.source.image_tower()
    self.encoder_config = encoder_config(config, tower)
    rules = layer_decay_rules(interop.mapping.abstract_module(tower), cfg.layer_decay)
    given = tuple(tuple(r) for r in config.optim.get("lr_multiplier_rules", ()))
    if given[:len(rules)] != rules:
      raise ConfigError(f"optim.lr_multiplier_rules do not start with the layer-decay rules of "
                        f"finetune.layer_decay={cfg.layer_decay}; run python -m "
                        "sslvl_jax.finetune, which sets them")

  def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
    cfg = self.config.finetune
    return Classifier(interop.build_module(self.encoder_config, rngs), int(cfg.num_classes),
                      float(cfg.get("head_init_std", 2e-5)), rngs=rngs)

  def init_model(self, rng: jax.Array) -> tuple[Any, Any]:
    """A new head; the encoder's variables are the pretrained ones."""
    model = self.build_model(nnx.Rngs(params=rng))
    tower_config, arrays = self.source.image_tower()
    tower = interop.mapping.fill_module(interop.mapping.abstract_module(tower_config), arrays,
                                        what=self.source.source)
    nnx.update(model.encoder, nnx.state(tower))
    self.graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
    return params, model_state

  def image_normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The pretrained encoder's input normalisation (its export's preprocessing)."""
    prep = self.source.preprocessing
    return tuple(map(float, prep["mean"])), tuple(map(float, prep["std"]))

  def normalize(self, images: jax.Array) -> jax.Array:
    """uint8 images -> the pretrained encoder's input scaling."""
    return device_ops.normalize(images.astype(jnp.float32) / 255.0, *self.image_normalization())

  def loss(self, model: nnx.Module, extras: Any, batch: dict, ctx: StepContext
           ) -> tuple[jax.Array, dict[str, jax.Array], Any]:
    cfg = self.config.finetune
    logits = model(self.normalize(batch["views0"][:, 0]), train=True, rng=ctx.rng)
    labels = batch["label"]
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]),
                                  cfg.get("label_smoothing", 0.0))
    loss = optax.softmax_cross_entropy(logits, targets).mean()
    accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
    return loss, {"accuracy": accuracy}, extras

  def image_features(self, model: nnx.Module, extras: Any, images: jax.Array) -> jax.Array:
    return model.features(self.normalize(images), train=False)

  def logits(self, model: nnx.Module, extras: Any, images: jax.Array) -> jax.Array:
    """Class logits of uint8 images (the classifier evaluator)."""
    del extras
    return model(self.normalize(images), train=False)

  def predict_fns(self, role: str | None = None) -> dict[str, Callable]:
    """'image_features' (pooled encoder features) and 'logits' (the head's)."""
    role = self.resolve_role(role)
    return {"image_features": self._predict_fn(self.image_features, role),
            "logits": self._predict_fn(self.logits, role)}

  def export_encoder(self, params: Any, model_state: Any, extras: Any, *,
                     role: str | None = None) -> tuple[dict, nnx.Module, dict]:
    """The fine-tuned encoder (the head is left out)."""
    role = self.resolve_role(role)
    net = self.predict_model(params, model_state)
    return (self.encoder_config, net.encoder,
            {"role": role, "tower": "image", "preprocessing": self.image_preprocessing()})

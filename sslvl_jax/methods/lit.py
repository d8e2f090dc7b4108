"""LiT, locked-image text tuning (Zhai et al. 2022): CLIP's loss, a pretrained image tower locked."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from flax import nnx
from ml_collections import ConfigDict

from sslvl_jax import losses
from sslvl_jax.errors import ConfigError
from sslvl_jax.interop.mapping import fill_module
from sslvl_jax.methods import METHODS, pretrained
from sslvl_jax.methods.base import StepContext
from sslvl_jax.methods.image_text import Clip


@METHODS.register("lit")
class Lit(Clip):
  """CLIP with the image tower (model.image) initialised from `model.image_init` (a source of
  sslvl_jax.methods.pretrained: export, checkpoint, open_clip, openai, dino, init) and locked.

  The locked tower runs in inference mode under stop_gradient, and `optim.lock_rules` must name
  it, so it gets no update, no weight decay and no optimiser state. model.lock_image_head (default
  True, as LiT) locks the image projection too, at its random initialisation; False trains it.
  The text tower, text projection and temperature train from scratch.
  """

  def __init__(self, config: ConfigDict, mesh: Any, schedule: Any):
    super().__init__(config, mesh, schedule)
    self.image_init = pretrained.load(config.model.get("image_init", ConfigDict()),
                                      "model.image_init")
    missing = [r for r in self.lock_rules() if r not in tuple(config.optim.get("lock_rules", ()))]
    if missing:
      raise ConfigError(f"optim.lock_rules={tuple(config.optim.get('lock_rules', ()))} lacks "
                        f"{missing}: LiT's locked params must get no optimiser state; set "
                        f"--config.optim.lock_rules=\"{self.lock_rules()}\"")
    prep = self.image_init.preprocessing
    if prep and not np.allclose(prep["mean"] + prep["std"], sum(self.image_normalization(), ())):
      raise ConfigError(f"data.mean/std {self.image_normalization()} differ from those the "
                        f"image tower of {self.image_init.source} was trained with "
                        f"({prep['mean']}, {prep['std']}); set --config.data.mean and .std to them")

  def lock_rules(self) -> tuple[str, ...]:
    """Regexes of the locked params: the image tower, and its projection unless trained."""
    head = ("^image_proj/",) if self.config.model.get("lock_image_head", True) else ()
    return ("^image/",) + head

  def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
    model = super().build_model(rngs)
    tower_config, arrays = self.image_init.image_tower()
    try:
      model.image = fill_module(model.image, arrays, what=self.image_init.source)
    except ValueError as e:
      raise ConfigError(f"model.image does not match the tower of model.image_init.source "
                        f"({e}); set model.image to {tower_config}") from None
    return model

  def embeddings(self, model: nnx.Module, extras: Any, batch: dict, ctx: StepContext
                 ) -> tuple[tuple[jax.Array, jax.Array], Any]:
    """L2-normalised (image, text) embeddings; no gradient reaches the locked tower (or head)."""
    feats = jax.lax.stop_gradient(model.image(self.normalize(batch["image"]))["pooled"])
    image = losses.l2_normalize(model.image_proj(feats))
    if self.config.model.get("lock_image_head", True):
      image = jax.lax.stop_gradient(image)
    text = model.encode_text(batch["tokens"], rng=jax.random.fold_in(ctx.stream("dropout"), 1))
    return (image, text), extras

"""Shared piece of the pretext-task methods (colorization, context encoder): backbone + decoder."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sslvl_jax import models
from sslvl_jax.methods.base import Method
from sslvl_jax.methods.ssl import SSLMethod, SSLModel
from sslvl_jax.models.decoders import ConvDecoder, feature_map


class DecoderMethod(SSLMethod):
  """A backbone (config.model.backbone) and a dense decoder (config.model.decoder: hidden_dim,
  num_layers) reading its spatial features; trained on crop group 0's first view (no photometric
  augmentation), evaluated and exported as the SSL methods (the backbone's pooled features)."""

  normalize = Method.normalize  # data.mean / data.std (the SSL methods read their view preset)
  image_normalization = Method.image_normalization

  def decoder_out_dim(self) -> int:
    """Channels of the decoder's output (bins, pixels)."""
    raise NotImplementedError

  def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
    backbone = self.build_backbone(rngs)
    decoder = ConvDecoder(models.width_of(backbone), self.decoder_out_dim(),
                          dtype=models.dtype_of(self.config.model.get("dtype", "float32")),
                          rngs=rngs, **self.config.model.decoder.to_dict())
    return SSLModel(backbone, {"decoder": decoder})

  def images(self, batch: dict) -> jax.Array:
    """The first view of crop group 0 as float32 RGB in [0, 1], (b, h, w, 3)."""
    return batch["views0"][:, 0].astype(jnp.float32) / 255.0

  def decode(self, model: nnx.Module, x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Training-mode decoder output (b, *size, decoder_out_dim) of the network input `x`."""
    out = model.backbone(x, train=True)
    return model.decoder(feature_map(out, x.shape[1:3]), size, train=True)

"""Image-text two-tower model (CLIP, SigLIP, ALIGN): encoders, projections, learnable temperature."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sslvl_jax.losses import l2_normalize
from sslvl_jax.models.layers import Dtype


class TwoTower(nnx.Module):
  """Encoders + bias-free linear projections to a shared space + logit scale (and bias).

  `logit_scale` holds log(t); `logit_bias` exists only when `logit_bias_init` is not None (SigLIP).
  """

  def __init__(self, image: nnx.Module, text: nnx.Module, *, image_width: int, text_width: int,
               embed_dim: int, logit_scale_init: float, logit_bias_init: float | None = None,
               param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    self.image, self.text = image, text
    init = nnx.initializers.normal(image_width ** -0.5)
    self.image_proj = nnx.Linear(image_width, embed_dim, use_bias=False, kernel_init=init,
                                 param_dtype=param_dtype, rngs=rngs)
    self.text_proj = nnx.Linear(text_width, embed_dim, use_bias=False,
                                kernel_init=nnx.initializers.normal(text_width ** -0.5),
                                param_dtype=param_dtype, rngs=rngs)
    self.logit_scale = nnx.Param(jnp.asarray(logit_scale_init, jnp.float32))
    self.logit_bias = (nnx.Param(jnp.asarray(logit_bias_init, jnp.float32))
                       if logit_bias_init is not None else None)

  def encode_image(self, images: jax.Array, *, rng: jax.Array | None = None) -> jax.Array:
    """L2-normalised image embeddings (b, embed_dim)."""
    return l2_normalize(self.image_proj(self.image(images, train=rng is not None, rng=rng)["pooled"]))

  def encode_text(self, tokens: jax.Array, *, rng: jax.Array | None = None) -> jax.Array:
    """L2-normalised text embeddings (b, embed_dim)."""
    return l2_normalize(self.text_proj(self.text(tokens, rng=rng)["pooled"]))

"""Context encoder (Pathak et al. 2016): reconstruct a masked region of the image from its context.

`loss.mask` picks the region (MASKS): 'center' (the central square of half the side, a quarter of
the area: the paper's default), 'random_block' (`loss.num_blocks` squares of a quarter side at
random places, up to a quarter of the area) or 'random_region' (a quarter of the area where a
smooth random field is highest: a stand-in for the paper's PASCAL segmentation shapes). The input
hole is the region shrunk by `loss.overlap_px` and filled with the data mean (0 after the data
normalisation); the decoder predicts the whole image and the L2 covers the region, the band of
`overlap_px` around the hole (visible in the input) weighted `loss.overlap_weight` (the paper: 4 px
at 128 px, weight 10). The adversarial term is not implemented (loss.adversarial_weight must be 0).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from sslvl_jax.errors import ConfigError
from sslvl_jax.methods import METHODS
from sslvl_jax.methods.base import StepContext
from sslvl_jax.methods.pretext import DecoderMethod
from sslvl_jax.registry import Registry

# name -> fn(key, batch, height, width, num_blocks) -> (b, h, w) bool region
MASKS: Registry[Callable[..., jax.Array]] = Registry("context encoder mask")


def _center(key: jax.Array, b: int, h: int, w: int, num_blocks: int) -> jax.Array:
  del key, num_blocks
  rows, cols = jnp.arange(h), jnp.arange(w)
  inside = ((rows >= h // 4) & (rows < h // 4 + h // 2))[:, None] & (
      (cols >= w // 4) & (cols < w // 4 + w // 2))[None]
  return jnp.broadcast_to(inside, (b, h, w))


def _random_block(key: jax.Array, b: int, h: int, w: int, num_blocks: int) -> jax.Array:
  sh, sw = h // 4, w // 4
  ky, kx = jax.random.split(key)
  top = jax.random.randint(ky, (b, num_blocks), 0, h - sh + 1)[..., None, None]
  left = jax.random.randint(kx, (b, num_blocks), 0, w - sw + 1)[..., None, None]
  rows, cols = jnp.arange(h)[:, None], jnp.arange(w)[None]
  blocks = (rows >= top) & (rows < top + sh) & (cols >= left) & (cols < left + sw)
  return jnp.any(blocks, axis=1)


def _random_region(key: jax.Array, b: int, h: int, w: int, num_blocks: int) -> jax.Array:
  del num_blocks
  coarse = jax.random.uniform(key, (b, h // 8 + 1, w // 8 + 1))
  field = jax.image.resize(coarse, (b, h, w), "bilinear").reshape(b, -1)
  threshold = jnp.quantile(field, 0.75, axis=-1, keepdims=True)
  return (field > threshold).reshape(b, h, w)


MASKS.add("center", _center)
MASKS.add("random_block", _random_block)
MASKS.add("random_region", _random_region)


def erode(region: jax.Array, px: int) -> jax.Array:
  """Boolean (b, h, w) region shrunk by `px` pixels (square structuring element)."""
  if px == 0:
    return region
  outside = (~region).astype(jnp.float32)[..., None]
  grown = nnx.max_pool(outside, (2 * px + 1, 2 * px + 1), strides=(1, 1), padding="SAME")
  return grown[..., 0] == 0


def masked_l2(pred: jax.Array, target: jax.Array, region: jax.Array, hole: jax.Array,
              overlap_weight: float) -> jax.Array:
  """Mean over the region's pixels and channels of w * (pred - target)^2, w = 1 in the hole and
  `overlap_weight` on the rest of the region (0 outside it)."""
  w = jnp.where(hole, 1.0, jnp.where(region, overlap_weight, 0.0))[..., None]
  sq = jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32))
  return jnp.sum(w * sq) / (jnp.sum(region) * target.shape[-1])


@METHODS.register("context_encoder")
class ContextEncoder(DecoderMethod):
  """Pathak et al.'s context encoder. config.loss: mask, overlap_px, overlap_weight, num_blocks
  (random_block), adversarial_weight (0: not implemented otherwise)."""

  def __init__(self, *args: Any, **kwargs: Any):
    super().__init__(*args, **kwargs)
    cfg = self.config.loss
    if cfg.get("adversarial_weight", 0.0):
      raise ConfigError(f"loss.adversarial_weight={cfg.adversarial_weight}: the adversarial term "
                        "is not supported yet; set loss.adversarial_weight=0")
    MASKS.get(cfg.get("mask", "center"))

  def decoder_out_dim(self) -> int:
    return 3

  def loss(self, model: nnx.Module, extras: Any, batch: dict, ctx: StepContext):
    cfg = self.config.loss
    x = self.normalize(batch["views0"][:, 0])  # data.mean / data.std: the mean fill is 0
    b, h, w, _ = x.shape
    region = MASKS.get(cfg.get("mask", "center"))(ctx.stream("method"), b, h, w,
                                                  cfg.get("num_blocks", 4))
    hole = erode(region, cfg.get("overlap_px", 0))
    pred = self.decode(model, jnp.where(hole[..., None], 0.0, x), (h, w))
    loss = masked_l2(pred, x, region, hole, cfg.get("overlap_weight", 1.0))
    return loss, {"masked_fraction": jnp.mean(region.astype(jnp.float32))}, extras

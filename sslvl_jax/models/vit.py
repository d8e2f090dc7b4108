"""Vision Transformer (ViT) image encoder in Flax NNX."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sslvl_jax.models.layers import Block, Dtype, bicubic_resize, check_remat, run_block, trunc_normal


def sincos_2d(grid: int, width: int) -> np.ndarray:
  """Fixed 2-D sine-cosine position embedding (MoCo v3 / MAE), shape (grid*grid, width)."""
  if width % 4:
    raise ValueError(f"sin-cos position embedding needs width divisible by 4, got {width}")
  y, x = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64),
                     indexing="ij")
  omega = 1.0 / 10000 ** (np.arange(width // 4) / (width // 4))
  out_x, out_y = np.outer(x.ravel(), omega), np.outer(y.ravel(), omega)
  return np.concatenate([np.sin(out_x), np.cos(out_x), np.sin(out_y), np.cos(out_y)], 1).astype(np.float32)


def resize_pos_jax(pos: jax.Array, grid_h: int, grid_w: int) -> jax.Array:
  """(1, n, n, d) patch position embeddings to (1, grid_h, grid_w, d): jax.image.resize bicubic."""
  return jax.image.resize(pos, (1, grid_h, grid_w, pos.shape[-1]), method="bicubic")


def resize_pos_dino(pos: jax.Array, grid_h: int, grid_w: int) -> jax.Array:
  """DINO's `interpolate_pos_encoding`: torch bicubic with scale factor (grid + 0.1) / n."""
  n = pos.shape[1]
  return bicubic_resize(pos, (grid_h, grid_w), ((grid_h + 0.1) / n, (grid_w + 0.1) / n))


# How patch position embeddings follow an input of another resolution than `image_size`.
POS_INTERPOLATIONS: dict[str, Callable[[jax.Array, int, int], jax.Array]] = {
    "jax": resize_pos_jax,  # Keys cubic (a=-0.5), antialiased when shrinking
    "dino": resize_pos_dino,  # DINO / torch: a=-0.75, no antialiasing, DINO's +0.1 scale factor
}


class ViT(nnx.Module):
  """ViT with class token, optional register tokens, cls or mean pooling.

  `__call__` returns a dict: `pooled` (b, width) after the final norm, `tokens` (b, t, width) after
  the final norm, and `patch_tokens` (b, n_patches, width). Images are NHWC (b, h, w, channels).
  Inputs of another resolution than `image_size` get bicubically interpolated patch position
  embeddings (DINO's 96 px local crops) by the `pos_interp` rule in POS_INTERPOLATIONS: 'jax'
  (jax.image.resize) or 'dino' (DINO's torch interpolation, exact; imported DINO models use it).
  `remat` ('none', 'block', 'dots_saveable', 'dots_with_no_batch_dims_saveable') recomputes each
  block's activations in the backward pass, saving what the named policy allows.
  """

  def __init__(self, *, image_size: int = 224, patch_size: int = 16, width: int = 768,
               depth: int = 12, num_heads: int = 12, mlp_dim: int | None = None,
               num_registers: int = 0, pool: str = "cls", pre_norm: bool = False,
               patch_bias: bool = True, qkv_bias: bool = True, ln_eps: float = 1e-6,
               act: str = "gelu", drop_path_rate: float = 0.0, pos_embed: str = "learned",
               pos_interp: str = "jax", freeze_patch_embed: bool = False,
               attention_impl: str | None = None,
               in_channels: int = 3, remat: str = "none", dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    if image_size % patch_size:
      raise ValueError(f"image_size {image_size} is not divisible by patch_size {patch_size}")
    if pool not in ("cls", "mean"):
      raise ValueError(f"unknown ViT pool {pool!r}; use 'cls' or 'mean'")
    if pos_interp not in POS_INTERPOLATIONS:
      raise ValueError(f"unknown pos_interp {pos_interp!r}; use one of {tuple(POS_INTERPOLATIONS)}")
    self.pos_interp, self.in_channels = pos_interp, in_channels
    self.patch_size, self.width, self.pool = patch_size, width, pool
    self.num_registers, self.freeze_patch_embed = num_registers, freeze_patch_embed
    self.grid = image_size // patch_size
    self.remat = check_remat(remat)
    self.dtype = dtype
    self.patch_embed = nnx.Conv(in_channels, width, (patch_size, patch_size), strides=patch_size,
                                padding="VALID", use_bias=patch_bias, dtype=dtype,
                                param_dtype=param_dtype, rngs=rngs)
    self.cls_token = nnx.Param(jax.random.normal(rngs.params(), (1, 1, width), param_dtype) * 1e-6)
    if pos_embed == "learned":
      pos = trunc_normal(rngs.params(), (1, 1 + self.grid ** 2, width), param_dtype)
      self.pos_embed = nnx.Param(pos)
    elif pos_embed == "sincos":
      pos = np.concatenate([np.zeros((1, width), np.float32), sincos_2d(self.grid, width)])[None]
      self.pos_embed = nnx.Variable(jnp.asarray(pos, param_dtype))  # fixed, not trained
    else:
      raise ValueError(f"unknown pos_embed {pos_embed!r}; use 'learned' or 'sincos'")
    self.registers = nnx.Param(trunc_normal(rngs.params(), (1, num_registers, width), param_dtype)
                               ) if num_registers else None
    self.ln_pre = nnx.LayerNorm(width, epsilon=ln_eps, dtype=dtype, param_dtype=param_dtype,
                                rngs=rngs) if pre_norm else None
    rates = np.linspace(0.0, drop_path_rate, depth).tolist()
    self.blocks = nnx.List([
        Block(width, num_heads, mlp_dim or 4 * width, act=act, ln_eps=ln_eps, qkv_bias=qkv_bias,
              drop_path_rate=rates[i], attention_impl=attention_impl, dtype=dtype,
              param_dtype=param_dtype, rngs=rngs) for i in range(depth)])
    self.norm = nnx.LayerNorm(width, epsilon=ln_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def _pos_embed(self, grid_h: int, grid_w: int) -> jax.Array:
    pos = self.pos_embed[...]
    if (grid_h, grid_w) == (self.grid, self.grid):
      return pos
    patch_pos = pos[:, 1:].reshape(1, self.grid, self.grid, self.width)
    patch_pos = POS_INTERPOLATIONS[self.pos_interp](patch_pos.astype(jnp.float32), grid_h, grid_w
                                                    ).astype(pos.dtype)
    return jnp.concatenate([pos[:, :1], patch_pos.reshape(1, grid_h * grid_w, self.width)], 1)

  def embed(self, images: jax.Array) -> jax.Array:
    """Patch + class + register tokens with position embeddings, (b, t, width)."""
    if images.ndim != 4 or images.shape[-1] != self.in_channels:
      raise ValueError(f"ViT expects NHWC images (batch, height, width, {self.in_channels}), got "
                       f"shape {images.shape}; transpose NCHW (PyTorch) input with "
                       "x.transpose(0, 2, 3, 1)")
    x = self.patch_embed(images.astype(self.dtype))
    if self.freeze_patch_embed:
      x = jax.lax.stop_gradient(x)
    b, gh, gw, d = x.shape
    x = x.reshape(b, gh * gw, d)
    cls = jnp.broadcast_to(self.cls_token[...], (b, 1, d)).astype(x.dtype)
    x = jnp.concatenate([cls, x], 1) + self._pos_embed(gh, gw).astype(x.dtype)
    if self.registers is not None:
      reg = jnp.broadcast_to(self.registers[...], (b, self.num_registers, d)).astype(x.dtype)
      x = jnp.concatenate([x[:, :1], reg, x[:, 1:]], 1)
    if self.ln_pre is not None:
      x = self.ln_pre(x)
    return x

  def __call__(self, images: jax.Array, *, train: bool = False, rng: jax.Array | None = None
               ) -> dict[str, jax.Array]:
    """Encode images; stochastic depth runs only with `train` and an `rng`."""
    rng = rng if train else None
    x = self.embed(images)
    rngs = [None] * len(self.blocks) if rng is None else list(jax.random.split(rng, len(self.blocks)))
    for blk, r in zip(self.blocks, rngs):
      x = run_block(blk, self.remat, x, rng=r)
    x = self.norm(x)
    patches = x[:, 1 + self.num_registers:]
    pooled = x[:, 0] if self.pool == "cls" else patches.mean(axis=1)
    return {"pooled": pooled, "tokens": x, "patch_tokens": patches}

  def last_attention(self, images: jax.Array) -> jax.Array:
    """Attention weights (b, heads, t, t) of the last block, for DINO attention maps."""
    x = self.embed(images)
    for blk in self.blocks[:-1]:
      x = blk(x)
    last = self.blocks[-1]
    return last.attn.weights(last.ln1(x))

"""CLIP-style text transformer in Flax NNX."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sslvl_jax.models.layers import Block, Dtype, check_remat, run_block

POOLS = ("first_eot", "last_nonpad", "argmax", "first")


def pool_positions(tokens: jax.Array, pool: str, eot_id: int, pad_id: int) -> jax.Array:
  """Index of the token whose feature represents the sequence, per row.

  first_eot: first occurrence of `eot_id`; last_nonpad: last token that is not `pad_id`;
  argmax: position of the largest id (only valid when EOT is the largest id, as in OpenAI's BPE);
  first: position 0 (a [CLS] token, BERT/ALIGN style).
  """
  if pool == "first_eot":
    return jnp.argmax(tokens == eot_id, axis=-1)
  if pool == "last_nonpad":
    return jnp.sum(tokens != pad_id, axis=-1) - 1
  if pool == "argmax":
    return jnp.argmax(tokens, axis=-1)
  if pool == "first":
    return jnp.zeros(tokens.shape[:1], jnp.int32)
  raise ValueError(f"unknown text pool {pool!r}; use one of {POOLS}")


class TextTransformer(nnx.Module):
  """Token + learned position embeddings, pre-norm blocks (causal by default), final norm, pooling.

  `remat` ('none', 'block' or a named checkpoint policy, see layers.REMAT_POLICIES) recomputes each
  block's activations in the backward pass.
  """

  def __init__(self, *, vocab_size: int, context_length: int = 77, width: int = 512,
               depth: int = 12, num_heads: int = 8, mlp_dim: int | None = None,
               causal: bool = True, pool: str = "first_eot", eot_id: int = 3, pad_id: int = 0,
               ln_eps: float = 1e-5, act: str = "gelu", attention_impl: str | None = None,
               remat: str = "none", dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
               rngs: nnx.Rngs):
    if pool not in POOLS:
      raise ValueError(f"unknown text pool {pool!r}; use one of {POOLS}")
    self.context_length, self.causal, self.pool = context_length, causal, pool
    self.eot_id, self.pad_id = eot_id, pad_id
    self.remat = check_remat(remat)
    self.token_embed = nnx.Embed(vocab_size, width, embedding_init=nnx.initializers.normal(0.02),
                                 dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.pos_embed = nnx.Param(nnx.initializers.normal(0.01)(rngs.params(), (context_length, width),
                                                             param_dtype))
    self.blocks = nnx.List([
        Block(width, num_heads, mlp_dim or 4 * width, act=act, ln_eps=ln_eps,
              attention_impl=attention_impl, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        for _ in range(depth)])
    self.norm = nnx.LayerNorm(width, epsilon=ln_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, tokens: jax.Array, *, rng: jax.Array | None = None) -> dict[str, jax.Array]:
    if tokens.ndim != 2 or tokens.shape[1] != self.context_length:
      raise ValueError(f"text tower expects tokens of shape (batch, {self.context_length}), "
                       f"got {tokens.shape}; set the tokenizer's context_length to match")
    x = self.token_embed(tokens) + self.pos_embed[...].astype(self.token_embed.dtype)
    mask = None
    if not self.causal:
      mask = (tokens != self.pad_id)[:, None, None, :]
    for blk in self.blocks:
      x = run_block(blk, self.remat, x, static=dict(is_causal=self.causal), mask=mask)
    x = self.norm(x)
    pos = pool_positions(tokens, self.pool, self.eot_id, self.pad_id)
    pooled = jnp.take_along_axis(x, pos[:, None, None], axis=1)[:, 0]
    return {"pooled": pooled, "tokens": x}

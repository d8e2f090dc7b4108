"""Transformer building blocks shared by the image and text towers."""

from __future__ import annotations

import logging
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

Dtype = jnp.dtype
trunc_normal = nnx.initializers.truncated_normal(stddev=0.02)

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "relu": jax.nn.relu,
}

_warned: set[str] = set()


def resolve_attention_impl(requested: str | None, seq_len: int) -> str | None:
  """Pick the `jax.nn.dot_product_attention` implementation; cuDNN only where it can run.

  cuDNN flash attention needs a GPU and a token count that is a multiple of 8 (197 and 77 are
  refused; pad with register tokens or use context 80). Anything else falls back to XLA, once
  logged, so a config asking for cuDNN still runs on CPU/TPU.
  """
  if requested in (None, "xla"):
    return None if requested is None else "xla"
  if requested != "cudnn":
    raise ValueError(f"unknown attention implementation {requested!r}; use 'xla' or 'cudnn'")
  reason = None
  if jax.default_backend() != "gpu":
    reason = f"backend is {jax.default_backend()}"
  elif seq_len % 8:
    reason = f"sequence length {seq_len} is not a multiple of 8"
  if reason is None:
    return "cudnn"
  if reason not in _warned:
    _warned.add(reason)
    logging.warning("cuDNN attention unavailable (%s); using XLA attention", reason)
  return "xla"


class Attention(nnx.Module):
  """Multi-head self-attention with one fused qkv projection."""

  def __init__(self, width: int, num_heads: int, *, qkv_bias: bool = True,
               implementation: str | None = None, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    if width % num_heads:
      raise ValueError(f"width {width} is not divisible by num_heads {num_heads}")
    self.num_heads = num_heads
    self.implementation = implementation
    self.qkv = nnx.Linear(width, 3 * width, use_bias=qkv_bias, kernel_init=trunc_normal,
                          dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.out = nnx.Linear(width, width, kernel_init=trunc_normal, dtype=dtype,
                          param_dtype=param_dtype, rngs=rngs)

  def _qkv(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    b, t, d = x.shape
    qkv = self.qkv(x).reshape(b, t, 3, self.num_heads, d // self.num_heads)
    return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]

  def __call__(self, x: jax.Array, *, is_causal: bool = False,
               mask: jax.Array | None = None) -> jax.Array:
    q, k, v = self._qkv(x)
    impl = resolve_attention_impl(self.implementation, x.shape[1])
    y = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal, implementation=impl)
    return self.out(y.reshape(x.shape))

  def weights(self, x: jax.Array) -> jax.Array:
    """Softmax attention weights (b, heads, t, t), for attention-map visualisation."""
    q, k, _ = self._qkv(x)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(q.shape[-1]).astype(q.dtype)
    return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)


class Mlp(nnx.Module):
  """Two-layer MLP of a transformer block."""

  def __init__(self, width: int, hidden: int, act: str, *, dtype: Dtype, param_dtype: Dtype,
               rngs: nnx.Rngs):
    self.act = act
    self.fc1 = nnx.Linear(width, hidden, kernel_init=trunc_normal, dtype=dtype,
                          param_dtype=param_dtype, rngs=rngs)
    self.fc2 = nnx.Linear(hidden, width, kernel_init=trunc_normal, dtype=dtype,
                          param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(ACTIVATIONS[self.act](self.fc1(x)))


def drop_path(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
  """Stochastic depth: zero whole residual branches per example; identity without an rng."""
  if rng is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(rng, 1.0 - rate, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


class Block(nnx.Module):
  """Pre-norm transformer block: x + attn(ln(x)), x + mlp(ln(x)), with drop path."""

  def __init__(self, width: int, num_heads: int, mlp_dim: int, *, act: str = "gelu",
               ln_eps: float = 1e-6, qkv_bias: bool = True, drop_path_rate: float = 0.0,
               attention_impl: str | None = None, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    self.drop_path_rate = drop_path_rate
    self.ln1 = nnx.LayerNorm(width, epsilon=ln_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.attn = Attention(width, num_heads, qkv_bias=qkv_bias, implementation=attention_impl,
                          dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.ln2 = nnx.LayerNorm(width, epsilon=ln_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.mlp = Mlp(width, mlp_dim, act, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x: jax.Array, *, is_causal: bool = False, mask: jax.Array | None = None,
               rng: jax.Array | None = None) -> jax.Array:
    r1 = r2 = None
    if rng is not None:
      r1, r2 = jax.random.split(rng)
    x = x + drop_path(self.attn(self.ln1(x), is_causal=is_causal, mask=mask), self.drop_path_rate, r1)
    return x + drop_path(self.mlp(self.ln2(x)), self.drop_path_rate, r2)

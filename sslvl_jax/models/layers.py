"""Transformer building blocks shared by the image and text towers."""

from __future__ import annotations

import logging
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
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
CUDNN_SEQ_MULTIPLE = 8  # cuDNN attention runs on tokens padded to a multiple of this

REMAT_POLICIES: dict[str, Callable[..., bool] | None] = {
    "none": None,  # no rematerialisation
    "block": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def check_remat(remat: str) -> str:
  """Validate a `remat` setting: 'none', 'block' or a named jax.checkpoint_policies policy."""
  if remat not in REMAT_POLICIES:
    raise ValueError(f"unknown remat {remat!r}; use one of {tuple(REMAT_POLICIES)}")
  return remat


def run_block(block: nnx.Module, remat: str, x: jax.Array, *, static: dict[str, Any] | None = None,
              **arrays: jax.Array | None) -> jax.Array:
  """`block(x, **arrays, **static)`, recomputed in the backward pass under the `remat` policy.

  `arrays` (masks, rngs, None allowed) are traced through `nnx.remat`; `static` (Python flags such
  as `train`, `is_causal`, `bn_groups`) are closed over. Variable updates inside the block
  (BatchNorm statistics) propagate out as without remat.
  """
  static = static or {}
  if check_remat(remat) == "none":
    return block(x, **arrays, **static)

  def apply(mdl: nnx.Module, x: jax.Array, arrays: dict[str, jax.Array | None]) -> jax.Array:
    return mdl(x, **arrays, **static)

  return nnx.remat(apply, policy=REMAT_POLICIES[remat])(block, x, arrays)


def cudnn_unavailable(backend: str, dtype: Any, head_dim: int,
                      compute_capability: str | None = None) -> str | None:
  """Why cuDNN flash attention cannot run with these settings, or None when it can.

  It needs an NVIDIA GPU (one with a CUDA compute capability), bf16/fp16 inputs and a head dim that
  is a multiple of 8 and at most 128 (256 from Hopper, compute capability 9.0, on); the token count
  is free, `Attention` pads it.
  """
  if backend != "gpu":
    return f"backend is {backend}"
  if not compute_capability:
    return "the GPU has no CUDA compute capability"
  dtype = jnp.dtype(dtype)
  if dtype not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    return f"dtype is {dtype.name}; cuDNN flash attention needs bfloat16 or float16"
  major = int(str(compute_capability).split(".")[0])
  max_dim = 256 if major >= 9 else 128
  if head_dim % 8 or head_dim > max_dim:
    return f"head dim {head_dim} is not a multiple of 8 at most {max_dim}"
  return None


def resolve_attention_impl(requested: str | None, *, dtype: Any, head_dim: int) -> str | None:
  """Pick the `jax.nn.dot_product_attention` implementation; cuDNN only where it can run.

  Anything cuDNN cannot run (see `cudnn_unavailable`) falls back to XLA, logged once per reason, so
  a config asking for cuDNN still runs on CPU/TPU and in float32.
  """
  if requested in (None, "xla"):
    return None if requested is None else "xla"
  if requested != "cudnn":
    raise ValueError(f"unknown attention implementation {requested!r}; use 'xla' or 'cudnn'")
  backend = jax.default_backend()
  capability = getattr(jax.devices()[0], "compute_capability", None) if backend == "gpu" else None
  reason = cudnn_unavailable(backend, dtype, head_dim, capability)
  if reason is None:
    return "cudnn"
  if reason not in _warned:
    _warned.add(reason)
    logging.warning("cuDNN attention unavailable (%s); using XLA attention", reason)
  return "xla"


def attend(q: jax.Array, k: jax.Array, v: jax.Array, *, implementation: str | None,
           mask: jax.Array | None = None, is_causal: bool = False, pad_to: int = 1) -> jax.Array:
  """`jax.nn.dot_product_attention` on (b, t, heads, dim), tokens padded to a multiple of `pad_to`.

  With `pad_to` > 1 the zero-padded tokens are masked out by query/key-value sequence lengths and
  the output sliced back, so the result equals the unpadded one; a `mask` is broadcast to (t, t)
  and padded too (cuDNN wants the full query x key extent). Padding is at the end, so causal
  attention never sees it either.
  """
  if pad_to <= 1:
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal,
                                        implementation=implementation)
  b, t = q.shape[:2]
  pad = -t % pad_to
  if mask is not None:
    lead = mask.shape[:max(mask.ndim - 2, 0)]
    mask = jnp.broadcast_to(mask, (1,) * (2 - len(lead)) + lead + (t, t))
    mask = jnp.pad(mask, ((0, 0), (0, 0), (0, pad), (0, pad)), constant_values=False)
  lengths = None
  if pad:
    q, k, v = (jnp.pad(a, ((0, 0), (0, pad), (0, 0), (0, 0))) for a in (q, k, v))
    lengths = jnp.full((b,), t, jnp.int32)
  y = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal,
                                   query_seq_lengths=lengths, key_value_seq_lengths=lengths,
                                   implementation=implementation)
  return y[:, :t]


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
    impl = resolve_attention_impl(self.implementation, dtype=q.dtype, head_dim=q.shape[-1])
    y = attend(q, k, v, implementation=impl, mask=mask, is_causal=is_causal,
               pad_to=CUDNN_SEQ_MULTIPLE if impl == "cudnn" else 1)
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


CUBIC_A = -0.75  # torch's (and OpenCV's) bicubic convolution constant; Keys' is -0.5


def _cubic_near(x: np.ndarray) -> np.ndarray:  # weight of a tap at distance x <= 1
  return ((CUBIC_A + 2) * x - (CUBIC_A + 3)) * x * x + 1


def _cubic_far(x: np.ndarray) -> np.ndarray:  # weight of a tap at distance 1 < x < 2
  return ((CUBIC_A * x - 5 * CUBIC_A) * x + 8 * CUBIC_A) * x - 4 * CUBIC_A


def _cubic_matrix(in_size: int, out_size: int, scale: float) -> np.ndarray:
  """(out, in) weights of torch's bicubic (a=-0.75, align_corners=False, borders clamped, no AA)."""
  src = (np.arange(out_size) + 0.5) / scale - 0.5  # torch's source pixel for a given scale_factor
  left = np.floor(src)
  t = src - left
  weights = np.stack([_cubic_far(t + 1), _cubic_near(t), _cubic_near(1 - t), _cubic_far(2 - t)], 1)
  taps = np.clip(left.astype(np.int64)[:, None] + np.arange(-1, 3), 0, in_size - 1)
  out = np.zeros((out_size, in_size))
  np.add.at(out, (np.repeat(np.arange(out_size), 4), taps.ravel()), weights.ravel())
  return out.astype(np.float32)


def bicubic_resize(x: jax.Array, out_hw: tuple[int, int], scale: tuple[float, float]) -> jax.Array:
  """Resize (b, h, w, c) as torch's `interpolate(mode='bicubic', scale_factor=scale)`.

  As torch does when given a scale factor, output pixel i samples (i + 0.5) / scale - 0.5 (not
  the in / out size ratio); cubic a=-0.75, align_corners=False, no antialiasing, out-of-range taps
  clamped to the border.
  """
  h, w = x.shape[1:3]
  wh = jnp.asarray(_cubic_matrix(h, out_hw[0], scale[0]))
  ww = jnp.asarray(_cubic_matrix(w, out_hw[1], scale[1]))
  y = jnp.einsum("oh,bhwc->bowc", wh, x.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
  return jnp.einsum("pw,bowc->bopc", ww, y, precision=jax.lax.Precision.HIGHEST).astype(x.dtype)

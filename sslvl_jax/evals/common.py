"""Helpers shared by the evaluation modules."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """Row-wise L2 normalisation in f32, x / max(|x|, eps) (torch's F.normalize, as in DINO/CLIP)."""
  x = jnp.asarray(x, jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def similarity(a: jax.Array, b: jax.Array) -> jax.Array:
  """a @ b.T in f32 at full precision (neighbour ranks must not depend on the backend's default)."""
  return jnp.dot(a, b.T, precision=jax.lax.Precision.HIGHEST)

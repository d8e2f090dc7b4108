"""Helpers shared by the evaluation modules."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def similarity(a: jax.Array, b: jax.Array) -> jax.Array:
  """a @ b.T in f32 at full precision (neighbour ranks must not depend on the backend's default)."""
  return jnp.dot(a, b.T, precision=jax.lax.Precision.HIGHEST)

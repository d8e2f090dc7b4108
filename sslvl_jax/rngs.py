"""The run's random streams, all derived from `config.seed` and never shared.

  seed_key(seed) ── "params"  initial parameters (nnx.Rngs(params=...))
                ├─ "extras"  method state: an independently drawn teacher, MoCo's queue
                └─ "steps"   step t: step_key(seed key, t), split inside the step into
                             "augment" (views, crops' photometric ops), "dropout" (dropout and
                             drop path) and "method" (anything else a loss draws: MoCo's
                             batch shuffle)

Each stream is a `fold_in` of its parent with the stream's fixed index, so adding a stream
leaves the others unchanged, and no key of one stream is a key of another.
"""

from __future__ import annotations

import jax

INIT_STREAMS = {"params": 0, "extras": 1, "steps": 2}  # children of the seed key
STEP_STREAMS = {"augment": 0, "dropout": 1, "method": 2}  # children of a step's key


def seed_key(seed: int) -> jax.Array:
  """The root key of a run."""
  return jax.random.key(seed)


def stream(root: jax.Array, name: str) -> jax.Array:
  """The key of init stream `name` ('params', 'extras', 'steps') of the seed key `root`."""
  return jax.random.fold_in(root, INIT_STREAMS[name])


def step_key(root: jax.Array, step: jax.Array | int) -> jax.Array:
  """The key of step `step` (the 'steps' stream folded with the step number)."""
  return jax.random.fold_in(stream(root, "steps"), step)


def step_stream(key: jax.Array, name: str) -> jax.Array:
  """Stream `name` ('augment', 'dropout', 'method') of a step's key."""
  return jax.random.fold_in(key, STEP_STREAMS[name])

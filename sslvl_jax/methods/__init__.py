"""Method registry: `config.method` -> a Method subclass."""

from __future__ import annotations

from sslvl_jax.methods.base import Method, StepContext, TrainState
from sslvl_jax.registry import Registry

METHODS: Registry = Registry("method")

from sslvl_jax.methods import contrastive, image_text, teacher_student  # noqa: E402,F401


def get(name: str) -> type[Method]:
  """The Method class registered as `name`."""
  return METHODS.get(name)


__all__ = ["METHODS", "Method", "StepContext", "TrainState", "get"]

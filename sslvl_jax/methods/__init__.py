"""Method registry: `config.method` -> a Method subclass, found in this package's modules."""

from __future__ import annotations

from sslvl_jax.methods.base import Method, StepContext, TrainState
from sslvl_jax.registry import Registry

METHODS: Registry = Registry("method", package=__name__)  # one file per method family


def get(name: str) -> type[Method]:
  """The Method class registered as `name`."""
  return METHODS.get(name)


__all__ = ["METHODS", "Method", "StepContext", "TrainState", "get"]

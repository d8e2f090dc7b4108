"""A tiny name -> object registry used for models, methods, evaluators and data sources."""

from __future__ import annotations

from typing import Any, Callable, Generic, TypeVar

from sslvl_jax.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
  """Maps config strings to code; unknown names fail with the list of known ones."""

  def __init__(self, kind: str):
    self.kind = kind
    self._items: dict[str, T] = {}

  def register(self, name: str) -> Callable[[T], T]:
    """Decorator: register `obj` under `name`."""
    def deco(obj: T) -> T:
      if name in self._items:
        raise ValueError(f"{self.kind} {name!r} registered twice")
      self._items[name] = obj
      return obj
    return deco

  def add(self, name: str, obj: T) -> None:
    """Register `obj` under `name` (non-decorator form)."""
    self.register(name)(obj)

  def get(self, name: str) -> T:
    """Return the object registered as `name`, or raise a ConfigError listing the known names."""
    if name not in self._items:
      known = ", ".join(sorted(self._items))
      raise ConfigError(f"unknown {self.kind} {name!r}; known: {known}")
    return self._items[name]

  def names(self) -> list[str]:
    """All registered names, sorted."""
    return sorted(self._items)

  def __contains__(self, name: Any) -> bool:
    return name in self._items

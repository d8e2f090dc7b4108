"""Name -> object registries for models, methods, evaluators, data sources and presets.

A registry with a `package` finds its entries by module: an unknown name imports every module of
that package once (each registers what it defines), so a new method, evaluator, model or source
is one new file there. Any registry also takes `module.path:name`: the module is imported (it
registers `name`), so code outside this package plugs in from a config string alone.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any, Callable, Generic, TypeVar

from sslvl_jax.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
  """Maps config strings to code; unknown names fail with the list of known ones."""

  def __init__(self, kind: str, package: str | None = None):
    self.kind, self.package = kind, package
    self._items: dict[str, T] = {}
    self._discovered = package is None

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

  def _discover(self) -> None:
    """Import every module of `package` once, so each registers what it defines."""
    if self._discovered:
      return
    self._discovered = True
    root = importlib.import_module(self.package)
    for info in pkgutil.iter_modules(root.__path__, f"{self.package}."):
      importlib.import_module(info.name)

  def get(self, name: str) -> T:
    """The object registered as `name` (or `module.path:name`), else a ConfigError listing the
    known names."""
    module, _, short = name.rpartition(":")
    if module:
      try:
        importlib.import_module(module)
      except ImportError as e:
        raise ConfigError(f"{self.kind} {name!r}: cannot import {module!r} ({e})") from None
      if short not in self._items:
        raise ConfigError(f"{self.kind} {name!r}: module {module!r} registers no {short!r}")
      return self._items[short]
    if name not in self._items:
      self._discover()
    if name not in self._items:
      raise ConfigError(f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}")
    return self._items[name]

  def names(self) -> list[str]:
    """All registered names (after discovery), sorted."""
    self._discover()
    return sorted(self._items)

  def __contains__(self, name: Any) -> bool:
    if name not in self._items:
      self._discover()
    return name in self._items

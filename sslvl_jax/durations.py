"""Durations in configs are `<name>_steps`, `<name>_epochs` or `<name>_examples`: converted here only."""

from __future__ import annotations

from typing import Any, Mapping

from sslvl_jax.errors import ConfigError

UNITS = ("steps", "epochs", "examples")


def to_steps(cfg: Mapping[str, Any], name: str, steps_per_epoch: float, global_batch_size: int,
             default: int | None = None) -> int:
  """Resolve `<name>_steps`, `<name>_epochs` or `<name>_examples` in `cfg` to a step count."""
  given = {u: cfg.get(f"{name}_{u}") for u in UNITS}
  given = {u: v for u, v in given.items() if v is not None}
  if len(given) > 1:
    raise ConfigError(f"set only one of {', '.join(f'{name}_{u}' for u in given)}")
  if "steps" in given:
    return int(given["steps"])
  if "epochs" in given:
    return int(round(given["epochs"] * steps_per_epoch))
  if "examples" in given:
    return int(round(given["examples"] / global_batch_size))
  if default is None:
    raise ConfigError(f"set {name}_steps, {name}_epochs or {name}_examples in the config")
  return default

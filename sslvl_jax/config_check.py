"""Checks a resolved config before anything is built, so mistakes fail fast with one clear line."""

from __future__ import annotations

from ml_collections import ConfigDict

from sslvl_jax.errors import ConfigError

REQUIRED = ("method", "global_batch_size", "seed", "data", "model", "optim")


def validate(config: ConfigDict) -> None:
  """Raise ConfigError naming the first missing, unknown or inconsistent setting."""
  from sslvl_jax import data, methods  # pylint: disable=g-import-not-at-top
  from sslvl_jax.evals.tasks import EVALUATORS  # pylint: disable=g-import-not-at-top
  for key in REQUIRED:
    if key not in config:
      raise ConfigError(f"config has no {key!r}; every recipe sets {', '.join(REQUIRED)}")
  methods.get(config.method)
  data.SOURCES.get(config.data.name)
  if not isinstance(config.global_batch_size, int) or config.global_batch_size <= 0:
    raise ConfigError(f"global_batch_size must be a positive integer, got {config.global_batch_size!r}")
  if all(config.get(f"total_{u}") is None for u in ("steps", "epochs", "examples")):
    raise ConfigError("set total_steps, total_epochs or total_examples")
  for name, ev in config.get("evals", {}).items():
    if "type" not in ev:
      raise ConfigError(f"evals.{name} has no 'type'; known: {', '.join(EVALUATORS.names())}")
    EVALUATORS.get(ev.type)

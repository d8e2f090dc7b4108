"""Checks a resolved config before anything is built, so mistakes fail fast with one clear line."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import re
from typing import Any, Callable, Iterator, Mapping

from ml_collections import ConfigDict

from sslvl_jax.errors import ConfigError
from sslvl_jax.models.layers import REMAT_POLICIES

REQUIRED = ("method", "global_batch_size", "seed", "data", "model", "optim")
# Sizes under model.* and data.* (also evals.*.data.*) that must be positive integers.
DIMENSIONS = (r"\w+_dim|hidden|bottleneck|width|depth|num_heads|num_layers|nlayers|image_size"
              r"|patch_size|context_length|bn_group_size|vocab_size")


def is_number(v: Any) -> bool:
  """An int or float that is not a bool."""
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def positive_int(v: Any) -> bool:
  """An int > 0 (not a bool)."""
  return is_number(v) and isinstance(v, int) and v > 0


def positive_number(v: Any) -> bool:
  """A finite number > 0."""
  return is_number(v) and math.isfinite(v) and v > 0


def non_negative_number(v: Any) -> bool:
  """A finite number >= 0."""
  return is_number(v) and math.isfinite(v) and v >= 0


def fraction(v: Any) -> bool:
  """A number in [0, 1]."""
  return is_number(v) and 0 <= v <= 1


@dataclasses.dataclass(frozen=True)
class Rule:
  """Every setting whose dotted key fully matches `pattern` must pass `ok`, i.e. be `want`."""

  pattern: str
  ok: Callable[[Any], bool]
  want: str


RULES = (
    Rule(r"global_batch_size|total_steps|log_every_steps|checkpoint_every_steps|keep_checkpoints"
         r"|max_consecutive_skips|stop_at_step|num_devices|preemption_check_every_steps"
         r"|microbatches",
         positive_int, "a positive integer"),
    Rule(r"total_(epochs|examples)", positive_number, "a positive number"),
    Rule(r"optim\.lr(_per_256|_sqrt)?", non_negative_number, "a finite number >= 0"),
    Rule(r"data\.max_skip_fraction", fraction, "a fraction in [0, 1]"),
    Rule(r"nonfinite", lambda v: v in ("stop", "skip"), "'stop' or 'skip'"),
    Rule(r"loss\.chunk_size", lambda v: v == 0 or positive_int(v), "an integer >= 0 (0: dense)"),
    Rule(rf"(.+\.)?(model|data)\.(.+\.)?({DIMENSIONS})", positive_int, "a positive integer"),
    Rule(r"model\.(.+\.)?remat", lambda v: v in REMAT_POLICIES, f"one of {tuple(REMAT_POLICIES)}"),
)


def flatten(c: ConfigDict | Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
  """(dotted key, value) of every leaf setting of a (nested) config; lists are values."""
  for k, v in c.items():
    if isinstance(v, (ConfigDict, Mapping)) and len(v):
      yield from flatten(v, f"{prefix}{k}.")
    else:
      yield f"{prefix}{k}", v


def check_rules(settings: dict[str, Any]) -> None:
  """Raise ConfigError for the first set (not None) value a matching rule rejects."""
  for key, value in settings.items():
    for rule in RULES:
      if value is not None and re.fullmatch(rule.pattern, key) and not rule.ok(value):
        raise ConfigError(f"{key} must be {rule.want}, got {value!r}")


def vit_geometry(tower: Any) -> tuple[int, int] | None:
  """(image_size, patch_size) a tower config builds a ViT with; None if it is not a ViT."""
  from sslvl_jax.models import MODELS, ViT  # pylint: disable=g-import-not-at-top
  if not isinstance(tower, ConfigDict) or tower.get("name") not in MODELS:
    return None
  factory = MODELS.get(tower.name)
  if not (isinstance(factory, functools.partial) and factory.func is ViT):
    return None
  kw = {k: p.default for k, p in inspect.signature(ViT.__init__).parameters.items()}
  kw.update(factory.keywords, **dict(tower.items()))
  return kw["image_size"], kw["patch_size"]


def input_sizes(config: ConfigDict, settings: dict[str, Any]) -> list[tuple[str, int]]:
  """(what, size) of every image size the image tower sees: data and eval sizes, crops."""
  from sslvl_jax.data import host_ops  # pylint: disable=g-import-not-at-top
  sizes = [(k, v) for k, v in settings.items() if k.endswith("data.image_size") and v is not None]
  if config.data.get("crop_groups"):
    sizes += [("data.crop_groups size", group[0]) for group in config.data.crop_groups]
  elif config.data.get("crops"):
    sizes += [(f"data.crops={config.data.crops!r} crop size", spec.size)
              for spec, _ in host_ops.CROPS.get(config.data.crops).groups]
  return sizes


def check_patches(config: ConfigDict, settings: dict[str, Any]) -> None:
  """Raise ConfigError if a ViT tower would get images whose size is not a multiple of its patch."""
  seen = input_sizes(config, settings)
  for tower, cfg in config.model.items():
    geometry = vit_geometry(cfg)
    if geometry is None:
      continue
    own_size, patch = geometry
    for what, size in [(f"model.{tower}.image_size", own_size), *seen]:
      if size % patch:
        raise ConfigError(f"{what} must be a multiple of the patch size {patch} of model.{tower} "
                          f"({cfg.name}), got {size}")


def validate(config: ConfigDict) -> None:
  """Raise ConfigError naming the first missing, unknown or inconsistent setting."""
  from sslvl_jax import data, methods  # pylint: disable=g-import-not-at-top
  from sslvl_jax.evals.tasks import EVALUATORS  # pylint: disable=g-import-not-at-top
  for key in REQUIRED:
    if key not in config:
      raise ConfigError(f"config has no {key!r}; every recipe sets {', '.join(REQUIRED)}")
  methods.get(config.method)
  data.SOURCES.get(config.data.name)
  settings = dict(flatten(config))
  check_rules(settings)
  if all(config.get(f"total_{u}") is None for u in ("steps", "epochs", "examples")):
    raise ConfigError("set total_steps, total_epochs or total_examples")
  check_patches(config, settings)
  chunk = config.get("loss", {}).get("chunk_size", 0)
  if chunk and config.global_batch_size % chunk:
    raise ConfigError(f"loss.chunk_size={chunk} does not divide global_batch_size="
                      f"{config.global_batch_size}; choose a divisor of it (or 0: dense)")
  for name, ev in config.get("evals", {}).items():
    if "type" not in ev:
      raise ConfigError(f"evals.{name} has no 'type'; known: {', '.join(EVALUATORS.names())}")
    EVALUATORS.get(ev.type)

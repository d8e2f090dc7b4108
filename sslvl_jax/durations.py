"""Durations and intervals in configs are `<name>_steps`, `_epochs`, `_examples` or `_percent` (of
the run): converted to step counts here only, once per run, into a `Schedule`."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from sslvl_jax.errors import ConfigError

UNITS = ("steps", "epochs", "examples", "percent")


def to_steps(cfg: Mapping[str, Any], name: str, steps_per_epoch: float, global_batch_size: int,
             default: int | None = None, total_steps: int | None = None) -> int:
  """Resolve `<name>_steps`, `_epochs`, `_examples` or `_percent` (of `total_steps`) in `cfg`."""
  given = {u: cfg.get(f"{name}_{u}") for u in UNITS}
  given = {u: v for u, v in given.items() if v is not None}
  if len(given) > 1:
    raise ConfigError(f"set only one of {', '.join(f'{name}_{u}' for u in given)}")
  if "percent" in given and total_steps is None:
    raise ConfigError(f"{name}_percent: the run's length cannot be a percentage of itself; "
                      f"set {name}_steps, {name}_epochs or {name}_examples")
  if "steps" in given:
    return int(given["steps"])
  if "epochs" in given:
    return int(round(given["epochs"] * steps_per_epoch))
  if "examples" in given:
    return int(round(given["examples"] / global_batch_size))
  if "percent" in given:
    return int(round(given["percent"] / 100 * total_steps))
  if default is None:
    raise ConfigError(f"set {name}_steps, {name}_epochs or {name}_examples in the config")
  return default


@dataclasses.dataclass(frozen=True)
class Schedule:
  """The step counts of a run, resolved once from its config (`schedule_of`) and passed to the
  method, the optimiser, the train step and the loop."""

  total_steps: int
  steps_per_epoch: float
  global_batch_size: int
  warmup_steps: int = 0
  log_every: int = 10
  checkpoint_every: int = 1000

  def steps(self, cfg: Mapping[str, Any], name: str, default: int | None = None) -> int:
    """`<name>_<unit>` of `cfg` in steps of this run (e.g. an evaluator's `every_*`)."""
    return to_steps(cfg, name, self.steps_per_epoch, self.global_batch_size, default,
                    self.total_steps)

  def to_dict(self) -> dict[str, Any]:
    """The schedule as JSON-able values (logged)."""
    return dataclasses.asdict(self)


def schedule_of(config: Mapping[str, Any], num_examples: int) -> Schedule:
  """The Schedule of `config` (total_*, optim.warmup_*, log_every_*, checkpoint_every_*) on a
  training split of `num_examples`."""
  batch = int(config["global_batch_size"])
  spe = num_examples / batch
  total = to_steps(config, "total", spe, batch)
  run = Schedule(total, spe, batch)
  run = dataclasses.replace(
      run, warmup_steps=run.steps(config["optim"], "warmup", default=0),
      log_every=run.steps(config, "log_every", default=10),
      checkpoint_every=run.steps(config, "checkpoint_every", default=1000))
  for name in ("log_every", "checkpoint_every"):
    if getattr(run, name) < 1:
      raise ConfigError(f"{name}_* resolves to {getattr(run, name)} steps of this run; "
                        "make the interval at least one step")
  return run

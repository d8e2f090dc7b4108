"""Where each leaf of the TrainState lives on the ("data", "fsdp") mesh: ordered regex rules.

`config.sharding_rules` is a sequence of `(regex, spec)` pairs. Every leaf of the TrainState is
named by its path (`optim.path_str` with the TrainState field in front):

  params/image/blocks/0/mlp/fc1/kernel/value
  opt_state/1/0/mu/image/blocks/0/mlp/fc1/kernel/value     (AdamW moments mirror the params)
  extras/teacher/ema/inner_state/ema/backbone/.../value    (the teacher EMA state)

The first rule whose regex matches (`re.search`) the path decides; a leaf no rule matches is
replicated. A spec is one of

  "fsdp"          a leaf of at least MIN_SHARD_SIZE elements is split along its largest dimension
                  divisible by the fsdp axis size (the leading one on a tie); others replicated
  "fsdp>=N"       the same with at least N elements
  "replicate"     (also None or ()) a full copy on every device
  (d0, d1, ...)   a PartitionSpec: per leading dimension None, a mesh axis name ("data", "fsdp")
                  or a tuple of them; trailing dimensions are not split

A spec that does not fit a leaf (more entries than dimensions, a dimension not divisible by its
axes) replicates that leaf. Mesh axes of size 1 are dropped from every spec, so with fsdp=1 the
whole state is replicated exactly as plain data parallelism. The default, DEFAULT_RULES, splits
every array of >= 2**14 elements (64 KiB in f32: below that the gathers cost more than they
save) over "fsdp" and replicates the rest.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sslvl_jax.errors import ConfigError
from sslvl_jax.optim import path_str

FSDP_AXIS = "fsdp"
MIN_SHARD_SIZE = 2 ** 14
DEFAULT_RULES = ((".*", "fsdp"),)


@dataclasses.dataclass(frozen=True)
class Auto:
  """The 'fsdp' spec: split the largest divisible dimension of leaves of >= min_size elements."""

  min_size: int = MIN_SHARD_SIZE


_FORMS = ("'fsdp', 'fsdp>=N', 'replicate' or a tuple of per-dimension mesh axes "
          "(None, 'data', 'fsdp')")


def parse_rules(rules: Sequence[Any] | None, mesh: Mesh) -> list[tuple[re.Pattern, Any]]:
  """Compile and check `sharding_rules`; ConfigError naming the bad rule and the fix."""
  if rules is None:
    rules = DEFAULT_RULES
  if isinstance(rules, (str, bytes)) or not isinstance(rules, (list, tuple)):
    raise ConfigError(f"sharding_rules must be a tuple of (regex, spec) pairs, got {rules!r}")
  out = []
  for i, rule in enumerate(rules):
    if not isinstance(rule, (list, tuple)) or len(rule) != 2 or not isinstance(rule[0], str):
      raise ConfigError(f"sharding_rules[{i}] must be a (regex, spec) pair, got {rule!r}")
    try:
      rx = re.compile(rule[0])
    except re.error as e:
      raise ConfigError(f"sharding_rules[{i}]: bad regex {rule[0]!r} ({e})") from None
    out.append((rx, _check_spec(rule[1], mesh, i)))
  return out


def _check_spec(spec: Any, mesh: Mesh, i: int) -> Any:
  """The spec in canonical form: Auto, 'replicate' or a tuple of per-dimension axis entries."""
  where = f"sharding_rules[{i}]"
  if spec is None or spec == "replicate" or (isinstance(spec, (list, tuple)) and not spec):
    return "replicate"
  if isinstance(spec, str):
    m = re.fullmatch(r"fsdp(?:\s*>=\s*(\d+))?", spec)
    if not m:
      raise ConfigError(f"{where}: unknown spec {spec!r}; use {_FORMS}")
    return Auto(int(m.group(1)) if m.group(1) else MIN_SHARD_SIZE)
  if not isinstance(spec, (list, tuple)):
    raise ConfigError(f"{where}: unknown spec {spec!r}; use {_FORMS}")
  entries = []
  for entry in spec:
    axes = (entry,) if entry is None or isinstance(entry, str) else entry
    if not (isinstance(axes, (list, tuple))
            and all(a is None or isinstance(a, str) for a in axes)):
      raise ConfigError(f"{where}: bad entry {entry!r} in {spec!r}; use {_FORMS}")
    for a in axes:
      if a is not None and a not in mesh.shape:
        raise ConfigError(f"{where}: unknown mesh axis {a!r} in {spec!r}; the mesh axes are "
                          f"{', '.join(mesh.axis_names)}")
    entries.append(None if entry is None else entry if isinstance(entry, str) else tuple(entry))
  named = [a for e in entries for a in ((e,) if isinstance(e, str) else e or ()) if a is not None]
  if len(named) != len(set(named)):
    raise ConfigError(f"{where}: a mesh axis appears twice in {spec!r}; use each axis at most once")
  return tuple(entries)


def leaf_spec(shape: Sequence[int], spec: Any, mesh: Mesh) -> P:
  """The PartitionSpec of a leaf of `shape` under a canonical rule spec (see parse_rules)."""
  shape = tuple(shape)
  if spec == "replicate":
    return P()
  if isinstance(spec, Auto):
    n = mesh.shape.get(FSDP_AXIS, 1)
    if n == 1 or int(np.prod(shape, dtype=np.int64)) < spec.min_size:
      return P()
    fits = [d for d in range(len(shape)) if shape[d] % n == 0]
    if not fits:
      return P()
    d = max(fits, key=lambda k: (shape[k], -k))  # the largest; the leading one on a tie
    return P(*([None] * d), FSDP_AXIS)
  if len(spec) > len(shape):
    return P()
  entries = []
  for dim, entry in zip(shape, spec):
    axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
    axes = tuple(a for a in axes if a is not None and mesh.shape[a] > 1)  # size 1 splits nothing
    if dim % int(np.prod([mesh.shape[a] for a in axes], dtype=np.int64)):
      return P()
    entries.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  while entries and entries[-1] is None:
    entries.pop()
  return P(*entries)


def tree_specs(tree: Any, mesh: Mesh, rules: Sequence[Any] | None = None) -> Any:
  """PartitionSpec per leaf of `tree` (arrays or ShapeDtypeStructs) by the first matching rule."""
  compiled = parse_rules(rules, mesh)

  def pick(path, leaf):
    name = path_str(path)
    for rx, spec in compiled:
      if rx.search(name):
        return leaf_spec(np.shape(leaf), spec, mesh)
    return P()
  return jax.tree_util.tree_map_with_path(pick, tree)


def tree_shardings(tree: Any, mesh: Mesh, rules: Sequence[Any] | None = None) -> Any:
  """NamedSharding per leaf of `tree` on `mesh` by the rules (see the module docstring)."""
  return jax.tree.map(lambda s: NamedSharding(mesh, s), tree_specs(tree, mesh, rules),
                      is_leaf=lambda x: isinstance(x, P))


def describe(tree: Any) -> list[str]:
  """'path shape spec' of every leaf of a tree of arrays split over some mesh axis (for logs)."""
  out = []
  for path, x in jax.tree_util.tree_leaves_with_path(tree):
    spec = getattr(getattr(x, "sharding", None), "spec", None)
    if spec is not None and any(e is not None for e in spec):
      out.append(f"{path_str(path)} {tuple(x.shape)} {spec}")
  return out

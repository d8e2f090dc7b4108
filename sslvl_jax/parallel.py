"""Device mesh, shardings, host-local -> global arrays, and axis-aware collectives.

The collectives here take `axis_name=None` to mean "no mesh axis" (single device, plain jnp), so a
loss written once runs both inside `jax.shard_map` and as a single-device reference.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sslvl_jax.errors import ConfigError

MESH_AXES = ("data", "fsdp")  # data parallel x parameter (FSDP) sharding, fsdp innermost
BATCH_AXES = ("data", "fsdp")  # the mesh axes a batch is split over (the losses' axis_name)
DEFAULT_MESH = {"data": -1, "fsdp": 1}


def mesh_shape(n_devices: int, shape: Any = None) -> tuple[int, ...]:
  """Sizes of MESH_AXES for `n_devices` from `config.mesh` ({axis: size}, -1: the rest)."""
  given = dict(DEFAULT_MESH)
  unknown = [k for k in (shape or {}) if k not in MESH_AXES]
  if unknown:
    raise ConfigError(f"mesh.{unknown[0]}: unknown mesh axis; the axes are "
                      f"{', '.join(MESH_AXES)} (e.g. --config.mesh.fsdp=4)")
  given.update(shape or {})
  for k, v in given.items():
    if isinstance(v, bool) or not isinstance(v, int) or (v < 1 and v != -1):
      raise ConfigError(f"mesh.{k} must be a positive integer or -1 (the rest of the devices), "
                        f"got {v!r}")
  rest = [k for k in MESH_AXES if given[k] == -1]
  if len(rest) > 1:
    got = ", ".join(f"mesh.{k}=-1" for k in rest)
    raise ConfigError(f"mesh: only one axis may be -1, got {got}; give the others a size")
  fixed = int(np.prod([given[k] for k in MESH_AXES if given[k] != -1]))
  sizes = ", ".join(f"mesh.{k}={given[k]}" for k in MESH_AXES if given[k] != -1)
  if rest:
    if n_devices % fixed:
      raise ConfigError(f"{sizes} does not divide the {n_devices} devices; make it a divisor of "
                        f"{n_devices} (mesh.{rest[0]}=-1 takes the rest)")
    given[rest[0]] = n_devices // fixed
  elif fixed != n_devices:
    raise ConfigError(f"{sizes} makes {fixed} devices, not the {n_devices} devices to use; set one "
                      f"axis to -1 (the rest) or make the product {n_devices} (or set num_devices)")
  return tuple(given[k] for k in MESH_AXES)


def make_mesh(num_devices: int | None = None, shape: Any = None) -> Mesh:
  """The ("data", "fsdp") mesh over all (or the first `num_devices`) devices, Auto axis types.

  `shape` is `config.mesh`, {"data": -1, "fsdp": 1} by default (-1: the rest of the devices):
  plain data parallelism; fsdp > 1 splits the large parameters (see sslvl_jax.sharding).
  """
  devices = jax.devices() if num_devices is None else jax.devices()[:num_devices]
  sizes = mesh_shape(len(devices), shape)
  auto = jax.sharding.AxisType.Auto
  return jax.make_mesh(sizes, MESH_AXES, axis_types=(auto,) * len(MESH_AXES), devices=devices)


def config_mesh(config: Any) -> Mesh:
  """The mesh a config trains on: `num_devices` and `mesh` (both optional)."""
  shape = config.get("mesh")
  shape = shape.to_dict() if hasattr(shape, "to_dict") else shape
  return make_mesh(config.get("num_devices"), shape)


def data_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of a batch: leading axis split over BATCH_AXES (all devices)."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  """Fully replicated sharding."""
  return NamedSharding(mesh, P())


def check_batch_divides(global_batch_size: int, mesh: Mesh) -> None:
  """Raise a clear error when the batch cannot be split evenly over devices and processes."""
  n_dev = mesh.devices.size
  if global_batch_size % n_dev:
    raise ConfigError(
        f"global_batch_size={global_batch_size} is not divisible by the {n_dev} devices of the mesh; "
        f"set --config.global_batch_size to a multiple of {n_dev}")
  if global_batch_size % jax.process_count():
    raise ConfigError(
        f"global_batch_size={global_batch_size} is not divisible by the {jax.process_count()} processes")


def host_to_global(mesh: Mesh, local_batch: Any) -> Any:
  """Assemble each process's local batch (numpy pytree) into global arrays split over BATCH_AXES."""
  sharding = data_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                      local_batch)


def sharded_loss(fn: Callable[..., Any], mesh: Mesh, in_specs: tuple, out_specs: Any = P()
                 ) -> Callable[..., Any]:
  """Wrap a per-device loss written with `axis_name=BATCH_AXES` collectives in `jax.shard_map`."""
  return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs)


# ---- axis-aware collectives (identity when axis_name is None) -------------------------------


def all_gather(x: jax.Array, axis_name: str | None) -> jax.Array:
  """Concatenate `x` from all devices along axis 0 (differentiable)."""
  return x if axis_name is None else jax.lax.all_gather(x, axis_name, tiled=True)


def psum(x: Any, axis_name: str | None) -> Any:
  """Sum over devices."""
  return x if axis_name is None else jax.lax.psum(x, axis_name)


def pmean(x: Any, axis_name: str | None) -> Any:
  """Mean over devices."""
  return x if axis_name is None else jax.lax.pmean(x, axis_name)


def axis_index(axis_name: str | None) -> jax.Array:
  """This device's index along the axis (0 without one)."""
  return jnp.int32(0) if axis_name is None else jax.lax.axis_index(axis_name)


def axis_size(axis_name: str | None) -> int:
  """Number of devices along the axis (1 without one)."""
  return 1 if axis_name is None else jax.lax.psum(1, axis_name)


def ring_shift(x: jax.Array, axis_name: str | None) -> jax.Array:
  """Send `x` to the next device on the ring (device i receives from device i-1)."""
  if axis_name is None:
    return x
  n = jax.lax.psum(1, axis_name)
  return jax.lax.ppermute(x, axis_name, perm=[(i, (i + 1) % n) for i in range(n)])

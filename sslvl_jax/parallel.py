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

BATCH_AXES = "data"  # the mesh axes a batch is split over (the losses' axis_name)


def make_mesh(num_devices: int | None = None) -> Mesh:
  """A 1-D data-parallel mesh over all (or the first `num_devices`) devices, Auto axis types."""
  devices = jax.devices() if num_devices is None else jax.devices()[:num_devices]
  return jax.make_mesh((len(devices),), ("data",),
                       axis_types=(jax.sharding.AxisType.Auto,), devices=devices)


def data_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of a batch: leading axis split over the data axis."""
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
  """Assemble each process's local batch (numpy pytree) into global jax.Arrays sharded on `data`."""
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

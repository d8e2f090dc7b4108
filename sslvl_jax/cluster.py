"""Which cluster this process is part of: joining it (jax.distributed) and describing it."""

from __future__ import annotations

from typing import Sequence

from ml_collections import ConfigDict


def cluster_process_count() -> int:
  """Processes of the cluster JAX's own auto-detection finds (SLURM, TPU pod, ...); 1 if none."""
  from jax._src import clusters  # pylint: disable=g-import-not-at-top
  # The environments and the order jax.distributed.initialize() itself tries (private API: there
  # is no public one; opt-in methods such as mpi4py are only used when asked for by name).
  env = next((e for e in clusters.ClusterEnv._cluster_types  # pylint: disable=protected-access
              if not e.opt_in_only_method and e.is_env_present()), None)
  return env.get_process_count() if env else 1


def maybe_initialize_distributed(coordinator_address: str | None, num_processes: int | None,
                                 process_id: int | None,
                                 local_device_ids: Sequence[int] | None) -> None:
  """jax.distributed.initialize() for an explicit coordinator or a multi-process cluster.

  JAX fills what is not given from the detected cluster; a single process never initialises.
  """
  import jax  # pylint: disable=g-import-not-at-top
  if coordinator_address or cluster_process_count() > 1:
    jax.distributed.initialize(coordinator_address, num_processes, process_id,
                               local_device_ids=local_device_ids)


def describe(config: ConfigDict) -> str:
  """Processes, devices, the mesh `config` trains on and its batch split, one fact a line."""
  import jax  # pylint: disable=g-import-not-at-top
  from sslvl_jax import parallel  # pylint: disable=g-import-not-at-top
  mesh = parallel.config_mesh(config)
  parallel.check_batch_divides(config.global_batch_size, mesh)
  batch = config.global_batch_size
  kinds = ", ".join(sorted({d.device_kind for d in jax.devices()}))
  return "\n".join([
      f"process {jax.process_index()} of {jax.process_count()} "
      f"(jax.distributed initialised: {jax.distributed.is_initialized()})",
      f"devices: {jax.local_device_count()} local, {jax.device_count()} global, "
      f"{jax.default_backend()} ({kinds})",
      f"mesh: {dict(mesh.shape)} over {mesh.size} devices",
      f"batch: {batch} global, {batch // jax.process_count()} per process, "
      f"{batch // mesh.size} per device"])

"""Train a recipe: python -m sslvl_jax.main --config=configs/<recipe>.py[:variant] --workdir=DIR

  [--config.a.b=value ...]  override any config field
  --allow_config_change=k1,k2  resume although these keys changed since the last checkpoint
  --verbose  tracebacks instead of one-line errors
  --dry_run  print the cluster, devices, mesh and batch split this run would use, then exit

A rerun of the same command resumes from the newest checkpoint that loads.
"""

from __future__ import annotations

from typing import Sequence

from absl import flags, logging
from ml_collections import config_flags

from sslvl_jax import cli, cluster
from sslvl_jax.preemption import StopSignal

_CONFIG = config_flags.DEFINE_config_file("config", None, "recipe config file (configs/*.py[:arg])",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "directory for checkpoints, metrics and exports")
_ALLOW = flags.DEFINE_list("allow_config_change", [],
                           "config keys (or prefixes) that may differ from the checkpoint's")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "multi-host: host:port of process 0 (else from the environment)")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "multi-host: number of processes")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "multi-host: this process's index")
_LOCAL_DEVICE_IDS = flags.DEFINE_list(
    "local_device_ids", None, "multi-host GPU: ids of the visible GPUs this process uses "
    "(default JAX's; under SLURM that is [SLURM_LOCALID]); launch/slurm_gpu.sbatch passes 0")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "print the cluster, devices, mesh and batch split, "
                             "then exit without building the run or touching the workdir")

_STOP = StopSignal()  # first: a SIGTERM while jax imports and the run is built is not lost


def main(argv: Sequence[str]) -> None:
  del argv
  cli.required(config=_CONFIG.value, workdir=_WORKDIR.value)
  logging.set_verbosity(logging.WARNING)  # library INFO chatter (orbax) off; progress is printed
  from sslvl_jax import config_check, workdir  # pylint: disable=g-import-not-at-top
  config_check.validate(_CONFIG.value)
  ids = [int(i) for i in _LOCAL_DEVICE_IDS.value] if _LOCAL_DEVICE_IDS.value else None
  cluster.maybe_initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, ids)
  if _DRY_RUN.value:
    print(cluster.describe(_CONFIG.value), flush=True)
    return
  workdir.prepare(_WORKDIR.value)
  import jax  # pylint: disable=g-import-not-at-top
  from sslvl_jax import train  # pylint: disable=g-import-not-at-top
  lock = workdir.Lock(_WORKDIR.value) if jax.process_index() == 0 else None
  try:
    train.run(_CONFIG.value, _WORKDIR.value, allow_change=tuple(_ALLOW.value), stop=_STOP)
  finally:
    if lock:
      lock.release()


def run() -> None:
  """Entry point."""
  cli.run(main)


if __name__ == "__main__":
  run()

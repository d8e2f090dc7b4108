"""Command line: python -m sslvl_jax.main --config=configs/<recipe>.py --workdir=DIR [--config.a.b=v]."""

from __future__ import annotations

import os
import sys
from typing import Any

from absl import app, flags, logging
from ml_collections import config_flags

from sslvl_jax.errors import ConfigError

_CONFIG = config_flags.DEFINE_config_file("config", None, "recipe config file (configs/*.py[:arg])",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "directory for checkpoints, metrics and exports")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "multi-host: host:port of process 0 (else from the environment)")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "multi-host: number of processes")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "multi-host: this process's index")

_CLUSTER_ENV = ("SLURM_NTASKS", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS",
                "OMPI_COMM_WORLD_SIZE")


def maybe_initialize_distributed() -> None:
  """jax.distributed.initialize() when flags or the environment (SLURM, TPU pod) ask for it."""
  import jax  # pylint: disable=g-import-not-at-top
  if _COORDINATOR.value:
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  elif os.environ.get("SLURM_NTASKS", "1") != "1" or any(
      os.environ.get(k) for k in _CLUSTER_ENV[1:]):
    jax.distributed.initialize()


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required")
  logging.set_verbosity(logging.WARNING)  # library INFO chatter (orbax) off; progress is printed
  maybe_initialize_distributed()
  from sslvl_jax import config_check, train  # pylint: disable=g-import-not-at-top
  config = _CONFIG.value
  config_check.validate(config)
  os.makedirs(_WORKDIR.value, exist_ok=True)
  train.run(config, _WORKDIR.value)


def fail(message: Any) -> None:
  """Print one clear line and exit with status 2."""
  logging.flush()
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def run() -> None:
  """Entry point: turns configuration mistakes into one clear line and exit status 2."""
  try:  # parse first: a bad --config.* override or config file is a usage error, not a crash
    argv = flags.FLAGS(sys.argv)
  except flags.Error as e:
    fail(e)
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    arg = e.args[0] if e.args else e
    fail(f"bad --config override or config file: {arg}")
  try:
    app.run(main, flags_parser=lambda _: argv)
  except (ConfigError, FileNotFoundError) as e:
    fail(e)


if __name__ == "__main__":
  run()

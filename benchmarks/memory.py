"""Per-device memory of a compiled contrastive loss or a recipe's train step, on fake CPU devices.

  python benchmarks/memory.py --loss=clip --global_batch=32768 --dim=512 --chunk_size=1024 --devices=8
  python benchmarks/memory.py --config=configs/clip_vitb16.py --per_device_batch=4096 --devices=8 \
      --config.microbatches=16 --config.model.remat=block --config.mesh.fsdp=8

Compile-only: XLA's memory analysis of the jitted program on --devices fake CPU devices
(temporaries, arguments and outputs per device, MiB). --loss: value_and_grad of the jit + shard_map
loss, beside the size of the local x global f32 logits a dense loss materialises. --config: the
recipe's whole train step (forward, backward, optimiser) on abstract inputs, so neither the state
nor the batch is allocated. One mode per function in MODES.
"""

from __future__ import annotations

import os
import sys


def _devices_from_argv(argv: list[str], default: int = 8) -> int:
  """--devices=N (or --devices N), read before absl parses flags: jax needs it at import."""
  for i, arg in enumerate(argv):
    if arg.startswith("--devices="):
      return int(arg.split("=", 1)[1])
    if arg == "--devices" and i + 1 < len(argv):
      return int(argv[i + 1])
  return default


if "JAX_NUM_CPU_DEVICES" not in os.environ and "xla_force_host_platform_device_count" not in (
    os.environ.get("XLA_FLAGS", "")):
  os.environ["JAX_NUM_CPU_DEVICES"] = str(_devices_from_argv(sys.argv))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import functools  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from typing import Any, Callable  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from absl import app, flags  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402
from ml_collections import config_flags  # noqa: E402

import recipe_step  # noqa: E402  (beside this script)
from sslvl_jax import losses, parallel  # noqa: E402

_LOSS = flags.DEFINE_enum("loss", "clip", ["clip", "siglip"], "loss to measure")
_GLOBAL_BATCH = flags.DEFINE_integer("global_batch", 32768, "global batch size (rows per modality)")
_DIM = flags.DEFINE_integer("dim", 512, "embedding dimension")
_CHUNK = flags.DEFINE_integer("chunk_size", 0, "the loss's chunk_size (0: dense logits)")
_DEVICES = flags.DEFINE_integer("devices", 8, "fake CPU devices (read before jax is imported)")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "embedding dtype")
_CONFIG = config_flags.DEFINE_config_file("config", None, "recipe config: measure its train step")
_PER_DEVICE = flags.DEFINE_integer("per_device_batch", 256, "--config: examples per device")

MIB = 2 ** 20

# loss name -> (function, number of replicated scalar inputs after the two (b, d) embeddings)
LOSSES: dict[str, tuple[Callable[..., jax.Array], int]] = {
    "clip": (losses.clip_loss, 1),  # logit_scale
    "siglip": (losses.siglip_loss, 2),  # logit_scale, logit_bias
}


def compiled_memory(compiled: Any) -> dict[str, float]:
  """Per-device temporary, argument, output and donated (alias) sizes (MiB), and their total."""
  stats = compiled.memory_analysis()
  out = {f"{k}_mib": getattr(stats, f"{k}_in_bytes") / MIB
         for k in ("temp_size", "argument_size", "output_size", "alias_size")}
  out["total_mib"] = (out["temp_size_mib"] + out["argument_size_mib"] + out["output_size_mib"]
                      - out["alias_size_mib"])  # a donated input's buffer is reused by the output
  return out


def loss_memory() -> dict[str, Any]:
  """value_and_grad of --loss w.r.t. its embeddings and scalars, jit + shard_map over the mesh."""
  n_dev, n, d = _DEVICES.value, _GLOBAL_BATCH.value, _DIM.value
  if jax.device_count() < n_dev:
    raise SystemExit(f"--devices={n_dev} but jax sees {jax.device_count()} devices "
                     f"(JAX_NUM_CPU_DEVICES or XLA_FLAGS set elsewhere?)")
  mesh = parallel.make_mesh(n_dev)
  parallel.check_batch_divides(n, mesh)
  fn, n_scalars = LOSSES[_LOSS.value]
  specs = (P(parallel.BATCH_AXES),) * 2 + (P(),) * n_scalars
  loss = jax.shard_map(
      functools.partial(fn, axis_name=parallel.BATCH_AXES, chunk_size=_CHUNK.value), mesh=mesh,
      in_specs=specs, out_specs=P())
  dtype = jnp.dtype(_DTYPE.value)
  shapes = [jax.ShapeDtypeStruct((n, d), dtype)] * 2 + [jax.ShapeDtypeStruct((), jnp.float32)
                                                        ] * n_scalars
  shapes = [jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=NamedSharding(mesh, spec))
            for s, spec in zip(shapes, specs)]
  t0 = time.perf_counter()
  step = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(len(specs)))))
  compiled = step.lower(*shapes).compile()
  local = n // n_dev
  return {"mode": "loss", "loss": _LOSS.value, "devices": n_dev, "global_batch": n, "dim": d,
          "dtype": _DTYPE.value, "chunk_size": _CHUNK.value, **compiled_memory(compiled),
          "dense_local_x_global_f32_logits_mib": local * n * 4 / MIB,
          "compile_s": round(time.perf_counter() - t0, 1)}


def config_memory() -> dict[str, Any]:
  """The --config recipe's jitted train step at --per_device_batch, compiled on abstract inputs."""
  mesh = parallel.config_mesh(_CONFIG.value)
  n_dev = mesh.devices.size
  config = recipe_step.prepare(_CONFIG.value, _PER_DEVICE.value * n_dev, vocab_size=49408)
  method, make, step = recipe_step.build(config, mesh)
  rng = jax.random.key(0)
  t0 = time.perf_counter()
  compiled = step.lower(jax.eval_shape(make, rng), recipe_step.abstract_batch(config, method, mesh),
                        rng).compile()
  mem = compiled_memory(compiled)
  towers = {k: v.name for k, v in config.model.items() if hasattr(v, "name")}
  return {"mode": "config", "method": config.method, **towers, "devices": n_dev,
          "mesh": dict(zip(mesh.axis_names, mesh.devices.shape)),
          "global_batch": config.global_batch_size, "per_device_batch": _PER_DEVICE.value,
          "microbatches": config.microbatches, "remat": config.model.remat,
          "chunk_size": config.get("loss", {}).get("chunk_size", 0), "dtype": config.model.dtype,
          **mem, "compile_s": round(time.perf_counter() - t0, 1)}


# One function per mode, each returning the record to print; main picks the mode.
MODES: dict[str, Callable[[], dict[str, Any]]] = {"loss": loss_memory, "config": config_memory}


def main(argv: list[str]) -> None:
  del argv
  print(json.dumps(MODES["config" if _CONFIG.value is not None else "loss"](), indent=1))


if __name__ == "__main__":
  app.run(main)

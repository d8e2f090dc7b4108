"""Train-step throughput of a recipe on synthetic batches: step time, examples/s, FLOPs, MFU.

  python benchmarks/throughput.py --config=configs/clip_vitb16.py --batch_per_device=256 \
      --peak_tflops=989 [--config.model.image.attention_impl=xla]
  python benchmarks/throughput.py --config=configs/dino_vits16.py --batch_per_device=64

Batches have the shapes the recipe's own host transform produces (multi-crop included).

Model FLOPs per example come from XLA's cost analysis of the compiled train step (forward +
backward + optimiser), so they count what actually runs. MFU = achieved FLOP/s / (peak x devices).
"""

from __future__ import annotations

import json
import time

import jax
from absl import app, flags
from ml_collections import config_flags

import recipe_step  # beside this script
from sslvl_jax import parallel

_CONFIG = config_flags.DEFINE_config_file("config", None, "recipe config")
_BPD = flags.DEFINE_integer("batch_per_device", 32, "examples per device")
_STEPS = flags.DEFINE_integer("steps", 10, "timed steps (after 2 warm-up steps)")
_PEAK = flags.DEFINE_float("peak_tflops", 0.0, "peak dense TFLOP/s of one device, for MFU")
_VOCAB = flags.DEFINE_integer("vocab_size", 32000, "text vocabulary size for synthetic tokens")


def main(argv):
  del argv
  mesh = parallel.config_mesh(_CONFIG.value)
  n_dev = mesh.devices.size
  gbs = _BPD.value * n_dev
  config = recipe_step.prepare(_CONFIG.value, gbs, _VOCAB.value)
  method, make, step = recipe_step.build(config, mesh)
  state = make(jax.random.key(0))
  batch = recipe_step.synthetic_batch(config, method, mesh)
  rng = jax.random.key(1)
  compiled = step.lower(state, batch, rng).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops_per_step = float(cost.get("flops", 0.0)) * n_dev  # cost analysis is per device
  for _ in range(2):
    state, m = compiled(state, batch, rng)
  jax.block_until_ready(m)
  t0 = time.perf_counter()
  for _ in range(_STEPS.value):
    state, m = compiled(state, batch, rng)
  jax.block_until_ready(m)
  dt = (time.perf_counter() - t0) / _STEPS.value
  image = config.model.get("image") or config.model.backbone
  out = {"config": config.method, "image_model": image.name, "devices": n_dev,
         "device_kind": jax.devices()[0].device_kind, "global_batch": gbs,
         "attention_impl": image.get("attention_impl"), "dtype": config.model.dtype,
         "step_time_s": dt, "examples_per_s": gbs / dt, "examples_per_s_per_device": gbs / dt / n_dev,
         "model_gflops_per_example": flops_per_step / gbs / 1e9}
  if _PEAK.value:
    out["mfu"] = flops_per_step / dt / (_PEAK.value * 1e12 * n_dev)
  print(json.dumps(out, indent=1))


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)

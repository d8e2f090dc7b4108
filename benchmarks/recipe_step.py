"""A recipe's train step on synthetic batches, shared by the throughput and memory benchmarks."""

from __future__ import annotations

import copy
import pathlib
import sys
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from ml_collections import ConfigDict

from sslvl_jax import data, durations, methods, optim, parallel, rngs, train

REPO = str(pathlib.Path(__file__).resolve().parents[1])
if REPO not in sys.path:  # recipe configs import `configs.common`
  sys.path.insert(0, REPO)
TOTAL_STEPS, WARMUP_STEPS = 1000, 10  # the schedule the benchmarked optimiser is built for


def prepare(config: ConfigDict, global_batch: int, vocab_size: int) -> ConfigDict:
  """The config at `global_batch` with the fields train.setup would resolve (no data is read)."""
  config = copy.deepcopy(config)
  with config.unlocked():
    config.global_batch_size = global_batch
    config.optim.warmup_steps = WARMUP_STEPS
    for key in ("warmup_epochs", "warmup_examples"):
      if key in config.optim:
        del config.optim[key]
    if "text" in config.model:  # no tokenizer file: synthetic token ids
      config.model.text.vocab_size = vocab_size
      config.model.text.eot_id = 3
  return config


def example_shapes(config: ConfigDict, method: Any) -> dict[str, tuple[tuple[int, ...], Any]]:
  """(shape, dtype) of one training example: the method's transform of a built-in record."""
  cfg = copy.deepcopy(config.data)
  with cfg.unlocked():
    cfg.name, cfg.tokenizer = "digits", "builtin:digits"
  record = data.source(cfg, "train")[0]
  example = data.example_transform(cfg, method.example, train=True)(
      record, np.random.default_rng(0))
  return {k: (np.shape(v), np.asarray(v).dtype) for k, v in example.items()}


def abstract_batch(config: ConfigDict, method: Any, mesh: Any) -> dict[str, jax.ShapeDtypeStruct]:
  """The global batch's shapes, sharded over the batch axes (nothing allocated)."""
  rows = NamedSharding(mesh, P(parallel.BATCH_AXES))
  return {k: jax.ShapeDtypeStruct((config.global_batch_size, *shape), dtype, sharding=rows)
          for k, (shape, dtype) in example_shapes(config, method).items()}


def synthetic_batch(config: ConfigDict, method: Any, mesh: Any) -> dict[str, jax.Array]:
  """A random global batch of the training shapes (uint8 images, token ids ending in EOT)."""
  rng = np.random.default_rng(0)
  local = config.global_batch_size // jax.process_count()
  vocab = config.model.text.get("vocab_size", 2) if "text" in config.model else 2
  batch = {}
  for k, (shape, dtype) in example_shapes(config, method).items():
    if k == "tokens":
      lengths = rng.integers(2, shape[-1], local)
      x = np.where(np.arange(shape[-1]) < lengths[:, None] - 1,
                   rng.integers(4, vocab, (local, *shape)), 0)
      x[np.arange(local), lengths - 1] = 3  # EOT
    else:
      x = rng.integers(0, 256 if dtype == np.uint8 else 2, (local, *shape))
    batch[k] = x.astype(dtype)
  return parallel.host_to_global(mesh, batch)


def build(config: ConfigDict, mesh: Any) -> tuple[Any, Any, Any]:
  """(method, jitted state initialiser rng -> TrainState born sharded, jitted train step)."""
  schedule = durations.Schedule(TOTAL_STEPS, steps_per_epoch=TOTAL_STEPS,
                                global_batch_size=config.global_batch_size,
                                warmup_steps=WARMUP_STEPS)
  method = methods.get(config.method)(config, mesh, schedule)
  builder = lambda p: optim.build(config.optim, p, schedule)  # noqa: E731
  make, shardings, tx, lr = train.initializer(method, builder, rngs.seed_key(0), mesh,
                                              config.get("sharding_rules"))
  step = train.make_train_step(method, tx, lr, mesh, state_sharding=shardings)
  return method, make, step

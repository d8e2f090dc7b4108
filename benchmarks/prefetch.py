"""Input/step overlap of GlobalBatches: step time with a slow input over step time without.

  python benchmarks/prefetch.py --prefetch=0,2

A tiny jitted step (a --size x --size matmul chain that reads the batch) is timed alone; then the
real data.make_dataset -> data.GlobalBatches stream feeds it, once as is and once with an input
delay equal to that step time (a sleep per batch in the thread that calls next() on the grain
iterator: the main thread with prefetch 0, the read-ahead thread otherwise). For each prefetch
setting it prints step_time(delay) / step_time(no delay): 2x means none of the input work is
hidden behind the step, 1x all of it. With --block (default) the loop waits for every step, as a
loop that reads a metric each step does; --noblock lets jax's async dispatch overlap on its own.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from sslvl_jax import parallel
from sslvl_jax.data import pipeline

_PREFETCH = flags.DEFINE_list("prefetch", ["0", "2"], "data.prefetch_batches values to time")
_SIZE = flags.DEFINE_integer("size", 512, "matmul side: sets the step time (aim for 20-50 ms)")
_BATCH = flags.DEFINE_integer("batch", 16, "examples per batch")
_STEPS = flags.DEFINE_integer("steps", 40, "timed steps per measurement")
_WARMUP = flags.DEFINE_integer("warmup", 5, "untimed steps before each measurement")
_REPEATS = flags.DEFINE_integer("repeats", 3, "interleaved rounds; each figure is their median")
_BLOCK = flags.DEFINE_bool("block", True, "wait for each step's result before the next step")

FEATURES = 32


class Source:
  """Random-access records {'x': float32[FEATURES]}: reading is free, the delay comes later."""

  def __len__(self) -> int:
    return 4096

  def __getitem__(self, i: int) -> dict:
    return {"x": np.full((FEATURES,), i % 7, np.float32)}


def keep(record: dict, rng: np.random.Generator) -> dict:
  """The host transform: the record as is."""
  del rng
  return record


@dataclasses.dataclass(frozen=True)
class Sleep:
  """A per-batch map that sleeps `seconds` in the thread pulling from the grain iterator."""

  seconds: float

  def __call__(self, batch: dict) -> dict:
    time.sleep(self.seconds)
    return batch


def make_step(size: int):
  """A jitted step (state, batch) -> state of a few `size` x `size` matmuls that read the batch."""
  w = jnp.asarray(np.random.default_rng(0).standard_normal((size, size)) / np.sqrt(size),
                  jnp.float32)

  @jax.jit
  def step(state: jax.Array, batch: dict) -> jax.Array:
    h = state + jnp.mean(batch["x"])
    for _ in range(4):
      h = jnp.tanh(h @ w)
    return h

  return step


def time_steps(step, state: jax.Array, batches, steps: int, warmup: int, block: bool) -> float:
  """Seconds per step after `warmup` steps: the median step with `block` (load spikes on a shared
  machine barely move it), else the mean over `steps` (async dispatch: steps overlap)."""
  for _ in range(warmup):
    state = jax.block_until_ready(step(state, next(batches)))
  times = [time.perf_counter()]
  for _ in range(steps):
    state = step(state, next(batches))
    if block:
      state = jax.block_until_ready(state)
      times.append(time.perf_counter())
  jax.block_until_ready(state)
  return float(np.median(np.diff(times))) if block else (time.perf_counter() - times[0]) / steps


def stream(prefetch: int, delay: float, mesh) -> pipeline.GlobalBatches:
  """The real training stream over `Source`, each batch delayed by `delay` seconds."""
  ds = pipeline.make_dataset(Source(), keep, local_batch_size=_BATCH.value, seed=0, train=True,
                             process_index=0, process_count=1)
  return pipeline.GlobalBatches(ds.map(Sleep(delay)), mesh, prefetch=prefetch)


def measure(step, state: jax.Array, prefetch: int, delay: float, mesh) -> float:
  """Seconds per step fed by a fresh stream with `prefetch` and `delay`."""
  batches = stream(prefetch, delay, mesh)
  try:
    return time_steps(step, state, batches, _STEPS.value, _WARMUP.value, _BLOCK.value)
  finally:
    batches.close()


def main(argv: list[str]) -> None:
  del argv
  mesh = parallel.make_mesh()
  step, size = make_step(_SIZE.value), _SIZE.value
  state = jnp.zeros((size, size), jnp.float32)
  fixed = parallel.host_to_global(mesh, {"x": np.ones((_BATCH.value, FEATURES), np.float32)})
  t_step = float(np.median([time_steps(step, state, iter(lambda: fixed, None), _STEPS.value,
                                       _WARMUP.value, _BLOCK.value)
                            for _ in range(_REPEATS.value)]))
  print(f"step alone: {1e3 * t_step:.1f} ms (matmul {size}, {len(jax.devices())} "
        f"{jax.devices()[0].platform} device(s), block={_BLOCK.value}); input delay = 1x that")
  settings = [(int(p), d) for p in _PREFETCH.value for d in (0.0, t_step)]
  rounds = [[measure(step, state, p, d, mesh) for p, d in settings] for _ in range(_REPEATS.value)]
  times = dict(zip(settings, np.median(rounds, axis=0)))  # rounds interleave the settings
  for prefetch in map(int, _PREFETCH.value):
    base, slow = times[prefetch, 0.0], times[prefetch, t_step]
    print(f"prefetch={prefetch}: {1e3 * base:.1f} ms/step without delay, {1e3 * slow:.1f} "
          f"ms/step with {1e3 * t_step:.1f} ms input delay: ratio {slow / base:.2f}x, "
          f"{100 * (1 - (slow - base) / t_step):.0f}% of the delay hidden")


if __name__ == "__main__":
  app.run(main)

"""The one training loop: build, restore, step, log, evaluate, checkpoint."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from ml_collections import ConfigDict

from sslvl_jax import checkpoint, data, methods, metrics, optim, parallel
from sslvl_jax.durations import to_steps
from sslvl_jax.evals import tasks as eval_tasks
from sslvl_jax.methods.base import Method, TrainState


class StopSignal:
  """Turns SIGTERM (preemption) into a flag the loop polls; all processes agree before stopping."""

  def __init__(self):
    self.received = False
    self._previous = signal.signal(signal.SIGTERM, self._handler)

  def _handler(self, signum, frame):
    del signum, frame
    self.received = True

  def should_stop(self) -> bool:
    """True on every process once any process got SIGTERM (a collective on multi-host)."""
    if jax.process_count() == 1:
      return self.received
    flags = multihost_utils.process_allgather(np.int32(self.received))
    return bool(np.any(flags))

  def restore(self) -> None:
    """Reinstall the previous handler."""
    signal.signal(signal.SIGTERM, self._previous)


def process_sum(values: list[int]) -> list[int]:
  """Sum host-side counters over processes."""
  if jax.process_count() == 1:
    return values
  return np.asarray(multihost_utils.process_allgather(np.asarray(values))).sum(0).tolist()


def check_skips(skipped: int, seen: int, max_fraction: float) -> None:
  """Stop with a clear error when too many records were unreadable."""
  if seen >= 1000 and skipped > max_fraction * seen:
    raise RuntimeError(
        f"{skipped} of {seen} records were unreadable (> data.max_skip_fraction={max_fraction}); "
        "see the 'skipping unreadable record' log lines for the keys")


def init_state(method: Method, tx_builder, rng: jax.Array, mesh) -> tuple[TrainState, Any]:
  """Create the replicated TrainState directly on the mesh; returns (state, lr schedule)."""
  params, model_state = method.init_model(rng)  # sets method.graphdef (host, cheap for tiny models)
  tx, schedule = tx_builder(params)

  def make(params, model_state):
    extras = method.init_extras(params, model_state, jax.random.fold_in(rng, 1))
    return TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params),
                      model_state=model_state, extras=extras)

  rep = parallel.replicated(mesh)
  state = jax.jit(make, out_shardings=rep)(params, model_state)
  return state, (tx, schedule)


def make_train_step(method: Method, tx: optax.GradientTransformation, schedule, mesh):
  """The jitted, state-donating train step."""
  def step_fn(state: TrainState, batch: dict, rng: jax.Array) -> tuple[TrainState, dict]:
    rng = jax.random.fold_in(rng, state.step)
    grad_fn = jax.value_and_grad(method.forward_loss, has_aux=True)
    (loss, (m, model_state, extras)), grads = grad_fn(state.params, state, batch, rng)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    params, extras = method.after_update(params, extras, state.step)
    out = {f"train/{k}": v for k, v in m.items()}
    out.update({"train/loss": loss, "train/lr": schedule(state.step),
                "train/grad_norm": optax.global_norm(grads),
                "train/param_norm": optax.global_norm(params)})

    new = TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                     model_state=model_state, extras=extras)
    return new, out

  rep, dat = parallel.replicated(mesh), parallel.data_sharding(mesh)
  return jax.jit(step_fn, in_shardings=(rep, dat, rep), out_shardings=(rep, rep), donate_argnums=0)


@dataclasses.dataclass
class Setup:
  """Everything built from a config before the loop (shared by training and evaluate.py)."""

  config: ConfigDict
  mesh: Any
  method: Method
  batches: data.GlobalBatches
  state: TrainState
  tx: optax.GradientTransformation
  schedule: Any
  ckpt: checkpoint.Checkpointer
  total_steps: int


def setup(config: ConfigDict, workdir: str, *, step: int | None = None) -> Setup:
  """Build mesh, data, method and state; restore checkpoint `step` (default: the latest)."""
  config = copy.deepcopy(config)
  mesh = parallel.make_mesh(config.get("num_devices"))
  parallel.check_batch_divides(config.global_batch_size, mesh)
  train_source = data.source(config.data, "train")
  steps_per_epoch = len(train_source) / config.global_batch_size
  total_steps = to_steps(config, "total", steps_per_epoch, config.global_batch_size)
  with config.unlocked():
    config.optim.warmup_steps = to_steps(config.optim, "warmup", steps_per_epoch,
                                         config.global_batch_size, default=0)
    for unit in ("epochs", "examples"):
      if f"warmup_{unit}" in config.optim:
        del config.optim[f"warmup_{unit}"]
    config.schedule = {"total_steps": total_steps, "steps_per_epoch": steps_per_epoch}
  method = methods.get(config.method)(config, mesh)
  local_bs = config.global_batch_size // jax.process_count()
  dataset = data.make_dataset(
      train_source, data.example_transform(config.data, method.example, train=True),
      local_batch_size=local_bs, seed=config.seed, train=True,
      worker_count=config.data.get("worker_count", 0))
  batches = data.GlobalBatches(dataset, mesh)
  tx_builder = lambda p: optim.build(config.optim, p, total_steps=total_steps,  # noqa: E731
                                     global_batch_size=config.global_batch_size,
                                     steps_per_epoch=steps_per_epoch)
  state, (tx, schedule) = init_state(method, tx_builder, jax.random.key(config.seed), mesh)
  ckpt = checkpoint.Checkpointer(workdir, max_to_keep=config.get("keep_checkpoints", 3))
  step = ckpt.latest_step() if step is None else step
  if step:
    state, _ = ckpt.restore(step, checkpoint.abstract_like(state), batches.grain_iter)
  return Setup(config, mesh, method, batches, state, tx, schedule, ckpt, total_steps)


def run_evaluators(evaluators: dict, s: Setup, state: TrainState, step: int, total_steps: int,
                   writer: metrics.Writer, workdir: str, force: bool = False) -> dict[str, float]:
  """Run the evaluators due at `step` (all with `force`); write and return their results."""
  out = {}
  for name, ev in evaluators.items():
    if force or ev.due(step, total_steps):
      res = ev.run(s.method.merge(state.params, state.model_state), state.extras)
      res = {f"{name}/{k}": v for k, v in res.items()}
      writer.write(step, res)
      writer.log(f"eval step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in res.items()))
      eval_tasks.save_result(workdir, name, step, res, ev.settings())
      out.update(res)
  return out


def run(config: ConfigDict, workdir: str) -> dict[str, float]:
  """Train `config` in `workdir` (resuming if it holds a checkpoint); returns the final metrics."""
  s = setup(config, workdir)  # configuration errors surface here, before anything is written
  writer = metrics.Writer(workdir)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
      f.write(config.to_json_best_effort(indent=2))
  config, mesh, method, batches, state = s.config, s.mesh, s.method, s.batches, s.state
  tx, schedule, ckpt, total_steps = s.tx, s.schedule, s.ckpt, s.total_steps
  rng = jax.random.key(config.seed)
  start = int(state.step)
  if start:
    writer.log(f"resumed from step {start} in {ckpt.directory}")
  train_step = make_train_step(method, tx, schedule, mesh)
  evaluators = eval_tasks.build_all(config.get("evals", {}), method, mesh)
  throughput = metrics.Throughput(config.global_batch_size, total_steps)
  stop = StopSignal()
  log_every, ckpt_every = config.get("log_every_steps", 10), config.get("checkpoint_every_steps", 1000)
  step, last = start, {}
  max_skip = config.data.get("max_skip_fraction", 0.05)
  throughput.update(step)
  try:
    while step < total_steps:
      state, m = train_step(state, next(batches), rng)
      step += 1
      if step % log_every == 0 or step == total_steps:
        m = jax.device_get(m)
        if not np.isfinite(m["train/loss"]) or not np.isfinite(m["train/grad_norm"]):
          bad = "loss" if not np.isfinite(m["train/loss"]) else "gradient norm"
          raise FloatingPointError(
              f"non-finite {bad} at step {step}; the last good checkpoint is step "
              f"{ckpt.latest_step()} in {ckpt.directory} (not overwritten)")
        skipped, seen = process_sum([batches.skipped, batches.seen])
        check_skips(skipped, seen, max_skip)
        m["data/skipped"] = skipped
        metrics.check_collapse(m, config.get("collapse_rules", ()), step)
        m.update(throughput.update(step))
        writer.write(step, m)
        writer.log(metrics.format_line(step, total_steps, m))
        last.update(m)
      last.update(run_evaluators(evaluators, s, state, step, total_steps, writer, workdir))
      stop_at = config.get("stop_at_step")
      preempted = stop.should_stop() or (stop_at is not None and step >= stop_at)
      if step % ckpt_every == 0 or step == total_steps or preempted:
        ckpt.save(step, state, batches.grain_iter, {"step": step, "config": config.method})
      if preempted:
        why = "SIGTERM" if stop.received else f"stop_at_step={config.get('stop_at_step')}"
        writer.log(f"{why}: saved step {step}, exiting; rerun the same command to resume")
        break
  finally:
    ckpt.close()
    stop.restore()
  final = {k: float(v) for k, v in last.items() if np.ndim(v) == 0}
  writer.log("final: " + json.dumps({k: round(v, 5) for k, v in final.items()}))
  writer.close()
  return final

"""The one training loop: build, restore, step, log, evaluate, checkpoint."""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath
from jax.experimental import multihost_utils
from ml_collections import ConfigDict

from sslvl_jax import (accumulate, checkpoint, data, durations, methods, metrics, optim, parallel,
                       rngs, sharding)
from sslvl_jax.errors import ConfigError, RunError
from sslvl_jax.evals import tasks as eval_tasks
from sslvl_jax.methods.base import Method, TrainState
from sslvl_jax.preemption import StopSignal


def process_sum(values: list[int]) -> list[int]:
  """Sum host-side counters over processes."""
  if jax.process_count() == 1:
    return values
  return np.asarray(multihost_utils.process_allgather(np.asarray(values))).sum(0).tolist()


def check_skips(skipped: int, seen: int, max_fraction: float) -> None:
  """Stop with a clear error when too many records were unreadable."""
  if seen >= 1000 and skipped > max_fraction * seen:
    raise RunError(
        f"{skipped} of {seen} records were unreadable (> data.max_skip_fraction={max_fraction}); "
        "see the 'skipping unreadable record' log lines for the keys")


def initializer(method: Method, tx_builder, rng: jax.Array, mesh, rules: Any = None):
  """(jitted init: seed key -> TrainState born on its shards, the shardings, tx, lr schedule).

  The state is never materialised whole: its shapes come from `jax.eval_shape`, each leaf's
  sharding from `rules` (config.sharding_rules, see sslvl_jax.sharding; None: the default) and
  one jit creates every leaf on its own shards.
  """
  abstract_params, _ = jax.eval_shape(method.init_model, rngs.stream(rng, "params"))
  tx, schedule = tx_builder(abstract_params)  # masks need only the paths and shapes

  def make(rng):
    params, model_state = method.init_model(rngs.stream(rng, "params"))
    extras = method.init_extras(params, model_state, rngs.stream(rng, "extras"))
    return TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params),
                      model_state=model_state, extras=extras, guard=new_guard())

  shardings = sharding.tree_shardings(jax.eval_shape(make, rng), mesh, rules)
  return jax.jit(make, out_shardings=shardings), shardings, tx, schedule


def init_state(method: Method, tx_builder, rng: jax.Array, mesh,
               rules: Any = None) -> tuple[TrainState, Any]:
  """The TrainState born sharded on the mesh (see `initializer`); returns (state, (tx, lr
  schedule)). Records the shardings as `method.state_sharding` (make_train_step's default),
  besides `method.graphdef` (set by init_model)."""
  make, shardings, tx, schedule = initializer(method, tx_builder, rng, mesh, rules)
  state = make(rng)
  method.state_sharding = shardings
  return state, (tx, schedule)


def new_guard() -> dict[str, jax.Array]:
  """Counters of non-finite steps: total skipped, current and longest run, first bad step (-1)."""
  zero = jnp.int32(0)
  return {"skipped": zero, "run": zero, "longest_run": zero, "first_bad": jnp.int32(-1)}


def update_guard(guard: dict, ok: jax.Array, step: jax.Array) -> dict[str, jax.Array]:
  """The guard after a step that was finite (`ok`) or not."""
  run = jnp.where(ok, 0, guard["run"] + 1)
  return {"skipped": guard["skipped"] + (~ok).astype(jnp.int32), "run": run,
          "longest_run": jnp.maximum(guard["longest_run"], run),
          "first_bad": jnp.where(~ok & (guard["first_bad"] < 0), step, guard["first_bad"])}


def make_train_step(method: Method, tx: optax.GradientTransformation, lr_schedule, mesh,
                    skip_nonfinite: bool = False, state_sharding: Any = None):
  """The jitted, state-donating train step fn(state, batch, seed key); the state keeps
  `state_sharding` (default: the shardings init_state gave it, `method.state_sharding`).
  Step t draws its randomness from `rngs.step_key(seed key, t)`.

  Every step checks on device that the loss, gradient norm and new parameter norm are finite and
  counts the steps that are not in `state.guard`; with `skip_nonfinite` such a step's update is
  not applied (parameters, optimiser, model and method state stay as they were). The gradient
  comes from `config.microbatches` micro-batches (sslvl_jax.accumulate); collapse monitors are
  computed only on the steps whose metrics are logged.
  """
  config = method.config
  grad_fn = accumulate.value_and_grad(method, config.get("microbatches", 1), mesh)
  log_every, total_steps = method.schedule.log_every, method.schedule.total_steps

  def step_fn(state: TrainState, batch: dict, rng: jax.Array) -> tuple[TrainState, dict]:
    rng = rngs.step_key(rng, state.step)
    done = state.step + 1
    monitor = (done % log_every == 0) | (done == total_steps)  # the steps whose metrics are logged
    before = state.replace(extras=method.before_step(state.params, state.extras, state.step))
    (loss, (m, model_state, extras)), grads = grad_fn(state.params, before, batch, rng, monitor)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    params, extras = method.after_update(params, extras, state.step)
    grad_norm, param_norm = optax.global_norm(grads), optax.global_norm(params)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(param_norm)
    guard = update_guard(state.guard, ok, state.step + 1)
    out = {f"train/{k}": v for k, v in m.items()}
    lr = lr_schedule(state.step - state.guard["skipped"])  # the optimiser counts applied steps
    out.update({"train/loss": loss, "train/lr": lr, "train/grad_norm": grad_norm,
                "train/param_norm": param_norm, "train/skipped_steps": guard["skipped"]})
    new = (params, opt_state, model_state, extras)
    if skip_nonfinite:
      old = (state.params, state.opt_state, state.model_state, state.extras)
      new = jax.lax.cond(ok, lambda: new, lambda: old)
    return TrainState(state.step + 1, *new, guard=guard), out

  rep, dat = parallel.replicated(mesh), parallel.data_sharding(mesh)
  st = state_sharding if state_sharding is not None else getattr(method, "state_sharding", rep)
  return jax.jit(step_fn, in_shardings=(st, dat, rep), out_shardings=(st, rep), donate_argnums=0)


@dataclasses.dataclass
class Setup:
  """Everything built from a config before the loop (shared by training and evaluate.py)."""

  config: ConfigDict
  mesh: Any
  method: Method
  batches: data.GlobalBatches
  state: TrainState
  tx: optax.GradientTransformation
  lr_schedule: Any
  ckpt: checkpoint.Checkpointer
  schedule: durations.Schedule
  evaluators: dict[str, eval_tasks.Evaluator]
  eval_every: dict[str, int]  # evaluator name -> interval in steps (0: only at the end)
  role: str  # the network the evaluators use (teacher / student)

  @property
  def total_steps(self) -> int:
    """The run's length in steps."""
    return self.schedule.total_steps


def setup(config: ConfigDict, workdir: str, *, step: int | None = None,
          allow_change: tuple[str, ...] = (), role: str | None = None) -> Setup:
  """Build mesh, data, method, evaluators and state; restore checkpoint `step` (default: the
  newest that loads, see Checkpointer.restore_latest; a config change outside `allow_change`
  and the safe keys is refused). The evaluators use the network `role` (None: the method's
  default, `Method.default_role`)."""
  config = copy.deepcopy(config)
  mesh = parallel.config_mesh(config)  # num_devices, mesh: {"data": -1, "fsdp": 1}
  parallel.check_batch_divides(config.global_batch_size, mesh)
  train_data, num_examples = data.train_split(config.data)
  if num_examples < config.global_batch_size:
    raise ConfigError(f"global_batch_size={config.global_batch_size} is larger than the "
                      f"{num_examples} training examples; lower it or add data")
  schedule = durations.schedule_of(config, num_examples)  # every step count, resolved once
  with config.unlocked():
    config.optim.warmup_steps = schedule.warmup_steps  # stored resolved with the checkpoints
    for unit in durations.UNITS[1:]:
      if f"warmup_{unit}" in config.optim:
        del config.optim[f"warmup_{unit}"]
    # resolved like the durations, so a resume on a host with other cores is seen as a change
    config.data.worker_count = data.resolve_worker_count(config.data.get("worker_count", 0))
  accumulate.check_microbatches(config.global_batch_size, mesh.devices.size,
                                config.get("microbatches", 1))
  method = methods.get(config.method)(config, mesh, schedule)
  role = method.resolve_role(role)
  evaluators = eval_tasks.build_all(config.get("evals", {}), method, mesh,  # checks their data
                                    predict_fns=method.predict_fns(role))
  eval_every = {n: schedule.steps(ev.cfg, "every", default=0) for n, ev in evaluators.items()}
  local_bs = config.global_batch_size // jax.process_count()
  dataset = data.train_dataset(
      config.data, train_data, data.example_transform(config.data, method.example, train=True),
      local_batch_size=local_bs, seed=config.seed)
  batches = data.GlobalBatches(dataset, mesh, prefetch=config.data.get("prefetch_batches", 2))
  tx_builder = lambda p: optim.build(config.optim, p, schedule)  # noqa: E731
  state, (tx, lr_schedule) = init_state(method, tx_builder, rngs.seed_key(config.seed), mesh,
                                        config.get("sharding_rules"))
  ckpt = checkpoint.Checkpointer(workdir, max_to_keep=config.get("keep_checkpoints", 3))
  checkpoint.check_shared(workdir)  # before any restore or save: hosts agree on the storage
  target = checkpoint.abstract_like(state)
  if step is None:
    check = functools.partial(check_config_change, checkpoint.json_config(config), allow_change)
    restored = ckpt.restore_latest(target, batches, check)
    state = restored[0] if restored else state
  elif step:
    state, _ = ckpt.restore(step, target, batches)
  return Setup(config, mesh, method, batches, state, tx, lr_schedule, ckpt, schedule, evaluators,
               eval_every, role)


def check_config_change(current: dict, allowed: tuple[str, ...], step: int, meta: dict) -> bool:
  """Refuse (ConfigError) a change of the config checkpoint `step` was trained with, unless each
  changed key is safe or in `allowed`; False when an allowed change may change the math."""
  saved = meta.get("config")
  if not isinstance(saved, dict):  # written before configs were stored with checkpoints
    return True
  changes = checkpoint.config_changes(saved, current)
  refused = checkpoint.refused_changes(changes, allowed)
  if refused:
    listed = "; ".join(f"{k}: {changes[k][0]!r} -> {changes[k][1]!r}" for k in refused[:6])
    more = f" (and {len(refused) - 6} more)" if len(refused) > 6 else ""
    raise ConfigError(f"the config differs from the one checkpoint {step} was trained with: "
                      f"{listed}{more}; rerun with the old values, or pass "
                      f"--allow_config_change={','.join(refused)} to continue with the new ones")
  return not checkpoint.refused_changes(changes, ())


def run_evaluators(evaluators: dict, s: Setup, state: TrainState, step: int,
                   writer: metrics.Writer, workdir: str) -> dict[str, float]:
  """Run `evaluators` on `state` (its params, model state and extras; each evaluator's jitted
  prediction functions take them as arguments); write and return their results, saved with
  the evaluator's settings and the network evaluated (`s.role`)."""
  out = {}
  for name, ev in evaluators.items():
    res = ev.run(state.params, state.model_state, state.extras)
    res = {f"{name}/{k}": v for k, v in res.items()}
    writer.write(step, res)
    writer.log(f"eval step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in res.items()))
    eval_tasks.save_result(workdir, name, step, res, {**ev.settings(), "role": s.role})
    out.update(res)
  return out


def write_config(workdir: str, config: ConfigDict, step: int) -> None:
  """WORKDIR/config.json on the first run; a resume with a different config adds config.<step>.json."""
  if jax.process_index() != 0:
    return
  text = config.to_json_best_effort(indent=2)
  path = epath.Path(workdir) / "config.json"
  if path.exists():
    if path.read_text() == text:
      return
    path = path.with_name(f"config.{step}.json")
  path.write_text(text)


def check_guard(guard: dict, policy: str, max_run: int, ckpt: checkpoint.Checkpointer) -> None:
  """Stop (RunError) after a non-finite step (policy 'stop') or too long a run of them ('skip')."""
  first, where = int(guard["first_bad"]), ckpt.last_good()
  if policy == "stop" and first >= 0:
    raise RunError(f"non-finite loss or gradient at step {first}; nothing after it was saved, "
                   f"{where}; lower optim.lr, or set --config.nonfinite=skip to skip such steps")
  if policy == "skip" and int(guard["longest_run"]) >= max_run:
    raise RunError(f"{int(guard['longest_run'])} consecutive non-finite steps (first non-finite "
                   f"step {first}, max_consecutive_skips={max_run}); {where}; lower optim.lr")


def save(ckpt: checkpoint.Checkpointer, step: int, state: TrainState, batches: data.GlobalBatches,
         config: ConfigDict) -> None:
  """Checkpoint `step` with the resolved config, refusing (RunError) a state with NaN/Inf."""
  bad = checkpoint.nonfinite_leaves(state)
  if bad:
    raise RunError(f"non-finite values in {bad[0]} at step {step}: not saved; {ckpt.last_good()}")
  ckpt.save(step, state, batches, {"step": step, "config": checkpoint.json_config(config)})


def run(config: ConfigDict, workdir: str, *, allow_change: tuple[str, ...] = (),
        stop: StopSignal | None = None) -> dict[str, float]:
  """Train `config` in `workdir` (resuming if it holds a checkpoint); returns the final metrics."""
  stop = stop or StopSignal()
  s = setup(config, workdir, allow_change=allow_change)  # bad config/data/evals fail here
  config, mesh, method, batches, state = s.config, s.mesh, s.method, s.batches, s.state
  tx, ckpt, total_steps = s.tx, s.ckpt, s.total_steps
  start = int(state.step)
  writer = metrics.Writer(workdir, keep_until=start)  # rows after the checkpoint are redone
  write_config(workdir, config, start)
  if start:
    writer.log(f"resumed from step {start} in {ckpt.directory}")
  split = sharding.describe(state)
  if split:
    writer.log(f"{len(split)} of {len(jax.tree.leaves(state))} state arrays split over the mesh "
               f"{dict(zip(mesh.axis_names, mesh.devices.shape))}, e.g. {split[0]}")
  rng = rngs.seed_key(config.seed)
  policy, max_run = config.get("nonfinite", "stop"), config.get("max_consecutive_skips", 10)
  train_step = make_train_step(method, tx, s.lr_schedule, mesh, skip_nonfinite=policy == "skip")
  throughput = metrics.Throughput(config.global_batch_size, total_steps)
  log_every, ckpt_every = s.schedule.log_every, s.schedule.checkpoint_every
  stop_at, max_skip = config.get("stop_at_step"), config.data.get("max_skip_fraction", 0.05)
  step, last = start, {}
  throughput.update(step)
  try:
    early = stop.should_stop()
    if early:
      writer.log(f"SIGTERM before the first step: nothing to save (resume from step {start})")
    while not early and step < total_steps:
      state, m = train_step(state, next(batches), rng)
      step += 1
      preempted = (stop.should_stop(step, config.get("preemption_check_every_steps", 10))
                   or (stop_at is not None and step >= stop_at))
      log_now = step % log_every == 0 or step == total_steps
      save_now = step % ckpt_every == 0 or step == total_steps or preempted
      evals_now = [n for n, every in s.eval_every.items()
                   if step == total_steps or (every and step % every == 0)]
      if log_now or save_now or evals_now:
        check_guard(jax.device_get(state.guard), policy, max_run, ckpt)
      if log_now:
        m = jax.device_get(m)
        skipped, seen = process_sum([batches.skipped, batches.seen])
        check_skips(skipped, seen, max_skip)
        m["data/skipped"] = skipped
        metrics.check_collapse(m, config.get("collapse_rules", ()), step)
        m.update(throughput.update(step))
        writer.write(step, m)
        writer.log(metrics.format_line(step, total_steps, m))
        last.update(m)
      if save_now:  # before the evaluations: a failing evaluation loses no training
        save(ckpt, step, state, batches, config)
      if preempted:
        why = "SIGTERM" if stop.received else f"stop_at_step={stop_at}"
        writer.log(f"{why}: saved step {step}, exiting; rerun the same command to resume")
        break
      evaluators = {n: s.evaluators[n] for n in evals_now}
      last.update(run_evaluators(evaluators, s, state, step, writer, workdir))
  finally:
    batches.close()
    ckpt.close()
    stop.restore()
    writer.close()
  final = {k: float(v) for k, v in last.items() if np.ndim(v) == 0}
  writer.log("final: " + json.dumps({k: round(v, 5) for k, v in final.items()}))
  return final

"""Orbax checkpointing of train state + data-iterator state + metadata: atomic, finite, resumable."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
from typing import Any, Callable, Iterable, Mapping

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from sslvl_jax import config_check, workdir as workdir_lib
from sslvl_jax.errors import ConfigError, RunError

# Keys that may change on resume: they do not change what a step computes.
SAFE_TO_CHANGE = ("total_steps", "total_epochs", "total_examples", "total_percent",
                  "log_every_*", "checkpoint_every_*", "keep_checkpoints", "stop_at_step",
                  "num_devices", "nonfinite", "max_consecutive_skips", "collapse_rules",
                  "preemption_check_every_steps", "evals", "evals.*", "data.prefetch_batches",
                  "data.max_skip_fraction", "mesh", "mesh.*", "sharding_rules",
                  "teacher.eval_on_teacher", "schedule", "schedule.*")  # (resolved step counts stored by older versions)
# The mesh shape and the sharding rules only move arrays between devices (a resume reshards).
# Not data.worker_count: grain's multi-process iterator state is per worker.
UNSET = "<unset>"
SHARED_CHECK = ".shared_storage_check"  # written and removed by check_shared
_PROCESS_FILE = re.compile(r"process_\d+-of-(\d+)\.json")  # grain's per-process data position


class Checkpointer:
  """Saves {state, data_iter, meta} under WORKDIR/checkpoints/<step>/; restores the newest good one.

  Orbax writes each step to a temporary directory and renames it when complete, so a crash or
  kill -9 during a save leaves the previous step as the latest usable checkpoint.
  """

  def __init__(self, workdir: str, *, max_to_keep: int = 3, async_save: bool = True):
    self.directory = workdir_lib.absolute(workdir) / "checkpoints"  # local or gs://
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    """Step of the newest complete checkpoint, or None."""
    return self.manager.latest_step()

  def last_good(self) -> str:
    """'the last good checkpoint is step N in DIR' (all saved ones are finite), for messages."""
    step = self.latest_step()
    return (f"the last good checkpoint is step {step} in {self.directory}" if step is not None
            else f"no checkpoint was saved yet in {self.directory}")

  def save(self, step: int, state: Any, data_iter: Any, meta: dict) -> None:
    """Save asynchronously (call `wait` before exiting); RunError if it cannot fit on disk."""
    self.check_space(step, sum(x.nbytes for x in jax.tree.leaves(state)))
    args = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
    if data_iter is not None:
      args["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
    self.manager.save(step, args=ocp.args.Composite(**args), force=True)

  def check_space(self, step: int, nbytes: int) -> None:
    """RunError, before anything is written, when a checkpoint of `nbytes` would fill the disk.

    Orbax keeps the old checkpoints until the new one is committed, so the new one needs room
    beside them; a full disk mid-save would leave only a temporary directory (and pages of
    errors from its writer threads).
    """
    if workdir_lib.is_url(self.directory):  # object stores do not fill up
      return
    self.manager.wait_until_finished()  # the previous save's bytes are on disk now
    free = shutil.disk_usage(self.directory).free
    need = nbytes + (1 << 20)  # arrays are stored uncompressed, plus metadata
    if not all_processes(free >= need):  # every process stops, or none
      raise RunError(f"no space for checkpoint {step} in {self.directory} (needs ~{need >> 20} "
                     f"MiB, {free >> 20} MiB free): not saved; {self.last_good()}; free some "
                     "space and rerun the same command")

  def read_meta(self, step: int) -> dict:
    """The metadata saved with `step` (the resolved config it was trained with)."""
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def restore(self, step: int, abstract_state: Any, data_iter: Any) -> tuple[Any, dict]:
    """Restore `step` onto the shardings of `abstract_state` (any mesh shape, device or process
    count); the data iterator is set in place (ConfigError: it needs the process count it was
    saved with)."""
    args = {"state": ocp.args.StandardRestore(abstract_state), "meta": ocp.args.JsonRestore()}
    if data_iter is not None:
      self.check_process_count(step)
      args["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
    out = self.manager.restore(step, args=ocp.args.Composite(**args))
    return out["state"], out["meta"]

  def check_process_count(self, step: int) -> None:
    """ConfigError when checkpoint `step`'s data position was saved by another number of
    processes: grain keeps one position per process (process_<i>-of-<n>.json), which another
    process count cannot continue from without repeating or skipping examples."""
    folder = self.directory / str(step) / "data_iter"
    names = [p.name for p in folder.iterdir()] if folder.exists() else []
    saved = {int(m.group(1)) for m in map(_PROCESS_FILE.fullmatch, names) if m}
    if saved and jax.process_count() not in saved:
      n = max(saved)
      raise ConfigError(f"checkpoint {step} in {self.directory} was saved by {n} processes and "
                        f"its data position is per process; resume it with {n} processes (any "
                        f"device count or mesh shape), not {jax.process_count()}, or start a new "
                        "workdir")

  def restore_latest(self, abstract_state: Any, data_iter: Any,
                     check_meta: Callable[[int, dict], bool]) -> tuple[Any, dict] | None:
    """Restore the newest checkpoint that loads; None when there is none.

    A checkpoint that fails to load (missing items, truncated or garbage files, an empty
    directory, non-finite values) is moved aside to `<step>.corrupt` with one warning and the
    previous one is tried. `check_meta(step, meta)` raises on a refused config change and returns
    False when the config changed with permission: a failure to load is then the change's fault,
    not corruption, and is raised instead of moving the checkpoint aside.
    """
    moved = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      changed = False
      try:
        changed = not check_meta(step, self.read_meta(step))
        state, meta = self.restore(step, abstract_state, data_iter)
        bad = nonfinite_leaves(state)
        reason = f"non-finite values in {bad[0]}" if bad else ""
      except ConfigError:
        raise
      except Exception as e:  # pylint: disable=broad-except  # any failure to load is corruption
        reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
      if all_processes(not reason):
        return state, meta
      if changed:
        raise RunError(f"checkpoint {step} in {self.directory} does not load with the changed "
                       f"config ({reason}); undo the change or start a new workdir")
      self._move_aside(step, reason)
      moved.append(f"{step}.corrupt")
    if moved:
      raise RunError(f"no checkpoint in {self.directory} loads (moved aside: {', '.join(moved)}); "
                     "rename one back to retry it, or start a new workdir")
    return None

  def _move_aside(self, step: int, reason: str) -> None:
    """Rename checkpoints/<step> to <step>.corrupt (process 0) and rescan."""
    path = self.directory / str(step)
    if jax.process_index() == 0:
      logging.warning("checkpoint %d does not load (%s); moved aside to %s.corrupt", step,
                      reason, path)
      print(f"warning: checkpoint {step} does not load ({reason}); moved aside to "
            f"{path}.corrupt, trying the previous one", flush=True)
      path.replace(self.directory / f"{step}.corrupt")
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"checkpoint {step} moved aside")
    self.manager.reload()

  def close(self) -> None:
    """Finish pending saves and release resources."""
    self.manager.wait_until_finished()
    self.manager.close()


def check_shared(workdir: str) -> None:
  """RunError on every process unless all see `workdir` as one storage (never a hang).

  Process 0 writes a random token to WORKDIR/SHARED_CHECK; after a barrier each process reads it
  and the verdicts are gathered, so per-host local disks (where orbax would crash one process at
  its first save and hang the others) stop all processes with the same message.
  """
  if jax.process_count() == 1:
    return
  path = workdir_lib.absolute(workdir) / SHARED_CHECK
  token = multihost_utils.broadcast_one_to_all(np.frombuffer(os.urandom(16), np.uint8))
  if jax.process_index() == 0:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(np.asarray(token).tobytes())
  multihost_utils.sync_global_devices("shared workdir token written")
  seen = path.read_bytes() if path.exists() else None
  verdict = 0 if seen == np.asarray(token).tobytes() else 1 if seen is None else 2
  verdicts = np.asarray(multihost_utils.process_allgather(np.int32(verdict))).reshape(-1)
  if jax.process_index() == 0:
    path.unlink(missing_ok=True)  # every process has read it (the gather is a barrier)
  bad = np.flatnonzero(verdicts)
  if bad.size:
    k = int(bad[0])
    sees = "no" if verdicts[k] == 1 else "another run's"
    raise RunError(f"workdir {workdir} must be storage every host sees: gs://... or a shared "
                   f"filesystem; process {k} sees {sees} {path} written by process 0 "
                   f"({bad.size} of {verdicts.size} processes do not see it)")


def all_processes(ok: bool) -> bool:
  """True when `ok` holds on every process (a collective on multi-host)."""
  if jax.process_count() == 1:
    return ok
  return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def abstract_like(state: Any) -> Any:
  """ShapeDtypeStructs with the shardings of `state`, the restore target: orbax reads each
  device's shards of every array, so a checkpoint saved on another mesh shape, device count or
  process count is resharded onto these."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


@jax.jit
def _finite_flags(tree: Any) -> Any:
  return jax.tree.map(lambda x: jnp.isfinite(x).all() if jnp.issubdtype(x.dtype, jnp.inexact)
                      else jnp.bool_(True), tree)


def nonfinite_leaves(tree: Any) -> list[str]:
  """Paths of the leaves of `tree` holding NaN or Inf (empty when all are finite)."""
  flags = jax.device_get(_finite_flags(tree))
  return [jax.tree_util.keystr(path) for path, ok in jax.tree_util.tree_leaves_with_path(flags)
          if not ok]


def config_changes(saved: Mapping[str, Any], current: Mapping[str, Any]) -> dict[str, tuple]:
  """Keys whose value differs between two (nested, JSON-like) configs: key -> (saved, current)."""
  a, b = dict(config_check.flatten(saved)), dict(config_check.flatten(current))
  return {k: (a.get(k, UNSET), b.get(k, UNSET)) for k in sorted(set(a) | set(b))
          if a.get(k, UNSET) != b.get(k, UNSET)}


def refused_changes(changes: Iterable[str], allowed: Iterable[str]) -> list[str]:
  """The changed keys neither safe (SAFE_TO_CHANGE) nor allowed (a key or a prefix of it)."""
  allowed = tuple(allowed)
  return [k for k in changes
          if not any(fnmatch.fnmatchcase(k, p) for p in SAFE_TO_CHANGE)
          and not any(k == a or k.startswith(a + ".") for a in allowed)]


def json_config(config: Any) -> dict:
  """A ConfigDict as plain JSON values (tuples become lists), the form stored with checkpoints."""
  return json.loads(config.to_json_best_effort())

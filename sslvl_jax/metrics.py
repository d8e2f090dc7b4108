"""Metric writers (stdout, metrics.jsonl, TensorBoard), throughput/ETA and collapse monitors."""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from sslvl_jax.errors import RunError
from sslvl_jax.losses import l2_normalize
from sslvl_jax.workdir import is_url


class Writer:
  """Writes scalar metrics to stdout, WORKDIR/metrics.jsonl and WORKDIR/tensorboard (process 0 only)."""

  def __init__(self, workdir: str, enabled: bool | None = None, keep_until: int | None = None):
    """Appends to WORKDIR/metrics.jsonl (local or gs://); with `keep_until`, rows of later steps
    are dropped first (a resumed run redoes them, so each step appears once)."""
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._tb = None
    if self.enabled:
      path = epath.Path(workdir) / "metrics.jsonl"
      path.parent.mkdir(parents=True, exist_ok=True)  # a no-op on an existing bucket
      if keep_until is not None and path.exists():
        truncate_rows(path, keep_until)
      self._jsonl = ObjectRows(path) if is_url(workdir) else path.open("a")
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    """Record `metrics` (scalars) at `step` in metrics.jsonl and TensorBoard."""
    if not self.enabled:
      return
    row = {"step": int(step)}
    for k, v in metrics.items():
      v = np.asarray(v)
      row[k] = v.item() if v.size == 1 else v.tolist()
    self._jsonl.write(json.dumps(row) + "\n")
    self._jsonl.flush()
    for k, v in row.items():
      if k != "step" and isinstance(v, (int, float)):
        self._tb.add_scalar(k, v, int(step))
    self._tb.flush()

  def log(self, line: str) -> None:
    """Print a progress line on process 0."""
    if self.enabled:
      print(line, flush=True)

  def close(self) -> None:
    """Flush and close the files (idempotent)."""
    if self.enabled and not self._jsonl.closed:
      self._jsonl.close()
      self._tb.close()


class ObjectRows:
  """A file appended to on an object store, which has no appends: the text is kept in memory and
  the object rewritten whole at each flush (an upload replaces an object atomically, so readers
  see every row up to some flush; a metrics file of ~1e4 rows costs ~MBs per flush)."""

  def __init__(self, path: epath.Path):
    self.path, self.closed = path, False
    self.text = path.read_text() if path.exists() else ""

  def write(self, text: str) -> None:
    """Add `text` (sent at the next flush)."""
    self.text += text

  def flush(self) -> None:
    """Upload the whole text."""
    self.path.write_text(self.text)

  def close(self) -> None:
    """Mark closed (everything written was flushed by the caller)."""
    self.closed = True


def replace_text(path: epath.Path, text: str) -> None:
  """Replace a file's contents atomically: an object upload is; locally via a renamed temp file."""
  if is_url(path):
    path.write_text(text)
    return
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(text)
  tmp.replace(path)


def truncate_rows(path: str | epath.Path, last_step: int) -> None:
  """Atomically rewrite a metrics.jsonl keeping the rows up to `last_step` (a torn last line goes)."""
  path = epath.Path(path)
  lines = path.read_text().splitlines(keepends=True)
  kept = []
  for line in lines:
    try:
      if json.loads(line)["step"] <= last_step:
        kept.append(line if line.endswith("\n") else line + "\n")
    except (ValueError, KeyError, TypeError):
      continue  # a line cut by a kill
  if len(kept) == len(lines) and all(line.endswith("\n") for line in lines):
    return
  replace_text(path, "".join(kept))


class Throughput:
  """Examples/s and ETA between successive log points."""

  def __init__(self, global_batch_size: int, total_steps: int):
    self.batch, self.total = global_batch_size, total_steps
    self._t, self._step = None, None

  def update(self, step: int) -> dict[str, float]:
    """Rates since the previous call (empty on the first call)."""
    now = time.perf_counter()
    out = {}
    if self._t is not None and step > self._step:
      dt = (now - self._t) / (step - self._step)
      out = {"examples_per_sec": self.batch / dt, "step_time_sec": dt,
             "eta_sec": dt * (self.total - step)}
    self._t, self._step = now, step
    return out


def format_line(step: int, total: int, metrics: Mapping[str, Any]) -> str:
  """One human progress line: step/total, loss, lr, examples/s, ETA, other scalars."""
  parts = [f"step {step}/{total}"]
  order = ["train/loss", "train/lr", "examples_per_sec"]
  for k in order + sorted(k for k in metrics if k not in order and k != "eta_sec"):
    if k in metrics:
      v = float(np.asarray(metrics[k]))
      parts.append(f"{k.split('/')[-1]} {v:.4g}")
  if "eta_sec" in metrics:
    parts.append(f"ETA {time.strftime('%H:%M:%S', time.gmtime(float(metrics['eta_sec'])))}")
  return " | ".join(parts)


def only_when(pred: jax.Array | bool, fn: Callable[[], Any]) -> Any:
  """fn() where `pred` holds, zeros of its shape otherwise; a traced `pred` skips the work at run time."""
  zeros = lambda: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(fn))  # noqa: E731
  if isinstance(pred, bool):
    return fn() if pred else zeros()
  return jax.lax.cond(pred, fn, zeros)


def embedding_std(z: jax.Array) -> jax.Array:
  """Mean per-dimension std of L2-normalised embeddings: ~1/sqrt(d) healthy, -> 0 on collapse."""
  z = l2_normalize(z)
  return jnp.std(z, axis=0).mean()


def rankme(z: jax.Array, eps: float = 1e-7) -> jax.Array:
  """Effective rank (RankMe): exp of the entropy of the normalised singular values of the batch."""
  s = jnp.linalg.svd(z.astype(jnp.float32), compute_uv=False)
  p = s / (s.sum() + eps) + eps
  return jnp.exp(-(p * jnp.log(p)).sum())


_COMPARE = {"<": lambda a, b: a < b, ">": lambda a, b: a > b}


def check_collapse(values: Mapping[str, Any], rules: Any, step: int) -> None:
  """Raise when a collapse monitor trips a `(metric, '<' | '>', threshold)` rule."""
  for name, op, threshold in rules:
    if name in values and _COMPARE[op](float(np.asarray(values[name])), threshold):
      raise RunError(
          f"collapse detected at step {step}: {name} = {float(np.asarray(values[name])):.3g} "
          f"{op} {threshold} (rule in config.collapse_rules); the representation has collapsed")

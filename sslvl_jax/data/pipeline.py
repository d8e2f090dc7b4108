"""grain input pipeline: per-process shard, shuffle per epoch, host transform, batch, global arrays."""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import queue
import threading
import weakref
from typing import Any, Callable, Iterator

import grain
import jax
import numpy as np
from jax.sharding import Mesh

from sslvl_jax import parallel
from sslvl_jax.errors import ConfigError, RunError


def make_dataset(source: Any, transform: Callable[[dict, np.random.Generator], dict], *,
                 local_batch_size: int, seed: int, train: bool, worker_count: int | str = 0,
                 process_index: int | None = None, process_count: int | None = None
                 ) -> grain.IterDataset:
  """Per-process, batched grain dataset over a random-access `source`.

  Training: the whole source is reshuffled every epoch and repeated forever, with per-example
  randomness derived from (seed, position); the stream is cut into local batches and process p
  takes batches p, p + P, p + 2P, ... So global batch s holds the same examples in the same order
  whatever the number of processes, each process decodes only its own examples, and the stream
  resumes exactly from the iterator state. Evaluation: this process's slice, one ordered pass,
  the last partial batch kept; an unreadable record is logged and dropped (not replaced), so a
  process's batches hold fewer rows than its slice. `worker_count`: decode processes (0: decode
  in this process on grain's threads; 'auto' or -1: see `resolve_worker_count`).
  """
  pid = jax.process_index() if process_index is None else process_index
  nproc = jax.process_count() if process_count is None else process_count
  read = ReadExample(source, transform, max_retries=16 if train else 1, drop=not train)
  ds = grain.MapDataset.range(len(source))
  options = grain.ReadOptions(num_threads=4, prefetch_buffer_size=8)
  if train:
    ds = ds.shuffle(seed=seed).repeat()
    ds = ds.random_map(read, seed=seed).batch(local_batch_size, drop_remainder=True)
    it = ds[pid::nproc].to_iter_dataset(options)
  else:  # to_iter_dataset leaves out the None of a dropped record; batch what remains
    ds = ds[pid::nproc].random_map(read, seed=seed)
    it = ds.to_iter_dataset(options).batch(local_batch_size)
  workers = resolve_worker_count(worker_count)
  if workers:
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
  return it


def resolve_worker_count(worker_count: int | str) -> int:
  """'auto'/-1: one decode process per CPU core this process may use, less one for itself."""
  if worker_count in ("auto", -1):
    return max(0, len(os.sched_getaffinity(0)) - 1)
  if isinstance(worker_count, int) and worker_count >= 0:
    return worker_count
  raise ConfigError(f"data.worker_count={worker_count!r}: expected an int >= 0, 'auto' or -1")


@dataclasses.dataclass(frozen=True)
class _Batch:
  """A global batch, its record counts, and the grain iterator state right after it was read."""

  arrays: dict
  skipped: int
  seen: int
  state: Any


_DROP = ("key", "skipped")  # per-example fields that stay on the host


def _read_batch(it: Iterator[dict], mesh: Mesh) -> _Batch:
  """The next local batch of `it`, put on the devices as global arrays."""
  local = next(it)
  state = it.get_state()
  skipped = int(np.sum(local["skipped"])) if "skipped" in local else 0
  seen = len(next(iter(local.values())))
  arrays = parallel.host_to_global(mesh, {k: v for k, v in local.items() if k not in _DROP})
  return _Batch(arrays, skipped, seen, state)


def _put(out: queue.Queue, item: Any, stop: threading.Event) -> None:
  """Put `item` on `out`, waiting for room until `stop` is set."""
  while not stop.is_set():
    try:
      out.put(item, timeout=0.05)
      return
    except queue.Full:
      pass


def _read_ahead(it: Iterator[dict], mesh: Mesh, out: queue.Queue, stop: threading.Event) -> None:
  """Fill `out` with batches until `stop` is set; the error that ends the stream goes last."""
  while not stop.is_set():
    try:
      item = _read_batch(it, mesh)
    except Exception as e:  # pylint: disable=broad-except  # re-raised by the consumer
      _put(out, e, stop)
      return
    _put(out, item, stop)


class GlobalBatches:
  """Global batches (jax.Arrays sharded over `data`) from the per-process grain iterator.

  With `prefetch` > 0 a daemon thread reads and puts up to `prefetch` batches on the devices while
  the step runs; an error there is raised by the next `next()`. Checkpoint this object itself
  (grain's CheckpointSave/CheckpointRestore): `get_state` is the grain state after the last
  batch returned, not after the last one read ahead, and `set_state` drops the read-ahead.
  `skipped`/`seen` count the records of the batches returned.
  """

  def __init__(self, dataset: grain.IterDataset, mesh: Mesh, prefetch: int = 2):
    self.mesh = mesh
    self.prefetch = prefetch
    self.skipped = 0  # unreadable records passed over by this process since start/resume
    self.seen = 0
    self._it = iter(dataset)
    self._consumed: Any = None  # state after the last batch returned, once reading ahead
    self._queue: queue.Queue = queue.Queue()  # replaced, with its thread, by _start
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None

  def __iter__(self) -> Iterator[dict]:
    return self

  def __next__(self) -> dict:
    if not self.prefetch:
      batch = _read_batch(self._it, self.mesh)
    else:
      if self._thread is None:
        self._start()
      batch = self._queue.get()
      if isinstance(batch, Exception):
        self._queue.put(batch)  # the stream stays ended: a later next() raises it again
        raise batch
      self._consumed = batch.state
    self.skipped += batch.skipped
    self.seen += batch.seen
    return batch.arrays

  def _start(self) -> None:
    """Start reading ahead from the state after the last batch returned."""
    if self._consumed is None:
      self._consumed = self._it.get_state()
    else:  # restarted after close(): drop what was read ahead
      self._it.set_state(self._consumed)
    self._queue, self._stop = queue.Queue(self.prefetch), threading.Event()
    self._thread = threading.Thread(target=_read_ahead, name="GlobalBatches.read_ahead",
                                    args=(self._it, self.mesh, self._queue, self._stop),
                                    daemon=True)
    weakref.finalize(self, self._stop.set)  # an unreferenced iterator stops its thread
    self._thread.start()

  def close(self) -> None:
    """Stop the read-ahead thread and wait for it; a later next() resumes exactly."""
    if self._thread is not None:
      self._stop.set()
      self._thread.join()
      self._thread = None

  def get_state(self) -> bytes:
    """The grain iterator state after the last batch returned (JSON, as grain's handler wants)."""
    state = self._it.get_state() if self._consumed is None else self._consumed
    return json.dumps(state, indent=4).encode()

  def set_state(self, state: bytes) -> None:
    """Continue after the batch that `state` (from `get_state`) was saved after."""
    self.close()
    self._it.set_state(json.loads(state))
    self._consumed = None

  def start_prefetch(self) -> None:
    """Let grain's worker processes start decoding (called by grain's handler after restore)."""
    self._it.start_prefetch()


MAX_LOGGED = 20  # unreadable records logged by name per process; the rest are only counted
_logged = itertools.count()  # next() on a count is atomic: safe from grain's reader threads


def log_unreadable(key: str, error: Exception) -> None:
  """Warn about an unreadable record, the first MAX_LOGGED of them by name."""
  n = next(_logged)
  if n < MAX_LOGGED:
    logging.warning("skipping unreadable record %s: %s: %s", key, type(error).__name__, error)
  elif n == MAX_LOGGED:
    logging.warning("more unreadable records: counted in data/skipped, no longer logged")


@dataclasses.dataclass(frozen=True)
class ReadExample:
  """Reads record `index` and applies the host transform; a bad record is skipped, not fatal.

  A corrupt, truncated or missing record is logged with its key and replaced by the next index
  (deterministically, so resumption stays exact); `skipped` in the example counts the records
  passed over, which the train loop sums into `data/skipped` and checks against
  `data.max_skip_fraction`. With `drop` (evaluation, max_retries=1) a record still unreadable
  after `max_retries` reads as None instead of raising: the pipeline leaves it out.
  """

  source: Any
  transform: Callable[[dict, np.random.Generator], dict]
  max_retries: int = 16
  drop: bool = False

  def __call__(self, index: int, rng: np.random.Generator) -> dict | None:
    n = len(self.source)
    errors = []
    for attempt in range(self.max_retries):
      i = (int(index) + attempt) % n
      try:
        example = self.transform(self.source[i], rng)
      except Exception as e:  # pylint: disable=broad-except  # any unreadable record is skipped
        key = self.source.key(i) if hasattr(self.source, "key") else f"index {i}"
        log_unreadable(key, e)
        errors.append(f"{key}: {type(e).__name__}: {e}")
        continue
      example["skipped"] = np.int32(attempt)
      return example
    if self.drop:
      return None
    raise RunError(f"{self.max_retries} consecutive unreadable records starting at index "
                   f"{index}; the data looks broken. Errors: {errors[:3]}")


@dataclasses.dataclass(frozen=True)
class Transform:
  """A picklable host transform: `fn(record, rng, **kwargs)` bound to its settings."""

  fn: Callable[..., dict]
  kwargs: dict

  def __call__(self, record: dict, rng: np.random.Generator) -> dict:
    return self.fn(record, rng, **self.kwargs)

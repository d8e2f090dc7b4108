"""grain input pipeline: per-process shard, shuffle per epoch, host transform, batch, global arrays."""

from __future__ import annotations

import dataclasses
import itertools
import logging
from typing import Any, Callable, Iterator

import grain
import jax
import numpy as np
from jax.sharding import Mesh

from sslvl_jax import parallel
from sslvl_jax.errors import RunError


def make_dataset(source: Any, transform: Callable[[dict, np.random.Generator], dict], *,
                 local_batch_size: int, seed: int, train: bool, worker_count: int = 0,
                 process_index: int | None = None, process_count: int | None = None
                 ) -> grain.IterDataset:
  """Per-process, batched grain dataset over a random-access `source`.

  Training: the whole source is reshuffled every epoch and repeated forever, with per-example
  randomness derived from (seed, position); the stream is cut into local batches and process p
  takes batches p, p + P, p + 2P, ... So global batch s holds the same examples in the same order
  whatever the number of processes, each process decodes only its own examples, and the stream
  resumes exactly from the iterator state. Evaluation: this process's slice, one ordered pass,
  the last partial batch kept; an unreadable record is logged and dropped (not replaced), so a
  process's batches hold fewer rows than its slice.
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
  if worker_count:
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return it


class GlobalBatches:
  """Iterator of global batches (jax.Arrays sharded over `data`) from the per-process grain iterator."""

  def __init__(self, dataset: grain.IterDataset, mesh: Mesh):
    self.mesh = mesh
    self.grain_iter = iter(dataset)
    self.skipped = 0  # unreadable records passed over by this process since start/resume
    self.seen = 0

  def __iter__(self) -> Iterator[dict]:
    return self

  def __next__(self) -> dict:
    local = next(self.grain_iter)
    if "skipped" in local:
      self.skipped += int(np.sum(local["skipped"]))
    self.seen += len(next(iter(local.values())))
    drop = ("key", "skipped")
    return parallel.host_to_global(self.mesh, {k: v for k, v in local.items() if k not in drop})


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

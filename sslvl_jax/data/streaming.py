"""Streaming webdataset: tar shards read front to back, no index, exact resume (grain IterDataset).

At LAION scale `sources.TarShards` (random access) indexes every member of every shard on every
process at start (~700 bytes a sample). This reads each shard sequentially with `tarfile` in
stream mode instead, so start-up opens no file and holds nothing per shard but its path.
Consecutive members with one key (`{key}.jpg`, `{key}.txt`, ...) make one record, the same dict
TarShards gives: {'image_bytes', 'text'?, 'label'?, 'key': 'shard-file-name:key'}.

Order. Epoch mode: process p of P reads shards p, p + P, ... (and a grain worker w of W of those,
w, w + W, ...); training reshuffles them every epoch from (seed, process, worker, epoch) and
repeats forever, evaluation reads them once in order. Resampled mode (open_clip's
--dataset-resampled): every process draws shards from the whole list with replacement, from its
own seeded stream, forever. `shuffle_buffer=N` reads N samples at a time and emits them in a
seeded random order (N records held in memory; a block ends at the end of an epoch, so each epoch
still holds every sample of this process's shards once). The host transform gets an RNG derived
from the sample's position, so a sample is transformed the same way whatever came before it.

State: (epoch, slot in the epoch's shard order, sample index and byte offset in that shard) of the
current block's first sample, the samples of the block already taken, and the skips not yet
reported: JSON, a few numbers. Restoring re-reads that one block (seeking to its byte offset in a
plain tar, reading from the start of a compressed one), so the same examples follow, bitwise.

Skipped and counted in the next example's `skipped`, never fatal: a shard that cannot be opened
(with a warning), a sample without an image member, a sample cut off by a truncated shard, and a
record the host transform fails on (a corrupt image, a missing caption for 'image_text'). Only
more than `max_consecutive_skips` of them in a row (broken data) raise RunError.
"""

from __future__ import annotations

import builtins
import glob
import os
import tarfile
from typing import Any, Callable, Iterable, Iterator

import grain
import jax
import numpy as np

from sslvl_jax.data.pipeline import log_unreadable
from sslvl_jax.data.sources import brace_expand, member_key
from sslvl_jax.errors import ConfigError, RunError

OpenFn = Callable[[str, str], Any]
Item = tuple[dict, "dict | None"]  # (position of the sample, its record or None if skipped)
COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ")  # gzip, bzip2, xz: no seeking inside
_ORDER, _BLOCK, _EXAMPLE = 0, 1, 2  # RNG stream tags


def shard_paths(spec: str | Iterable[str]) -> list[str]:
  """Shards of a brace/glob pattern or a list of them, in order; nothing is opened or stat'ed.

  Only a pattern with a glob wildcard lists its folder; brace ranges are expanded as strings.
  """
  specs = [spec] if isinstance(spec, str) else list(spec)
  out = []
  for s in specs:
    for p in brace_expand(os.path.expanduser(s)):
      out.extend(sorted(glob.glob(p)) if any(c in p for c in "*?[") else [p])
  if not out:
    raise ConfigError(f"no shards in {spec!r}")
  return out


def process_shards(shards: list[str], process_index: int, process_count: int) -> list[str]:
  """Shards process_index, process_index + process_count, ...; ConfigError if some get none."""
  if len(shards) < process_count:
    raise ConfigError(f"{len(shards)} shards for {process_count} processes (or grain workers): "
                      "each needs at least one; write more, smaller shards or use "
                      "data.resampled=True")
  return shards[process_index::process_count]


def _start() -> dict:
  """The position of the first sample of the stream."""
  return {"epoch": 0, "slot": 0, "sample": 0, "byte": 0}


class StreamingTarDataset(grain.IterDataset):
  """Examples `transform(record, rng)` of webdataset tar shards, streamed (see module doc)."""

  def __init__(self, shards: str | Iterable[str], transform: Callable[[dict, np.random.Generator],
                                                                       dict], *,
               seed: int, train: bool, process_index: int = 0, process_count: int = 1,
               resampled: bool = False, shuffle_buffer: int = 0, open_fn: OpenFn = builtins.open,
               image_exts: tuple[str, ...] = ("jpg", "jpeg", "png", "webp"),
               text_ext: str = "txt", label_ext: str = "cls", max_consecutive_skips: int = 1000):
    super().__init__()
    if resampled and not train:
      raise ConfigError("resampled shards are for training; evaluation reads each shard once")
    paths = shard_paths(shards)
    self.shards = paths if resampled else process_shards(paths, process_index, process_count)
    self.transform, self.seed, self.train, self.resampled = transform, seed, train, resampled
    self.stream = [process_index, 0]  # (process, grain worker): seeds this process's streams
    self.block = max(1, shuffle_buffer) if train else 1
    self.open_fn, self.max_consecutive_skips = open_fn, max_consecutive_skips
    self.image_exts, self.text_ext, self.label_ext = image_exts, text_ext, label_ext

  def set_slice(self, sl: slice, sequential_slice: bool = False) -> None:
    """Keep worker sl.start's share of the shards (grain's mp_prefetch, on a copy)."""
    del sequential_slice
    self.stream = [self.stream[0], sl.start or 0]
    self.shards = (self.shards[sl] if self.resampled
                   else process_shards(self.shards, sl.start or 0, sl.step or 1))

  def __iter__(self) -> StreamingIterator:
    return StreamingIterator(self)

  def __str__(self) -> str:
    return f"StreamingTarDataset({len(self.shards)} shards)"

  def rng(self, tag: int, pos: dict) -> np.random.Generator:
    """The RNG of stream `tag` at sample position `pos`, from (seed, process, worker)."""
    return np.random.default_rng([self.seed, *self.stream, tag, pos["epoch"], pos["slot"],
                                  pos["sample"]])

  def order(self, epoch: int) -> np.ndarray:
    """The shard indices of `epoch` in reading order."""
    n = len(self.shards)
    if not self.train:
      return np.arange(n)
    rng = self.rng(_ORDER, {"epoch": epoch, "slot": 0, "sample": 0})
    return rng.integers(n, size=n) if self.resampled else rng.permutation(n)

  def items(self, pos: dict) -> Iterator[Item]:
    """(position, record or None) of the samples from `pos` on, across shards and epochs."""
    epoch, slot, sample, byte = pos["epoch"], pos["slot"], pos["sample"], pos["byte"]
    while True:
      order = self.order(epoch)
      for slot in range(slot, len(order)):
        for sample, byte, rec in self.shard_items(self.shards[order[slot]], sample, byte):
          yield {"epoch": epoch, "slot": slot, "sample": sample, "byte": byte}, rec
        sample, byte = 0, 0
      if not self.train:
        return
      epoch, slot = epoch + 1, 0

  def shard_items(self, path: str, sample: int, byte: int
                  ) -> Iterator[tuple[int, int, dict | None]]:
    """(sample index, byte offset, record or None) of one shard's samples from `sample` on."""
    try:
      f = self.open_fn(path, "rb")
    except OSError as e:
      log_unreadable(path, e)
      yield sample, byte, None
      return
    with f:
      compressed = f.read(6).startswith(COMPRESSED_MAGIC)
      f.seek(0 if compressed else byte)
      skip, base = (sample, 0) if compressed else (0, byte)
      key, members, start = None, {}, byte
      index = sample - skip
      try:
        with tarfile.open(fileobj=f, mode="r|*") as tar:
          for m in tar:
            parts = member_key(m.name) if m.isfile() else None
            if parts is None:
              continue
            k, ext = parts
            if k != key:
              if key is not None and index >= sample:
                yield index, start, self.record(path, key, members)
              index += key is not None
              key, members, start = k, {}, base + m.offset
            if index >= sample:
              members[ext] = self.member(tar, m)
      except Exception as e:  # pylint: disable=broad-except  # a damaged shard ends there
        log_unreadable(f"{path} after {index - sample} samples", e)
        if key is not None and index >= sample:
          yield index, start, None
        return
      if key is not None and index >= sample:
        yield index, start, self.record(path, key, members)

  @staticmethod
  def member(tar: tarfile.TarFile, m: tarfile.TarInfo) -> bytes:
    """The data of the current member of a streamed tar; ValueError if it is cut short."""
    data = tar.extractfile(m).read()
    if len(data) != m.size:
      raise ValueError(f"member {m.name} truncated ({len(data)} of {m.size} bytes)")
    return data

  def record(self, path: str, key: str, members: dict[str, bytes]) -> dict | None:
    """The TarShards record of one sample's members; None (logged) without a readable image."""
    name = f"{os.path.basename(path)}:{key}"
    try:
      ext = next((e for e in self.image_exts if e in members), None)
      if ext is None:
        raise ValueError(f"no image member (has {sorted(members)})")
      rec = {"image_bytes": members[ext], "key": name}
      if self.text_ext in members:
        rec["text"] = members[self.text_ext].decode("utf-8").strip()
      if self.label_ext in members:
        rec["label"] = int(members[self.label_ext].decode().strip())
      return rec
    except ValueError as e:  # UnicodeDecodeError is a ValueError
      log_unreadable(name, e)
      return None


class StreamingIterator(grain.DatasetIterator):
  """Iterator of a StreamingTarDataset; its state is JSON (see the module doc)."""

  def __init__(self, ds: StreamingTarDataset):
    super().__init__()
    self.ds = ds
    self.set_state({**self._identity(), "start": _start(), "taken": 0, "pending": 0})

  def _identity(self) -> dict:
    """What a state must match to be restored here: the stream it was saved from."""
    return {"seed": self.ds.seed, "stream": list(self.ds.stream), "shards": len(self.ds.shards),
            "resampled": self.ds.resampled, "shuffle_buffer": self.ds.block}

  def get_state(self) -> dict:
    return {**self._identity(), "start": dict(self.start), "taken": self.taken,
            "pending": self.pending}

  def set_state(self, state: dict) -> None:
    mine = self._identity()
    diff = {k: (state.get(k), v) for k, v in mine.items() if state.get(k) != v}
    if diff:
      raise ConfigError(f"the data iterator state is of another stream: (saved, now) {diff}; "
                        "resume with the same shards, seed, processes and workers")
    self.start, self.taken = dict(state["start"]), int(state["taken"])
    self.reader = self.ds.items(self.start)
    self.block: list[Item] = []
    self.peeked: Item | None = None  # the first sample of the next epoch, read ahead
    if self.taken:
      self._fill()
      self.taken = int(state["taken"])
    self.pending = int(state["pending"])

  def _fill(self) -> None:
    """Read the next block of samples (not past the epoch's end), in its seeded random order.

    StopIteration at the end of an evaluation pass.
    """
    first = self.peeked or next(self.reader, None)
    if first is None:
      raise StopIteration
    items, self.peeked = [first], None
    while len(items) < self.ds.block:
      item = next(self.reader, None)
      if item is not None and item[0]["epoch"] != first[0]["epoch"]:
        self.peeked = item
      if item is None or self.peeked:
        break
      items.append(item)
    self.start, self.taken = items[0][0], 0
    if len(items) > 1:
      items = [items[i] for i in self.ds.rng(_BLOCK, self.start).permutation(len(items))]
    self.block = items

  def __next__(self) -> dict:
    while True:
      if self.taken == len(self.block):
        self._fill()
      pos, rec = self.block[self.taken]
      self.taken += 1
      if rec is not None:
        try:
          example = self.ds.transform(rec, self.ds.rng(_EXAMPLE, pos))
        except Exception as e:  # pylint: disable=broad-except  # any unreadable record is skipped
          log_unreadable(rec["key"], e)
        else:
          example["skipped"] = np.int32(self.pending)
          self.pending = 0
          return example
      self.pending += 1
      if self.pending > self.ds.max_consecutive_skips:
        raise RunError(f"{self.pending} consecutive unreadable samples or shards (last at "
                       f"{pos}); the data looks broken, see the warnings above")


def make_streaming_dataset(shards: str | Iterable[str],
                           transform: Callable[[dict, np.random.Generator], dict], *,
                           local_batch_size: int, seed: int, train: bool,
                           process_index: int | None = None, process_count: int | None = None,
                           resampled: bool = False, shuffle_buffer: int = 0,
                           worker_count: int = 0, open_fn: OpenFn = builtins.open,
                           **source_options: Any) -> grain.IterDataset:
  """Per-process batched stream of examples from tar shards, for GlobalBatches (see module doc).

  Batches are dicts of stacked numpy arrays, each example's `skipped` included, like
  pipeline.make_dataset's; training drops nothing but batches whole, evaluation keeps the last
  partial batch. With `worker_count`, each grain worker streams its share of this process's
  shards and yields whole batches. `source_options`: image_exts, text_ext, label_ext,
  max_consecutive_skips.
  """
  pid = jax.process_index() if process_index is None else process_index
  nproc = jax.process_count() if process_count is None else process_count
  ds = StreamingTarDataset(shards, transform, seed=seed, train=train, process_index=pid,
                           process_count=nproc, resampled=resampled,
                           shuffle_buffer=shuffle_buffer, open_fn=open_fn, **source_options)
  if worker_count and not resampled:
    process_shards(ds.shards, 0, worker_count)  # fail here, not in a worker
  out = ds.batch(local_batch_size, drop_remainder=train)
  if worker_count:
    out = out.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return out

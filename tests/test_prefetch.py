"""GlobalBatches device prefetch: same batches as synchronous, exact resume, errors, close."""

import os
import time

import grain
import numpy as np
import pytest
from etils import epath

from sslvl_jax import parallel
from sslvl_jax.data import pipeline
from sslvl_jax.errors import ConfigError, RunError

N, BATCH = 40, 8  # 5 batches an epoch: the tests cross epoch boundaries


class Source:
  """`N` records {'x': [i, i, i]}; records from `bad_from` on cannot be read."""

  def __init__(self, bad_from: int = N):
    self.bad_from = bad_from

  def __len__(self) -> int:
    return N

  def __getitem__(self, i: int) -> dict:
    if i >= self.bad_from:
      raise OSError(f"record {i} is corrupt")
    return {"x": np.full((3,), i, np.float32)}


def jitter(record: dict, rng: np.random.Generator) -> dict:
  """Per-example randomness, so batches depend on the position in the stream."""
  return {"x": record["x"] + rng.standard_normal(3).astype(np.float32)}


def batches(prefetch: int, source: Source | None = None) -> pipeline.GlobalBatches:
  """The training stream of `source` as global batches."""
  ds = pipeline.make_dataset(source or Source(), jitter, local_batch_size=BATCH, seed=3, train=True,
                             process_index=0, process_count=1)
  return pipeline.GlobalBatches(ds, parallel.make_mesh(), prefetch=prefetch)


def take(it: pipeline.GlobalBatches, k: int) -> list[np.ndarray]:
  """The next `k` batches' 'x' as host arrays."""
  return [np.asarray(next(it)["x"]) for _ in range(k)]


def wait_read_ahead(it: pipeline.GlobalBatches) -> None:
  """Block until the read-ahead queue is full (so the grain iterator is ahead of the consumer)."""
  deadline = time.monotonic() + 120  # a hang guard, not a speed check
  while not it._queue.full():  # pylint: disable=protected-access
    assert time.monotonic() < deadline, "the read-ahead thread never filled its queue"
    time.sleep(0.01)


def assert_same(got: list[np.ndarray], want: list[np.ndarray]) -> None:
  """Bitwise equality of two lists of batches."""
  assert len(got) == len(want)
  for g, w in zip(got, want):
    assert g.dtype == w.dtype
    np.testing.assert_array_equal(g, w)


def test_prefetched_batches_equal_synchronous_ones():
  sync, ahead = batches(0), batches(2)
  assert_same(take(ahead, 12), take(sync, 12))
  ahead.close()


def test_state_is_after_the_last_consumed_batch_and_restores_exactly(tmp_path):
  sync, ahead = batches(0), batches(2)
  want = take(sync, 9)
  assert_same(take(ahead, 3), want[:3])
  wait_read_ahead(ahead)
  state = ahead.get_state()
  assert state == _after(3).get_state()
  assert (ahead.seen, ahead.skipped) == (3 * BATCH, 0)

  # Through grain's Orbax handler, as the checkpointer does, into a fresh iterator.
  handler = grain.checkpoint.CheckpointHandler()
  handler.save(epath.Path(tmp_path), args=grain.checkpoint.CheckpointSave(ahead))
  resumed = batches(2)
  handler.restore(epath.Path(tmp_path), args=grain.checkpoint.CheckpointRestore(resumed))
  assert resumed.get_state() == state
  assert_same(take(resumed, 6), want[3:])

  # set_state on a running iterator drops what it read ahead.
  take(ahead, 2)
  wait_read_ahead(ahead)
  ahead.set_state(state)
  assert_same(take(ahead, 6), want[3:])
  for it in (ahead, resumed):
    it.close()


def _after(k: int) -> pipeline.GlobalBatches:
  """A synchronous iterator that has returned `k` batches."""
  it = batches(0)
  take(it, k)
  return it


def test_unreadable_data_error_surfaces_in_main_thread_with_its_type():
  it = batches(2, Source(bad_from=2 * BATCH))  # records 16..24 have 16 bad ones from them on
  with pytest.raises(RunError, match="16 consecutive unreadable records") as first:
    while True:
      next(it)
  with pytest.raises(RunError) as again:  # the stream stays ended
    next(it)
  assert again.value is first.value
  it.close()


class Boom(Exception):
  """An error type of the source's own."""


class FailingIterator:
  """Yields one batch, then raises Boom."""

  def __init__(self):
    self.n = 0

  def __iter__(self) -> "FailingIterator":
    return self

  def __next__(self) -> dict:
    self.n += 1
    if self.n > 1:
      raise Boom("source exploded")
    return {"x": np.zeros((BATCH,), np.float32)}

  def get_state(self) -> dict:
    return {"n": self.n}


def test_source_exception_keeps_type_and_message():
  it = pipeline.GlobalBatches(FailingIterator(), parallel.make_mesh(), prefetch=2)
  assert np.asarray(next(it)["x"]).shape == (BATCH,)
  with pytest.raises(Boom, match="^source exploded$"):
    next(it)
  it.close()


def test_close_joins_the_thread_and_next_resumes_exactly():
  sync, ahead = batches(0), batches(2)
  want = take(sync, 6)
  assert_same(take(ahead, 2), want[:2])
  wait_read_ahead(ahead)
  thread = ahead._thread  # pylint: disable=protected-access
  assert thread.is_alive() and thread.daemon
  ahead.close()
  assert not thread.is_alive()
  ahead.close()  # idempotent
  assert_same(take(ahead, 4), want[2:])
  ahead.close()


def test_worker_count_auto_uses_the_cores_left():
  assert pipeline.resolve_worker_count("auto") == len(os.sched_getaffinity(0)) - 1
  assert pipeline.resolve_worker_count(-1) == pipeline.resolve_worker_count("auto")
  assert pipeline.resolve_worker_count(5) == 5
  with pytest.raises(ConfigError, match="worker_count"):
    pipeline.resolve_worker_count("many")

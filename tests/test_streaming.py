"""Streaming webdataset: process split, epochs and resampling, exact resume, bad members skipped
and counted, and no file opened at start-up."""

from __future__ import annotations

import builtins
import io
import json

import numpy as np
import pytest
from ml_collections import ConfigDict
from PIL import Image

from sslvl_jax import data
from sslvl_jax.data import sources, streaming
from sslvl_jax.errors import ConfigError
from tests.shards import write_tar

SIZE = 8


def _png(seed: int) -> bytes:
  buf = io.BytesIO()
  pixels = np.random.default_rng(seed).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
  Image.fromarray(pixels).save(buf, format="PNG")
  return buf.getvalue()


def _sample(i: int) -> list[tuple[str, bytes]]:
  """Sample i: {i:06d}.png + .txt (caption of digit words) + .cls (label i)."""
  words = " ".join(["zero", "one", "two", "three"][int(d) % 4] for d in str(i))
  return [(f"{i:06d}.png", _png(i)), (f"{i:06d}.txt", words.encode()),
          (f"{i:06d}.cls", str(i).encode())]


def _shards(tmp_path, sizes: list[int]) -> list[str]:
  """Shards s-XX.tar, shard s holding samples 100 * s, 100 * s + 1, ..."""
  return [write_tar(tmp_path / f"s-{s:02d}.tar",
                    [m for i in range(n) for m in _sample(100 * s + i)])
          for s, n in enumerate(sizes)]


def _label(record: dict, rng: np.random.Generator) -> dict:
  """A cheap transform: the sample's label and one draw of its RNG."""
  return {"label": np.int64(record["label"]), "draw": rng.random()}


def _text_transform(train: bool) -> data.Transform:
  cfg = ConfigDict({"image_size": SIZE, "tokenizer": "builtin:digits", "context_length": 24,
                    "eval_resize_ratio": 1.0, "train_crop_scale": (0.3, 1.0)})
  return data.example_transform(cfg, "image_text", train=train)


def _labels(ds, n: int | None = None) -> list[int]:
  it = iter(ds)
  return [int(next(it)["label"]) for _ in range(n)] if n is not None else [
      int(e["label"]) for e in it]


def _same(a: list[dict], b: list[dict]) -> None:
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
      assert x[k].dtype == y[k].dtype


def test_records_match_tar_shards(tmp_path):
  paths = _shards(tmp_path, [3, 2])
  ds = streaming.StreamingTarDataset(f"{tmp_path}/s-{{00..01}}.tar", _label, seed=0, train=False)
  got = [rec for _, rec in ds.items(streaming._start())]  # pylint: disable=protected-access
  src = sources.TarShards(paths)
  want = [src[i] for i in range(len(src))]
  assert got == want and got[0]["key"] == "s-00.tar:000000" and got[0]["text"] == "zero"


@pytest.mark.parametrize("shuffle_buffer", [0, 4])
def test_epoch_mode_splits_shards_over_processes(tmp_path, shuffle_buffer):
  sizes = [3, 5, 2, 4, 1]
  paths = _shards(tmp_path, sizes)
  everything = sorted(100 * s + i for s, n in enumerate(sizes) for i in range(n))
  build = lambda p, train, seed=0: streaming.StreamingTarDataset(  # noqa: E731
      paths, _label, seed=seed, train=train, process_index=p, process_count=2,
      shuffle_buffer=shuffle_buffer)
  evals = [_labels(build(p, False)) for p in (0, 1)]
  assert evals[0] == [0, 1, 2, 200, 201, 400] and sorted(evals[0] + evals[1]) == everything
  per_process = [sum(sizes[0::2]), sum(sizes[1::2])]
  epochs = [_labels(build(p, True), 3 * n) for p, n in zip((0, 1), per_process)]
  firsts = [e[:n] for e, n in zip(epochs, per_process)]
  assert sorted(firsts[0] + firsts[1]) == everything  # each sample once in an epoch
  for e, n in zip(epochs, per_process):
    assert sorted(e[n:2 * n]) == sorted(e[:n]) == sorted(e[2 * n:])
  assert epochs[0][:per_process[0]] != evals[0]  # shuffled
  assert _labels(build(0, True, seed=1), 9) != epochs[0][:9]
  with pytest.raises(ConfigError, match="5 shards for 6 processes"):
    streaming.StreamingTarDataset(paths, _label, seed=0, train=True, process_index=0,
                                  process_count=6)


def test_resampled_draws_with_replacement(tmp_path):
  paths = _shards(tmp_path, [2, 2, 2, 2])
  build = lambda seed, p=0: streaming.StreamingTarDataset(  # noqa: E731
      paths, _label, seed=seed, train=True, process_index=p, process_count=2, resampled=True)
  ds = build(0)
  assert len(ds.shards) == 4  # every process draws from all shards
  draws = np.concatenate([ds.order(e) for e in range(5)])
  assert len(np.unique(draws)) < len(draws) and set(draws) <= {0, 1, 2, 3}
  assert any(len(set(ds.order(e))) < 4 for e in range(5))  # a shard twice in one "epoch"
  stream = _labels(ds, 40)
  assert stream == [100 * int(s) + i for s in draws for i in range(2)]
  assert stream == _labels(build(0), 40)
  assert stream != _labels(build(1), 40) and stream != _labels(build(0, p=1), 40)
  with pytest.raises(ConfigError, match="resampled"):
    streaming.StreamingTarDataset(paths, _label, seed=0, train=False, resampled=True)


@pytest.mark.parametrize("resampled,shuffle_buffer", [(False, 5), (True, 0), (False, 0)])
def test_exact_resume(tmp_path, resampled, shuffle_buffer):
  paths = _shards(tmp_path, [4, 3, 5])
  with open(paths[1], "r+b") as f:  # sample 101's PNG made undecodable: one skip on the way
    blob = f.read()
    f.seek(blob.index(_png(101)) + 20)
    f.write(b"\0" * 40)
  build = lambda: streaming.make_streaming_dataset(  # noqa: E731
      paths, _text_transform(train=True), local_batch_size=3, seed=7, train=True,
      process_index=0, process_count=1, resampled=resampled, shuffle_buffer=shuffle_buffer)
  straight = iter(build())
  want = [next(straight) for _ in range(14)]  # several epochs
  assert set(want[0]) == {"image", "tokens", "label", "skipped"}
  assert want[0]["image"].shape == (3, SIZE, SIZE, 3) and want[0]["skipped"].dtype == np.int32
  if not resampled:
    assert sum(int(b["skipped"].sum()) for b in want[:4]) == 1  # one epoch: 11 good of 12
  for k in (0, 1, 4, 9):
    it = iter(build())
    for _ in range(k):
      next(it)
    state = json.loads(json.dumps(it.get_state()))
    fresh = iter(build())
    fresh.set_state(state)
    _same([next(fresh) for _ in range(14 - k)], want[k:])
  other = streaming.StreamingTarDataset(paths, _label, seed=8, train=True)
  with pytest.raises(ConfigError, match="another stream"):
    iter(other).set_state(state)


def test_bad_members_and_shards_are_skipped_and_counted(tmp_path):
  bad = (_sample(0) + [("000001.png", b"not a png"), ("000001.txt", b"one")]
         + _sample(2)[:1] + [("000003.txt", b"three")] + _sample(4))  # corrupt, no text, no image
  cut = write_tar(tmp_path / "cut.tar", _sample(10) + _sample(11))
  blob = open(cut, "rb").read()
  with open(cut, "wb") as f:
    f.write(blob[:blob.index(_png(11)) + 30])  # truncated inside sample 11's image
  paths = [write_tar(tmp_path / "bad.tar", bad), str(tmp_path / "missing.tar"), cut,
           write_tar(tmp_path / "good.tar", _sample(20))]
  ds = streaming.make_streaming_dataset(paths, _text_transform(train=False), local_batch_size=2,
                                        seed=0, train=False, process_index=0, process_count=1)
  batches = list(ds)
  np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches]), [0, 4, 10, 20])
  np.testing.assert_array_equal(np.concatenate([b["skipped"] for b in batches]), [0, 3, 1, 1])
  np.testing.assert_array_equal(batches[0]["image"][0], np.asarray(Image.open(io.BytesIO(_png(0)))))


def _counting_open(calls: list[str]):
  def open_fn(path: str, mode: str):
    calls.append(path)
    return builtins.open(path, mode)
  return open_fn


@pytest.mark.parametrize("train,resampled", [(True, False), (True, True), (False, False)])
def test_start_up_opens_no_file(tmp_path, train, resampled):
  calls = []
  paths = [str(tmp_path / f"shard-{i:04d}.tar") for i in range(1000)]  # none exists yet
  ds = streaming.make_streaming_dataset(paths, _label, local_batch_size=2, seed=0, train=train,
                                        process_index=0, process_count=1, resampled=resampled,
                                        open_fn=_counting_open(calls))
  it = iter(ds)
  json.dumps(it.get_state())
  assert not calls
  if not train:  # the first batch opens only the shard it comes from
    write_tar(paths[0], _sample(0) + _sample(1) + _sample(2))
    assert list(next(it)["label"]) == [0, 1] and calls == [paths[0]]


def test_worker_slices(tmp_path):
  paths = _shards(tmp_path, [1] * 7)
  ds = streaming.StreamingTarDataset(paths, _label, seed=0, train=True, process_index=1,
                                     process_count=2)
  assert ds.shards == [paths[1], paths[3], paths[5]]
  ds.set_slice(slice(1, None, 2))  # grain worker 1 of 2 of process 1 of 2
  assert ds.shards == [paths[3]] and ds.stream == [1, 1]
  assert _labels(ds, 3) == [300, 300, 300]


def test_streaming_run_resumes_bitwise(tmp_path, capsys):
  """A quickstart smoke run on streamed shards, stopped at step 2 and resumed, ends with the
  parameters of the same run done in one go (the stream's state travels in the checkpoint)."""
  from configs import quickstart  # pylint: disable=g-import-not-at-top
  from sslvl_jax import train  # pylint: disable=g-import-not-at-top
  from test_train import final_params  # pylint: disable=g-import-not-at-top
  _shards(tmp_path, [10, 10, 10, 10])

  def config(**fields):
    c = quickstart.get_config("smoke")
    c.unlock()
    c.data.update(name="webdataset", streaming=True, num_examples=40, shuffle_buffer=4,
                  splits={"train": f"{tmp_path}/s-{{00..03}}.tar"}, image_size=32)
    c.update(dict(total_steps=4, num_devices=1, log_every_steps=1, checkpoint_every_steps=2),
             **fields)
    c.evals = {}
    return c
  train.run(config(), str(tmp_path / "full"))
  train.run(config(stop_at_step=2), str(tmp_path / "split"))
  train.run(config(), str(tmp_path / "split"))
  assert "resumed from step 2" in capsys.readouterr().out
  for x, y in zip(final_params(str(tmp_path / "full"), 4), final_params(str(tmp_path / "split"), 4)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

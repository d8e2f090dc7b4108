"""Data sources by config (image folder, CSV, webdataset, ArrayRecord, TFDS), the ArrayRecord
converter, exact resume, process sharding, and bad records skipped and counted."""

from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from ml_collections import ConfigDict
from PIL import Image

from sslvl_jax import data, parallel, train
from sslvl_jax.data import convert, sources
from sslvl_jax.data.tokenizer import Tokenizer
from sslvl_jax.errors import ConfigError
from tests.shards import write_tar

SIZE = 16  # every test image is SIZE x SIZE unless it tests another size: eval transforms keep it


def _pixels(seed: int, h: int = SIZE, w: int = SIZE) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
  buf = io.BytesIO()
  img.save(buf, format=fmt, **kw)
  return buf.getvalue()


def _write(path, blob: bytes) -> str:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(blob)
  return str(path)


def _rgb(blob: bytes) -> np.ndarray:
  """Reference decode: PIL straight to RGB."""
  return np.asarray(Image.open(io.BytesIO(blob)).convert("RGB"))


def _cfg(name: str, location: str, **fields) -> ConfigDict:
  """A data config with `splits.train=location`: eval transforms keep SIZE images as they are."""
  return ConfigDict({"name": name, "splits": {"train": location}, "image_size": SIZE,
                     "eval_resize_ratio": 1.0, **fields})


def _text_cfg(name: str, location, **fields) -> ConfigDict:
  return _cfg(name, location, tokenizer="builtin:digits", context_length=24, **fields)


def _eval_batches(source, transform, batch: int = 4) -> dict[str, np.ndarray]:
  """One ordered pass (eval mode), batches concatenated."""
  ds = data.make_dataset(source, transform, local_batch_size=batch, seed=0, train=False,
                         process_index=0, process_count=1)
  out = list(ds)
  return {k: np.concatenate([b[k] for b in out]) for k in out[0]}


def _same_records(a, b) -> None:
  assert len(a) == len(b)
  for i in range(len(a)):
    ra, rb = a[i], b[i]
    assert ra.keys() == rb.keys()
    for k in ra:
      np.testing.assert_array_equal(ra[k], rb[k])


def _tokens(cfg: ConfigDict, texts: list[str]) -> np.ndarray:
  return Tokenizer(data.tokenizer_spec(cfg)).encode(texts)


# ---- paths -----------------------------------------------------------------------------------
def test_brace_expansion_and_shard_lists(tmp_path):
  assert sources.brace_expand("a/{000..002}.tar") == ["a/000.tar", "a/001.tar", "a/002.tar"]
  assert sources.brace_expand("{x,y}-{8..10}") == ["x-8", "x-9", "x-10", "y-8", "y-9", "y-10"]
  assert sources.brace_expand("plain.tar") == ["plain.tar"]
  for name in ("s-00.tar", "s-01.tar", "s-02.tar", "t-00.tar"):
    _write(tmp_path / name, b"")
  d = str(tmp_path)
  assert sources.expand_paths(f"{d}/s-{{00..01}}.tar") == [f"{d}/s-00.tar", f"{d}/s-01.tar"]
  assert sources.expand_paths([f"{d}/t-*.tar", f"{d}/s-0[12].tar"]) == [
      f"{d}/t-00.tar", f"{d}/s-01.tar", f"{d}/s-02.tar"]
  with pytest.raises(ConfigError, match="do not exist"):
    sources.expand_paths(f"{d}/s-{{00..03}}.tar")
  with pytest.raises(ConfigError, match="no files match"):
    sources.expand_paths([f"{d}/s-*.tar", f"{d}/typo-*.tar"])


# ---- one test per source: config fields only, records vs the files, batches via make_dataset
def test_image_folder(tmp_path):
  root = tmp_path / "train"
  files = {"cat/b.png": 0, "cat/a.jpg": 1, "cat/sub/c.png": 2, "dog/x.png": 3}
  blobs = {rel: _encode(Image.fromarray(_pixels(s)), "JPEG" if rel.endswith("jpg") else "PNG")
           for rel, s in files.items()}
  for rel, blob in blobs.items():
    _write(root / rel, blob)
  _write(root / ".ipynb_checkpoints" / "y.png", blobs["dog/x.png"])  # hidden: not a class
  _write(root / "dog" / "notes.txt", b"not an image")
  cfg = _cfg("image_folder", str(root))
  src = data.source(cfg, "train")
  expected = [("cat/a.jpg", 0), ("cat/b.png", 0), ("cat/sub/c.png", 0), ("dog/x.png", 1)]
  assert [(src[i]["key"], src[i]["label"]) for i in range(len(src))] == expected
  assert all(src[i]["image_bytes"] == blobs[k] for i, (k, _) in enumerate(expected))
  assert src.key(3) == "dog/x.png"
  _same_records(src, pickle.loads(pickle.dumps(src)))
  converted = convert.convert(src, str(tmp_path / "ar"), shards=3)
  _same_records(src, sources.ArrayRecords(converted["paths"]))
  out = _eval_batches(src, data.example_transform(cfg, "image_label", train=False), batch=3)
  np.testing.assert_array_equal(out["image"], np.stack([_rgb(blobs[k]) for k, _ in expected]))
  np.testing.assert_array_equal(out["label"], [0, 0, 0, 1])
  with pytest.raises(ConfigError, match="does not exist"):
    data.source(_cfg("image_folder", str(tmp_path / "nope")), "train")
  with pytest.raises(ConfigError, match="data.splits has no 'test'"):
    data.source(cfg, "test")


@pytest.mark.parametrize("ext", ["csv", "tsv"])
def test_caption_table(tmp_path, ext):
  sep = "," if ext == "csv" else "\t"
  captions = ["a photo of the number one.", "the digit two.", "a handwritten three, twice"]
  blobs = [_encode(Image.fromarray(_pixels(10 + i))) for i in range(3)]
  paths = [_write(tmp_path / "img" / f"{i}.png", b) for i, b in enumerate(blobs)]
  rows = ["\ufeff" + sep.join(["filepath", "title", "id", "y"])]  # spreadsheet BOM
  rows += [sep.join([f"img/{i}.png", f'"{c}"', str(i), str(5 + i)]) for i, c in enumerate(captions)]
  rows[-1] = sep.join([paths[2], f'"{captions[2]}"', "2", "7"])  # an absolute path
  _write(tmp_path / f"pairs.{ext}", "\n".join(rows).encode())
  cfg = _text_cfg("csv", str(tmp_path / f"pairs.{ext}"), label_column="y")
  src = data.source(cfg, "train")
  assert [src[i]["text"] for i in range(3)] == captions
  assert [src[i]["label"] for i in range(3)] == [5, 6, 7]
  assert [src[i]["image_bytes"] for i in range(3)] == blobs
  _same_records(src, pickle.loads(pickle.dumps(src)))
  out = _eval_batches(src, data.example_transform(cfg, "image_text", train=False), batch=2)
  np.testing.assert_array_equal(out["image"], np.stack([_rgb(b) for b in blobs]))
  np.testing.assert_array_equal(out["tokens"], _tokens(cfg, captions))
  np.testing.assert_array_equal(out["label"], [5, 6, 7])
  with pytest.raises(ConfigError, match="no column 'caption'"):
    data.source(_text_cfg("csv", str(tmp_path / f"pairs.{ext}"), caption_column="caption"), "train")


def _sample(key: str, seed: int, caption: str) -> list[tuple[str, bytes]]:
  """img2dataset layout: {key}.jpg, {key}.txt, {key}.json."""
  return [(f"{key}.jpg", _encode(Image.fromarray(_pixels(seed)), "JPEG", quality=95)),
          (f"{key}.txt", caption.encode()), (f"{key}.json", json.dumps({"key": key}).encode())]


def test_webdataset_shards(tmp_path):
  shard0 = _sample("000000000", 1, "one") + _sample("000000001", 2, "two")
  shard1 = _sample("000010000", 3, "three") + [("000010001.jpg", shard0[0][1])]  # no caption
  write_tar(tmp_path / "laion-00000.tar", shard0)
  write_tar(tmp_path / "laion-00001.tar", shard1)
  write_tar(tmp_path / "laion-00002.tar", _sample("000020000", 4, "not listed"))
  cfg = _text_cfg("webdataset", str(tmp_path / "laion-{00000..00001}.tar"))
  src = data.source(cfg, "train")
  assert len(src) == 4
  assert [src.key(i) for i in range(4)] == [
      "laion-00000.tar:000000000", "laion-00000.tar:000000001", "laion-00001.tar:000010000",
      "laion-00001.tar:000010001"]
  assert [src[i].get("text") for i in range(4)] == ["one", "two", "three", None]
  jpgs = [shard0[0][1], shard0[3][1], shard1[0][1], shard0[0][1]]
  assert [src[i]["image_bytes"] for i in range(4)] == jpgs
  _same_records(src, pickle.loads(pickle.dumps(src)))
  out = _eval_batches(src, data.example_transform(cfg, "image_label", train=False))
  np.testing.assert_array_equal(out["image"], np.stack([_rgb(b) for b in jpgs]))
  converted = convert.convert(src, str(tmp_path / "ar"), shards=2)
  assert converted["written"] == 4
  _same_records(src, sources.ArrayRecords(converted["paths"]))

  # A shard cut short: the damaged last sample is indexed but unreadable; gzip is refused.
  blob = open(tmp_path / "laion-00000.tar", "rb").read()
  jpg_end = blob.index(shard0[3][1]) + len(shard0[3][1])
  _write(tmp_path / "cut.tar", blob[:jpg_end - 100])
  cut = data.source(_text_cfg("webdataset", str(tmp_path / "cut.tar")), "train")
  assert len(cut) == 2 and cut[0]["image_bytes"] == shard0[0][1]
  with pytest.raises(ValueError, match="truncated"):
    cut[1]  # pylint: disable=pointless-statement
  with tarfile.open(tmp_path / "z.tar.gz", "w:gz") as tar:
    tar.add(tmp_path / "laion-00002.tar", "x.jpg")
  with pytest.raises(ConfigError, match="gzip"):
    data.source(_text_cfg("webdataset", str(tmp_path / "z.tar.gz")), "train")


def test_tfds_mock_data():
  tfds = pytest.importorskip("tensorflow_datasets")
  cfg = _cfg("tfds", "train", dataset="mnist", image_size=28)
  with tfds.testing.mock_data(num_examples=6):
    src = data.source(cfg, "train")
    ref = tfds.data_source("mnist", split="train")
    assert len(src) == len(ref) == 6
    for i in range(6):
      np.testing.assert_array_equal(src[i]["image"], ref[i]["image"])
      assert src[i]["label"] == int(ref[i]["label"]) and src[i]["key"] == f"mnist/train:{i}"
    out = _eval_batches(src, data.example_transform(cfg, "image_label", train=False))
    np.testing.assert_array_equal(out["image"], np.stack([np.repeat(ref[i]["image"], 3, -1)
                                                          for i in range(6)]))
    np.testing.assert_array_equal(out["label"], [int(ref[i]["label"]) for i in range(6)])


def _tiny_builder_class():
  """A small real TFDS builder (PNG images, captions, labels): prepared without TensorFlow."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  class SslvlTinyCaptions(tfds.core.GeneratorBasedBuilder):
    """Eight captioned images."""
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
          "label": tfds.features.ClassLabel(num_classes=3), "caption": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for i in range(8):
        yield i, {"image": _encode(Image.fromarray(_pixels(40 + i))), "label": i % 3,
                  "caption": f"sample {i}"}

  return SslvlTinyCaptions


def test_tfds_prepared_dataset(tmp_path):
  pytest.importorskip("tensorflow_datasets")
  builder = _tiny_builder_class()(data_dir=str(tmp_path), file_format="array_record")
  builder.download_and_prepare()
  halves = []
  for split in ("train[:50%]", "train[50%:]"):
    cfg = _text_cfg("tfds", split, dataset="sslvl_tiny_captions", data_dir=str(tmp_path),
                    text_key="caption")
    src = data.source(cfg, "train")
    assert len(src) == 4
    recs = [src[i] for i in range(4)]
    for r in recs:  # each record is the generated example with its caption's index
      i = int(r["text"].split()[1])
      np.testing.assert_array_equal(r["image"], _pixels(40 + i))
      assert r["label"] == i % 3
    halves += [r["text"] for r in recs]
    out = _eval_batches(src, data.example_transform(cfg, "image_text", train=False))
    np.testing.assert_array_equal(out["tokens"], _tokens(cfg, [r["text"] for r in recs]))
    np.testing.assert_array_equal(out["image"], np.stack([r["image"] for r in recs]))
  assert sorted(halves) == [f"sample {i}" for i in range(8)]
  with pytest.raises(ConfigError, match="Prepare it in ArrayRecord format"):
    data.source(_cfg("tfds", "train", dataset="sslvl_tiny_captions",
                     data_dir=str(tmp_path / "empty")), "train")


# ---- bad records ---------------------------------------------------------------------------------
def _messy_table(tmp_path) -> tuple[str, dict[int, np.ndarray], list[int]]:
  """A 16-row CSV (label = row): 4 bad rows (isolated) and rows in every awkward image mode.

  Returns (csv path, {row: expected RGB image at SIZE}, bad rows).
  """
  good = {}
  rows = ["filepath,title,label"]

  def add(i, name, blob, caption="a photo of the number one.", expect=None):
    _write(tmp_path / "img" / name, blob)
    rows.append(f"img/{name},{caption},{i}")
    if expect is not None:
      good[i] = expect

  rgb = [_pixels(100 + i) for i in range(16)]
  jpeg = _encode(Image.fromarray(rgb[0]), "JPEG", quality=90)
  add(0, "0.jpg", jpeg, expect=_rgb(jpeg))
  add(1, "1.jpg", b"\xff\xd8\xff\xe0 this is not a jpeg")  # corrupt
  gray = _encode(Image.fromarray(rgb[2]).convert("L"), "JPEG")
  add(2, "2.jpg", gray, expect=_rgb(gray))
  add(3, "3.jpg", jpeg[:len(jpeg) // 2])  # truncated
  cmyk = _encode(Image.fromarray(rgb[4]).convert("CMYK"), "JPEG", quality=95)
  add(4, "4.jpg", cmyk, expect=_rgb(cmyk))
  rows.append("img/5-missing.jpg,a photo of the number one.,5")  # missing file
  rgba = np.dstack([rgb[6], np.arange(SIZE * SIZE, dtype=np.uint8).reshape(SIZE, SIZE)])
  add(6, "6.png", _encode(Image.fromarray(rgba)), expect=rgb[6])  # alpha dropped
  add(7, "7.png", _encode(Image.fromarray(rgb[7])), caption="  ")  # empty caption
  small = _pixels(108, 8, 10)  # smaller than the SIZE crop: upscaled (bicubic, short side)
  up = np.asarray(Image.fromarray(small).resize((20, SIZE), Image.BICUBIC))[:, 2:18]
  add(8, "8.png", _encode(Image.fromarray(small)), expect=up)
  pal = Image.fromarray(rgb[9]).quantize(8)
  pal.info["transparency"] = 0
  add(9, "9.png", _encode(pal), expect=np.asarray(pal.convert("RGBA"))[..., :3])
  for i in range(10, 16):
    add(i, f"{i}.png", _encode(Image.fromarray(rgb[i])), expect=rgb[i])
  path = _write(tmp_path / "messy.csv", "\n".join(rows).encode())
  return path, good, [1, 3, 5, 7]


def test_bad_records_skipped_and_counted_then_check_skips(tmp_path):
  path, good, bad = _messy_table(tmp_path)
  cfg = _text_cfg("csv", path, label_column="label")
  src = data.source(cfg, "train")
  n = len(src)
  ds = data.make_dataset(src, data.example_transform(cfg, "image_text", train=True),
                         local_batch_size=n, seed=0, train=True, process_index=0, process_count=1)
  batches = data.GlobalBatches(ds, parallel.make_mesh())
  # A bad row b (never next to another) is replaced by row b + 1: every batch of n is one epoch.
  expected = sorted([i for i in range(n) if i not in bad] + [b + 1 for b in bad])
  steps = 0
  with pytest.raises(RuntimeError, match=r"252 of 1008 records were unreadable"):
    for b in batches:
      steps += 1
      labels = np.asarray(b["label"])
      assert sorted(labels.tolist()) == expected
      images = np.asarray(b["image"])
      for row, img in zip(labels, images):
        np.testing.assert_array_equal(img, good[row], err_msg=f"row {row}")
      assert (batches.skipped, batches.seen) == (len(bad) * steps, n * steps)
      train.check_skips(batches.skipped, batches.seen, max_fraction=0.3)  # 25% bad: tolerated
      train.check_skips(batches.skipped, batches.seen, max_fraction=0.05)
  assert steps == 63  # the first check with >= 1000 records seen

  # SSL crops of the same rows, including the image smaller than the crop: the same rows skipped
  # (a CSV row with an empty caption is unreadable whatever the example).
  ssl_cfg = _cfg("csv", path, label_column="label", crop_groups=((SIZE, (0.3, 1.0), 2),))
  crops = data.example_transform(ssl_cfg, "multi_view", train=True)
  it = iter(data.make_dataset(src, crops, local_batch_size=n, seed=1, train=True,
                              process_index=0, process_count=1))
  b = next(it)
  assert b["views0"].shape == (n, 2, SIZE, SIZE, 3) and int(b["skipped"].sum()) == 4


def test_converter_round_trip(tmp_path):
  path, good, _ = _messy_table(tmp_path)
  out_dir = tmp_path / "ar"
  cmd = [sys.executable, "-m", "sslvl_jax.data.convert", "--source=csv", f"--input={path}",
         f"--output_dir={out_dir}", "--shards=3", "--label_column=label"]
  res = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=120,
                       cwd=os.path.dirname(os.path.dirname(__file__)))
  counts = json.loads(res.stdout.splitlines()[0])
  assert counts == {"records": 16, "written": 12, "skipped": 4, "skipped_by_reason": {
      "bad_image": 2, "missing_file": 1, "empty_caption": 1}}
  pattern = res.stdout.splitlines()[1].split("splits.train=")[1].strip("'")
  assert pattern == f"{out_dir}/train.array_record-{{00000..00002}}-of-00003"
  arr = data.source(_text_cfg("arrayrecord", pattern), "train")
  csv_src = data.source(_text_cfg("csv", path, label_column="label"), "train")
  rows = sorted(good)
  assert len(arr) == len(rows) == 12
  for i, row in enumerate(rows):  # same records, in order, bad ones left out
    assert arr[i] == csv_src[row]
    assert arr.key(i) == csv_src.key(row)
  _same_records(arr, pickle.loads(pickle.dumps(arr)))
  # In-process API: sharding by contiguous ranges, the same bytes as the CLI wrote.
  result = convert.convert(csv_src, str(tmp_path / "ar2"), shards=5, prefix="x")
  assert result["written"] == 12 and len(result["paths"]) == 5
  _same_records(arr, sources.ArrayRecords(result["paths"]))
  assert sources.unpack_record(sources.pack_record(csv_src[0])) == csv_src[0]


# ---- pipeline guarantees ---------------------------------------------------------------------
def _folder(tmp_path, n: int) -> ConfigDict:
  for i in range(n):
    _write(tmp_path / "f" / f"c{i % 2}" / f"{i:02d}.png",
           _encode(Image.fromarray(_pixels(200 + i, 12 + i, 20))))
  return _cfg("image_folder", str(tmp_path / "f"), crop_groups=((8, (0.2, 1.0), 2),))


def test_exact_resume_from_iterator_state(tmp_path):
  cfg = _folder(tmp_path, 10)
  src = data.source(cfg, "train")
  transform = data.example_transform(cfg, "multi_view", train=True)

  def fresh():
    return iter(data.make_dataset(src, transform, local_batch_size=4, seed=3, train=True,
                                  process_index=0, process_count=1))

  it = fresh()
  straight = [next(it) for _ in range(7)]  # 28 examples: crosses two epoch boundaries
  it = fresh()
  for _ in range(3):
    next(it)
  state = it.get_state()
  resumed = fresh()
  resumed.set_state(state)
  for want in straight[3:]:
    got = next(resumed)
    assert got.keys() == want.keys()
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])
  assert not np.array_equal(straight[0]["views0"], straight[1]["views0"])


class _Ids:
  """A source of record ids, to follow examples through the pipeline."""

  def __init__(self, n: int):
    self.n = n

  def __len__(self) -> int:
    return self.n

  def __getitem__(self, i: int) -> dict:
    return {"id": i}


def _id_and_draw(record: dict, rng: np.random.Generator) -> dict:
  return {"id": np.int32(record["id"]), "draw": rng.uniform()}


def test_two_processes_split_an_epoch_and_keep_global_batches():
  n, global_bs, steps = 12, 4, 6  # two epochs

  def run(pid, nproc, train):
    ds = data.make_dataset(_Ids(n if train else 11), _id_and_draw,
                           local_batch_size=global_bs // nproc, seed=7, train=train,
                           process_index=pid, process_count=nproc)
    it = iter(ds)
    return [next(it) for _ in range(steps)] if train else list(it)

  one = run(0, 1, True)
  two = [run(p, 2, True) for p in range(2)]
  for s in range(steps):
    for k in ("id", "draw"):  # global batch s: the same examples, the same random draws
      np.testing.assert_array_equal(np.concatenate([two[0][s][k], two[1][s][k]]), one[s][k])
  epoch = [set(np.concatenate([b["id"] for b in two[p][:3]]).tolist()) for p in range(2)]
  assert not epoch[0] & epoch[1] and epoch[0] | epoch[1] == set(range(n))
  assert sorted(np.concatenate([b["id"] for b in one[:3]]).tolist()) == list(range(n))
  assert sorted(np.concatenate([b["id"] for b in one[3:]]).tolist()) == list(range(n))
  assert not np.array_equal(np.concatenate([b["id"] for b in one[:3]]),
                            np.concatenate([b["id"] for b in one[3:]]))  # reshuffled
  evals = [np.concatenate([b["id"] for b in run(p, 2, False)]).tolist() for p in range(2)]
  assert not set(evals[0]) & set(evals[1]) and sorted(evals[0] + evals[1]) == list(range(11))

"""Random-access data sources: records {'image' | 'image_bytes', 'text'?, 'label'?, 'key'}.

Sources only read (TFDS alone decodes, inside tfds); decoding and transforms happen in the host
transform. Any exception while reading or transforming a record makes it skipped and counted
(pipeline.ReadExample). All sources are picklable, for grain's worker processes.

What a source knows of its labels without reading its records, for the evaluators' checks:
`labelled` (False: its records have no label; absent: they may) and `num_classes` (the number of
classes its labels index; absent: not known until read); an image folder also has `classes`.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import logging
import os
import re
import struct
import tarfile
from typing import Iterable

import numpy as np
from etils import epath

from sslvl_jax.errors import ConfigError
from sslvl_jax.workdir import absolute, is_url

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
_BRACE = re.compile(r"\{([^{}]*)\}")


def brace_expand(pattern: str) -> list[str]:
  """Expand '{000..012}' zero-padded ranges and '{a,b}' alternatives (webdataset shard lists)."""
  m = _BRACE.search(pattern)
  if not m:
    return [pattern]
  body, head, tail = m.group(1), pattern[:m.start()], pattern[m.end():]
  rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
  if rng:
    lo, hi = rng.groups()
    items = [str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1)]
  else:
    items = body.split(",")
  return [x for item in items for x in brace_expand(head + item + tail)]


def expand_paths(spec: str | Iterable[str]) -> list[str]:
  """Files of a brace/glob pattern or a list of them, in order; error if a pattern matches none."""
  specs = [spec] if isinstance(spec, str) else list(spec)
  out = []
  for s in specs:
    for p in brace_expand(os.path.expanduser(s)):
      matches = _glob(p) if any(c in p for c in "*?[") else [p]
      if not matches:
        raise ConfigError(f"no files match {p!r} (from {spec!r})")
      out.extend(matches)
  if not out:
    raise ConfigError(f"no files in {spec!r}")
  missing = [p for p in out if not epath.Path(p).exists()]
  if missing:
    raise ConfigError(f"{len(missing)} of {len(out)} files do not exist, e.g. {missing[0]!r}")
  return out


def _glob(pattern: str) -> list[str]:
  """Sorted matches of a glob pattern, a local path or a gs:// URL."""
  if not is_url(pattern):
    return sorted(glob.glob(pattern))
  parts = pattern.split("/")
  i = next(i for i, part in enumerate(parts) if any(c in part for c in "*?["))
  return sorted(os.fspath(m) for m in epath.Path("/".join(parts[:i])).glob("/".join(parts[i:])))


class EmptyCaptionError(ValueError):
  """A captioned record whose caption is empty (useless for image-text training)."""


def _read(path: str) -> bytes:
  return epath.Path(path).read_bytes()


class ImageFolder:
  """root/<class>/**/<image> (torchvision ImageFolder): labels index the sorted class folders.

  Label i is the i-th class folder name in Python's sorted order (by code point, as torchvision:
  'B' < 'a', '10' < '2'); `classes` lists them. Hidden folders ('.ipynb_checkpoints', ...) are
  skipped, as classes and inside classes.
  """

  labelled = True

  def __init__(self, root: str):
    root = os.path.expanduser(root)
    if not epath.Path(root).is_dir():
      raise ConfigError(f"image folder {root!r} does not exist; check data.splits")
    self.classes = sorted(d.name for d in epath.Path(root).iterdir()
                          if not d.name.startswith(".") and d.is_dir())
    if not self.classes:
      raise ConfigError(f"image folder {root!r} has no class sub-folders "
                        "(expected root/<class>/*.jpg)")
    self.items = [(rel, i) for i, c in enumerate(self.classes) for rel in _images_under(root, c)]
    if not self.items:
      raise ConfigError(f"image folder {root!r} has no images with extensions {IMAGE_EXTENSIONS}")
    self.root = root
    self.num_classes = len(self.classes)

  def __len__(self) -> int:
    return len(self.items)

  def key(self, index: int) -> str:
    """The record's path relative to the root."""
    return self.items[index][0]

  def __getitem__(self, index: int) -> dict:
    rel, label = self.items[index]
    return {"image_bytes": _read(os.path.join(self.root, rel)), "label": label, "key": rel}


def _images_under(root: str, folder: str) -> list[str]:
  """Image files under root/folder at any depth, relative to root, in sorted walk order (sorted
  paths on gs://, where there are no directories to walk)."""
  if is_url(root):
    skip = len(root.rstrip("/")) + 1
    found = (os.fspath(p)[skip:] for p in epath.Path(root, folder).glob("**/*"))
    return sorted(r for r in found if r.lower().endswith(IMAGE_EXTENSIONS)
                  and not any(part.startswith(".") for part in r.split("/")))
  out = []
  for dirpath, dirnames, filenames in os.walk(os.path.join(root, folder), followlinks=True):
    dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
    rel = os.path.relpath(dirpath, root)
    out.extend(os.path.join(rel, f) for f in sorted(filenames)
               if f.lower().endswith(IMAGE_EXTENSIONS))
  return out


DELIMITER_NAMES = {"tab": "\t", "\\t": "\t", "comma": ",", "semicolon": ";", "pipe": "|"}


def table_delimiter(path: str, header: str, delimiter: str | None = None) -> str:
  """`delimiter` (one character, or tab / comma / semicolon / pipe / '\\t'); unset: a tab for
  .tsv/.tab files, else what csv.Sniffer finds in the header line among , tab ; | (',' if none)."""
  if delimiter:
    delimiter = DELIMITER_NAMES.get(delimiter, delimiter)
    if len(delimiter) != 1:
      raise ConfigError(f"data.delimiter={delimiter!r}: give one character, or one of "
                        f"{', '.join(DELIMITER_NAMES)}")
    return delimiter
  if path.lower().endswith((".tsv", ".tab")):
    return "\t"
  try:
    return csv.Sniffer().sniff(header, delimiters=",\t;|").delimiter
  except csv.Error:  # one column, or nothing to tell them apart
    return ","


def read_table(path: str, delimiter: str | None = None) -> tuple[list[str], list[dict]]:
  """(column names, rows as dicts) of a CSV/TSV file, local or gs://; see `table_delimiter`."""
  try:
    text = epath.Path(path).read_bytes().decode("utf-8-sig")  # -sig: spreadsheets add a BOM
  except (OSError, UnicodeDecodeError) as e:
    raise ConfigError(f"cannot read table {path}: {getattr(e, 'strerror', None) or e}") from e
  delim = table_delimiter(path, text.partition("\n")[0], delimiter)
  reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delim)
  return list(reader.fieldnames or []), list(reader)


def require_columns(path: str, columns: list[str], wanted: Iterable[str], fix: str) -> None:
  """ConfigError naming the first of `wanted` that is not among `columns`, and `fix`."""
  for c in wanted:
    if c not in columns:
      raise ConfigError(f"{path} has no column {c!r} (columns: {columns}); {fix}")


class CaptionTable:
  """open_clip-style CSV/TSV: image-path and caption columns (paths relative to `root`).

  The delimiter is `delimiter` if set, a tab for .tsv/.tab files, else sniffed from the header
  line (`table_delimiter`). A row with an empty caption is unreadable (EmptyCaptionError), so it
  is skipped and counted like a missing image.
  """

  def __init__(self, path: str, *, image_column: str = "filepath", caption_column: str = "title",
               root: str | None = None, label_column: str | None = None,
               delimiter: str | None = None):
    path = os.path.expanduser(path)
    if not epath.Path(path).is_file():
      raise ConfigError(f"caption table {path!r} does not exist; check data.splits")
    cols, reader = read_table(path, delimiter)
    wanted = (image_column, caption_column, *([label_column] if label_column else []))
    require_columns(path, cols, wanted, "set data.image_column / data.caption_column / "
                    "data.label_column, or data.delimiter if the columns ran together")
    rows = [(r[image_column], r[caption_column], r[label_column] if label_column else None)
            for r in reader]
    self.labelled = bool(label_column)
    self.root = os.path.expanduser(root) if root else os.fspath(absolute(path).parent)
    self.paths = [p for p, _, _ in rows]
    self.captions = [c for _, c, _ in rows]
    self.labels = [l for _, _, l in rows] if label_column else None

  def __len__(self) -> int:
    return len(self.paths)

  def key(self, index: int) -> str:
    """The record's image path."""
    return self.paths[index]

  def __getitem__(self, index: int) -> dict:
    if not (self.captions[index] or "").strip():  # a short row reads as None
      raise EmptyCaptionError(f"empty caption for {self.paths[index]}")
    rec = {"image_bytes": _read(os.path.join(self.root, self.paths[index])),
           "text": self.captions[index], "key": self.paths[index]}
    if self.labels is not None:
      rec["label"] = int(self.labels[index])
    return rec


def member_key(name: str) -> tuple[str, str] | None:
  """(key, lowercased ext) of a webdataset member name cut at its basename's first dot, or None."""
  head, base = os.path.split(name)
  if "." not in base:
    return None
  stem, ext = base.split(".", 1)
  return os.path.join(head, stem), ext.lower()


class TarShards:
  """webdataset tar shards as written by img2dataset ({key}.jpg + {key}.txt), random access.

  The sample key is the member path up to the first dot of its file name. Each shard's member
  offsets are indexed (headers only) when the source is built and kept in memory; at LAION scale
  convert to ArrayRecord instead (`python -m sslvl_jax.data.convert`). Shards must be
  uncompressed tar: gzip has no random access.
  """

  def __init__(self, shards: str | list[str], *,
               image_exts: tuple[str, ...] = ("jpg", "jpeg", "png", "webp"),
               text_ext: str = "txt", label_ext: str = "cls"):
    self.shards = expand_paths(shards)
    self.image_exts, self.text_ext, self.label_ext = image_exts, text_ext, label_ext
    self.index: list[tuple[int, str, dict[str, tuple[int, int]]]] = []
    for si, shard in enumerate(self.shards):
      self.index.extend((si, key, members) for key, members in self._scan(shard))
    if not self.index:
      raise ConfigError(f"no samples with an image member in {shards!r}")
    self.labelled = any(label_ext in members for _, _, members in self.index)

  def _scan(self, shard: str) -> list[tuple[str, dict[str, tuple[int, int]]]]:
    with epath.Path(shard).open("rb") as f:
      if f.read(2) == b"\x1f\x8b":
        raise ConfigError(f"{shard} is gzip-compressed; random access needs plain .tar shards "
                          "(gunzip them, or convert with `python -m sslvl_jax.data.convert`)")
    groups: dict[str, dict[str, tuple[int, int]]] = {}
    try:
      with epath.Path(shard).open("rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
        for m in tar:
          parts = member_key(m.name) if m.isfile() else None
          if parts is None:
            continue
          key, ext = parts
          groups.setdefault(key, {})[ext] = (m.offset_data, m.size)
    except (tarfile.TarError, OSError) as e:  # a truncated shard keeps what was readable
      logging.warning("shard %s is damaged after %d samples: %s", shard, len(groups), e)
    return [(k, v) for k, v in groups.items() if any(e in v for e in self.image_exts)]

  def __len__(self) -> int:
    return len(self.index)

  def key(self, index: int) -> str:
    """shard-file-name:key of the record."""
    si, key, _ = self.index[index]
    return f"{os.path.basename(self.shards[si])}:{key}"

  def __getitem__(self, index: int) -> dict:
    si, _, members = self.index[index]
    with epath.Path(self.shards[si]).open("rb") as f:
      def member(ext):
        off, size = members[ext]
        f.seek(off)
        data = f.read(size)
        if len(data) != size:
          raise ValueError(f"member .{ext} truncated ({len(data)} of {size} bytes)")
        return data
      ext = next(e for e in self.image_exts if e in members)
      rec = {"image_bytes": member(ext), "key": self.key(index)}
      if self.text_ext in members:
        rec["text"] = member(self.text_ext).decode("utf-8").strip()
      if self.label_ext in members:
        rec["label"] = int(member(self.label_ext).decode().strip())
    return rec


def pack_record(rec: dict) -> bytes:
  """Serialise a record for ArrayRecord: 4-byte header length, JSON header, raw image bytes."""
  header = json.dumps({k: v for k, v in rec.items() if k not in ("image_bytes", "image")}).encode()
  return struct.pack("<I", len(header)) + header + rec["image_bytes"]


def unpack_record(blob: bytes) -> dict:
  """Inverse of `pack_record`."""
  (n,) = struct.unpack("<I", blob[:4])
  rec = json.loads(blob[4:4 + n].decode())
  rec["image_bytes"] = blob[4 + n:]
  return rec


class ArrayRecords:
  """ArrayRecord shards written by `python -m sslvl_jax.data.convert` (random access, fastest)."""

  def __init__(self, paths: str | list[str]):
    import grain  # pylint: disable=g-import-not-at-top
    self.paths = expand_paths(paths)
    self.source = grain.sources.ArrayRecordDataSource(self.paths)

  def __len__(self) -> int:
    return len(self.source)

  def key(self, index: int) -> str:
    """The record's original key."""
    return str(self[index].get("key", index))

  def __getitem__(self, index: int) -> dict:
    return unpack_record(self.source[index])


class Tfds:
  """A prepared TFDS dataset through `tfds.data_source` (ArrayRecord format), with split slicing.

  Nothing is downloaded: prepare the dataset first (`tfds build NAME --file_format=array_record`,
  ImageNet needs its manual download) and point `data_dir` at it. TFDS decodes the image.
  """

  def __init__(self, dataset: str, split: str, *, data_dir: str | None = None,
               image_key: str = "image", label_key: str | None = "label",
               text_key: str | None = None):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    try:
      self.source = tfds.data_source(dataset, split=split, data_dir=data_dir, download=False)
    except (NotImplementedError, AssertionError, ValueError, OSError) as e:
      reason = (str(e).splitlines() or [""])[0]
      raise ConfigError(
          f"TFDS dataset {dataset!r} split {split!r} is not readable from data_dir={data_dir!r}: "
          f"{type(e).__name__}: {reason}. Prepare it in ArrayRecord format "
          f"(`tfds build {dataset} --file_format=array_record --data_dir=DIR`) and set "
          "data.data_dir=DIR") from e
    self.name = f"{dataset}/{split}"
    self.image_key, self.label_key, self.text_key = image_key, label_key, text_key

  def __len__(self) -> int:
    return len(self.source)

  def key(self, index: int) -> str:
    """dataset/split:index."""
    return f"{self.name}:{index}"

  def __getitem__(self, index: int) -> dict:
    ex = self.source[index]
    rec = {"image": np.asarray(ex[self.image_key]), "key": self.key(index)}
    if self.label_key and self.label_key in ex:
      rec["label"] = int(ex[self.label_key])
    if self.text_key:
      t = ex[self.text_key]
      rec["text"] = t.decode("utf-8") if isinstance(t, bytes) else str(t)
    return rec

"""Convert an image folder, a CSV/TSV caption table or webdataset tar shards to ArrayRecord shards.

  python -m sslvl_jax.data.convert --source=csv --input=train.csv --output_dir=DIR --shards=64

Readable records are stored, in source order, as `sources.pack_record` bytes (original image
bytes, caption, label, key) in DIR/<prefix>.array_record-SSSSS-of-NNNNN, written with
`group_size:1` so that every record is randomly accessible. Records whose file is missing, whose
image does not decode or whose caption is empty are skipped and counted by reason. Train on the
output with `--config.data.name=arrayrecord --config.data.splits.train=DIR/train.array_record-*`.
"""

from __future__ import annotations

import collections
import concurrent.futures
import json
import logging
import multiprocessing
import os
from typing import Any, Sequence

import numpy as np
from absl import flags
from ml_collections import ConfigDict

from sslvl_jax import cli
from sslvl_jax import data
from sslvl_jax.data import host_ops, sources

CONVERTIBLE = ("csv", "webdataset", "image_folder")
SKIP_REASONS = ((FileNotFoundError, "missing_file"), (host_ops.BadImageError, "bad_image"),
                (sources.EmptyCaptionError, "empty_caption"))


def shard_paths(output_dir: str, prefix: str, shards: int) -> list[str]:
  """TFDS-style shard file names: DIR/<prefix>.array_record-00000-of-00008, ..."""
  return [os.path.join(output_dir, f"{prefix}.array_record-{i:05d}-of-{shards:05d}")
          for i in range(shards)]


def checked_record(source: Any, index: int, check_images: bool) -> dict:
  """Record `index` of `source`, raising if its image does not decode or its caption is empty."""
  rec = source[index]
  if "text" in rec and not rec["text"].strip():
    raise sources.EmptyCaptionError(f"empty caption for {rec.get('key')}")
  if check_images:
    host_ops.decode_image(rec["image_bytes"], rec.get("key", f"index {index}"))
  return rec


def skip_reason(error: Exception) -> str:
  """A short name for why a record was skipped."""
  return next((name for kind, name in SKIP_REASONS if isinstance(error, kind)), "unreadable")


def write_shard(source: Any, path: str, indices: Sequence[int],
                check_images: bool = True) -> tuple[int, dict[str, int]]:
  """Write the readable records among `indices` to one ArrayRecord file; (written, skip counts)."""
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  skipped: collections.Counter = collections.Counter()
  written = 0
  writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
  try:
    for i in indices:
      try:
        rec = checked_record(source, int(i), check_images)
      except Exception as e:  # pylint: disable=broad-except  # every unreadable record is skipped
        logging.warning("skipping %s: %s: %s", source.key(int(i)), type(e).__name__, e)
        skipped[skip_reason(e)] += 1
        continue
      writer.write(sources.pack_record(rec))
      written += 1
  finally:
    writer.close()
  return written, dict(skipped)


def convert(source: Any, output_dir: str, *, shards: int, prefix: str = "train", workers: int = 1,
            check_images: bool = True) -> dict[str, Any]:
  """Write `source` as ArrayRecord shards of contiguous index ranges; returns counts and paths."""
  shards = max(1, min(shards, len(source)))
  os.makedirs(output_dir, exist_ok=True)
  paths = shard_paths(output_dir, prefix, shards)
  ranges = np.array_split(np.arange(len(source)), shards)
  args = [(source, p, r.tolist(), check_images) for p, r in zip(paths, ranges)]
  if workers > 1:
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
      results = list(pool.map(write_shard, *zip(*args)))
  else:
    results = [write_shard(*a) for a in args]
  skipped: collections.Counter = collections.Counter()
  for _, s in results:
    skipped.update(s)
  return {"records": len(source), "written": sum(w for w, _ in results),
          "skipped": sum(skipped.values()), "skipped_by_reason": dict(skipped), "paths": paths}


def source_config(kind: str, location: str, **columns: Any) -> ConfigDict:
  """The data config naming `kind` at `location` (split 'input'), as a training config would."""
  return ConfigDict({"name": kind, "splits": {"input": location},
                     **{k: v for k, v in columns.items() if v is not None}})


FLAGS = flags.FLAGS


def define_flags() -> None:
  """The CLI flags (defined only when run as a program, so importing this module defines none)."""
  flags.DEFINE_enum("source", None, CONVERTIBLE, "Kind of the input data.")
  flags.DEFINE_string("input", None, "Image folder root, CSV/TSV path, or tar shard pattern "
                      "('/data/{00000..00099}.tar').")
  flags.DEFINE_string("output_dir", None, "Folder for the ArrayRecord shards.")
  flags.DEFINE_integer("shards", 1, "Number of output shards.")
  flags.DEFINE_string("prefix", "train", "Shard file name prefix (e.g. the split).")
  flags.DEFINE_integer("workers", 1, "Processes writing shards in parallel.")
  flags.DEFINE_bool("check_images", True, "Decode every image and skip those that fail.")
  flags.DEFINE_string("image_column", None, "CSV: image path column (default 'filepath').")
  flags.DEFINE_string("caption_column", None, "CSV: caption column (default 'title').")
  flags.DEFINE_string("label_column", None, "CSV: optional integer label column.")
  flags.DEFINE_string("image_root", None, "CSV: folder the image paths are relative to "
                      "(default: the CSV's folder).")
  flags.DEFINE_string("text_ext", None, "webdataset: caption member extension (default 'txt').")
  flags.mark_flags_as_required(["source", "input", "output_dir"])


def main(argv: Sequence[str]) -> None:
  """CLI entry: convert, then print the counts as JSON and the config override to use."""
  del argv
  cfg = source_config(FLAGS.source, FLAGS.input, image_column=FLAGS.image_column,
                      caption_column=FLAGS.caption_column, label_column=FLAGS.label_column,
                      image_root=FLAGS.image_root, text_ext=FLAGS.text_ext)
  result = convert(data.source(cfg, "input"), FLAGS.output_dir, shards=FLAGS.shards,
                   prefix=FLAGS.prefix, workers=FLAGS.workers, check_images=FLAGS.check_images)
  print(json.dumps({k: v for k, v in result.items() if k != "paths"}))
  n = len(result["paths"])
  pattern = os.path.join(FLAGS.output_dir, f"{FLAGS.prefix}.array_record-{{00000..{n - 1:05d}}}"
                         f"-of-{n:05d}")
  print(f"train with: --config.data.name=arrayrecord --config.data.splits.train='{pattern}'")


if __name__ == "__main__":
  define_flags()
  cli.run(main)

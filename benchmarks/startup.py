"""Start-up of the webdataset sources: indexed `sources.TarShards` vs `streaming` (no index).

  python benchmarks/startup.py --shards=10,1000

Writes tar shards of --samples_per_shard small PNG + caption + label samples into a temporary
folder (so they are in the page cache: the figures leave out cold reads, which make the index
scan slower still), then per (source, shard count), in a fresh process, times building the
training dataset and taking its first batch, and the peak RSS that adds over the imports. One
line per case.
"""

from __future__ import annotations

import io
import json
import os
import resource
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time

import numpy as np
from absl import app, flags
from PIL import Image

_SHARDS = flags.DEFINE_list("shards", ["10", "1000"], "shard counts to time")
_SAMPLES = flags.DEFINE_integer("samples_per_shard", 10, "samples in each shard")
_BATCH = flags.DEFINE_integer("batch", 8, "local batch size")
_CASE = flags.DEFINE_string("case", None, "internal: 'tar_shards|streaming,DIR,N' in a subprocess")

SIZE = 16
SOURCES = ("tar_shards", "streaming")


def write_shards(folder: str, shards: int, samples: int) -> None:
  """shard-00000.tar, ...: each `samples` x ({key}.png, {key}.txt, {key}.cls)."""
  rng = np.random.default_rng(0)
  buf = io.BytesIO()
  Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(buf, format="PNG")
  members = [(".png", buf.getvalue()), (".txt", b"a caption"), (".cls", b"1")]
  for s in range(shards):
    with tarfile.open(os.path.join(folder, f"shard-{s:05d}.tar"), "w") as tar:
      for i in range(samples):
        for ext, blob in members:
          info = tarfile.TarInfo(f"{s:05d}{i:05d}{ext}")
          info.size = len(blob)
          tar.addfile(info, io.BytesIO(blob))


def peak_rss_mib() -> float:
  """Peak resident memory of this process so far (Linux: ru_maxrss is in KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_case(source: str, folder: str, shards: int) -> dict:
  """Build + first batch of `source` over the folder's first `shards` shards; time and RSS."""
  from sslvl_jax import data  # pylint: disable=g-import-not-at-top
  from sslvl_jax.data import sources, streaming  # pylint: disable=g-import-not-at-top
  from ml_collections import ConfigDict  # pylint: disable=g-import-not-at-top
  cfg = ConfigDict({"image_size": SIZE, "eval_resize_ratio": 1.0})
  transform = data.example_transform(cfg, "image_label", train=True)
  pattern = os.path.join(folder, f"shard-{{00000..{shards - 1:05d}}}.tar")
  rss0, t0 = peak_rss_mib(), time.perf_counter()
  if source == "tar_shards":
    ds = data.make_dataset(sources.TarShards(pattern), transform, local_batch_size=_BATCH.value,
                           seed=0, train=True, process_index=0, process_count=1)
  else:
    ds = streaming.make_streaming_dataset(pattern, transform, local_batch_size=_BATCH.value,
                                          seed=0, train=True, process_index=0, process_count=1)
  batch = next(iter(ds))
  seconds = time.perf_counter() - t0
  assert batch["image"].shape[0] == _BATCH.value
  return {"source": source, "shards": shards, "samples": shards * _SAMPLES.value,
          "startup_s": round(seconds, 3), "peak_rss_delta_mib": round(peak_rss_mib() - rss0, 1)}


def main(argv: list[str]) -> None:
  del argv
  if _CASE.value:
    source, folder, shards = _CASE.value.split(",")
    print(json.dumps(run_case(source, folder, int(shards))))
    return
  os.environ.setdefault("JAX_PLATFORMS", "cpu")  # host-only work; no accelerator probing
  counts = [int(n) for n in _SHARDS.value]
  folder = tempfile.mkdtemp(prefix="startup-shards-")
  try:
    write_shards(folder, max(counts), _SAMPLES.value)
    for n in counts:
      for source in SOURCES:
        cmd = [sys.executable, __file__, f"--case={source},{folder},{n}",
               f"--samples_per_shard={_SAMPLES.value}", f"--batch={_BATCH.value}"]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        print(out.strip().splitlines()[-1], flush=True)
  finally:
    shutil.rmtree(folder)


if __name__ == "__main__":
  app.run(main)

"""Host input pipeline throughput: decode + crops per core, and the cores to feed a step rate.

  python benchmarks/host_pipeline.py --workers=0,1 --target_images_per_s=2926

Writes ~500 px synthetic JPEGs (smooth gradients + blobs + noise, quality 90, like natural photos
in size and decode cost) into a temporary ImageFolder and times the real data path
(data.source -> data.example_transform -> data.make_dataset) for three host transforms:
  crop224  'multi_view' with one 224 random-resized crop (scale 0.08-1), the SSL/CLIP train crop
  clip224  'multi_view' with crops='clip': one 224 crop of scale 0.9-1 (open_clip's train crop; the
           image side of 'image_text'), which lets the JPEG decode at 1/2 size (draft mode)
  eval224  'image_label': resize the short side to 256, centre-crop 224 (k-NN / linear eval)
  dino     'multi_view' with crops='dino': 2 x 224 (scale 0.4-1) + 10 x 96 (scale 0.05-0.4)
Per case it reports
  per_core_images_per_s  one thread running the transform over all images, images per CPU-second
                         of that thread (best of --repeats passes; little disturbed by other load
                         on the machine): what one grain worker process sustains on one core
  pipeline[w]            the grain pipeline with worker_count=w: images/s (wall clock) and
                         images per CPU-second over all its processes (overhead included)
  cores_needed           ceil(target_images_per_s / per_core_images_per_s)
Device-side photometric augmentations are not host work and are not timed here.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import tempfile
import time

import numpy as np
from absl import app, flags
from ml_collections import ConfigDict
from PIL import Image

from sslvl_jax import data

_WORKERS = flags.DEFINE_list("workers", ["0", "1"], "grain worker_count values to time")
_TARGET = flags.DEFINE_float("target_images_per_s", 2926.0,
                             "step throughput to feed (CLIP ViT-B/16 on one H200: 2926 img/s)")
_IMAGES = flags.DEFINE_integer("images", 200, "synthetic JPEGs to write")
_PX = flags.DEFINE_integer("image_px", 500, "long side of the synthetic JPEGs")
_BATCH = flags.DEFINE_integer("batch", 32, "local batch size of the pipeline")
_BATCHES = flags.DEFINE_integer("batches", 8, "timed pipeline batches")
_WARMUP = flags.DEFINE_integer("warmup_batches", 10, "untimed batches first: worker start-up and "
                               "the prefetch buffers (8 batches) filled meanwhile")
_REPEATS = flags.DEFINE_integer("repeats", 3, "single-thread passes over the images (best kept)")
_CASES = flags.DEFINE_list("cases", ["crop224", "clip224", "eval224", "dino"], "transforms to time")

CASES = {  # name -> (example transform, data config fields)
    "crop224": ("multi_view", {"crop_groups": ((224, (0.08, 1.0), 1),)}),
    "clip224": ("multi_view", {"crops": "clip"}),
    "eval224": ("image_label", {"eval_resize_ratio": 224 / 256}),
    "dino": ("multi_view", {"crops": "dino"}),
}


def synthetic_photo(rng: np.random.Generator, long_side: int) -> np.ndarray:
  """A uint8 RGB image with photo-like statistics: gradients, smooth blobs and sensor noise."""
  aspect = rng.uniform(3 / 4, 4 / 3)  # width / height
  if aspect < 1:
    h, w = long_side, int(long_side * aspect)
  else:
    h, w = int(long_side / aspect), long_side
  yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
  img = np.empty((h, w, 3), np.float32)
  for c in range(3):
    angle = rng.uniform(0, 2 * np.pi)
    img[..., c] = (np.cos(angle) * xx / w + np.sin(angle) * yy / h) * rng.uniform(60, 140)
  blobs = rng.uniform(0, 255, (rng.integers(4, 12), rng.integers(4, 12), 3)).astype(np.uint8)
  img += np.asarray(Image.fromarray(blobs).resize((w, h), Image.BICUBIC), np.float32) * 0.6
  img += rng.normal(0, 10, img.shape)
  return np.clip(img, 0, 255).astype(np.uint8)


def write_image_folder(root: str, n: int, long_side: int) -> float:
  """n JPEGs (quality 90) in two class folders; returns the mean file size in KB."""
  rng = np.random.default_rng(0)
  total = 0
  for i in range(n):
    d = os.path.join(root, f"class{i % 2}")
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, f"{i:04d}.jpg")
    Image.fromarray(synthetic_photo(rng, long_side)).save(path, quality=90)
    total += os.path.getsize(path)
  return total / n / 1024


def per_core_rate(source, transform, repeats: int) -> float:
  """Images per CPU-second of one thread applying `transform` to every record (best pass)."""
  rng = np.random.default_rng(0)
  transform(source[0], rng)  # warm caches and lazy imports
  best = math.inf
  for _ in range(repeats):
    start = time.thread_time()
    for i in range(len(source)):
      transform(source[i], rng)
    best = min(best, time.thread_time() - start)
  return len(source) / best


def cpu_seconds() -> float | None:
  """User + system CPU time of this process and its live children (None without psutil)."""
  try:
    import psutil  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  me = psutil.Process()
  total = 0.0
  for p in [me] + me.children(recursive=True):
    try:
      t = p.cpu_times()
      total += t.user + t.system
    except psutil.Error:
      pass
  return total


def pipeline_rate(source, transform, workers: int, batch: int, batches: int, warmup: int) -> dict:
  """Steady-state wall-clock images/s of the grain pipeline with `workers` processes, CPU use."""
  ds = data.make_dataset(source, transform, local_batch_size=batch, seed=0, train=True,
                         worker_count=workers, process_index=0, process_count=1)
  it = iter(ds)
  for _ in range(warmup):
    next(it)
  cpu0, t0 = cpu_seconds(), time.perf_counter()
  for _ in range(batches):
    next(it)
  wall, cpu1 = time.perf_counter() - t0, cpu_seconds()
  images = batch * batches
  out = {"images_per_s": round(images / wall, 1),
         "images_per_s_per_worker": round(images / wall / max(workers, 1), 1)}
  if cpu0 is not None:
    out["images_per_cpu_s"] = round(images / (cpu1 - cpu0), 1)
    out["cores_busy"] = round((cpu1 - cpu0) / wall, 2)
  it.close()
  return out


def main(argv):
  del argv
  root = tempfile.mkdtemp(prefix="host_pipeline_")
  try:
    kb = write_image_folder(root, _IMAGES.value, _PX.value)
    result = {"machine": {"cpu": platform.processor() or platform.machine(),
                          "cores": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2)},
              "images": _IMAGES.value, "image_px": _PX.value, "mean_jpeg_kb": round(kb, 1),
              "target_images_per_s": _TARGET.value, "cases": {}}
    for name in _CASES.value:
      example, fields = CASES[name]
      cfg = ConfigDict({"name": "image_folder", "splits": {"train": root}, "image_size": 224,
                        **fields})
      source = data.source(cfg, "train")
      transform = data.example_transform(cfg, example, train=True)
      per_core = per_core_rate(source, transform, _REPEATS.value)
      result["cases"][name] = {
          "per_core_images_per_s": round(per_core, 1),
          "pipeline": {w: pipeline_rate(source, transform, int(w), _BATCH.value, _BATCHES.value,
                                           _WARMUP.value)
                       for w in _WORKERS.value},
          "cores_needed": math.ceil(_TARGET.value / per_core)}
    result["machine"]["load_avg_1m_end"] = round(os.getloadavg()[0], 2)
    print(json.dumps(result, indent=2))
  finally:
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
  app.run(main)

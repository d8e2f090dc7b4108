"""Host transforms that turn a source record into a training example (registry by name).

Records carry either a decoded `image` (uint8 HWC) or encoded `image_bytes`; transforms decode
(JPEG draft mode where the target is much smaller), crop and resize on the host and leave the
photometric augmentations to the device (sslvl_jax/data/device_ops.py).
"""

from __future__ import annotations

import functools
import hashlib

import numpy as np

from sslvl_jax.data import host_ops
from sslvl_jax.data.tokenizer import Tokenizer, TokenizerSpec
from sslvl_jax.registry import Registry

EXAMPLES: Registry = Registry("example transform")


@functools.lru_cache(maxsize=8)
def tokenizer(spec: TokenizerSpec) -> Tokenizer:
  """One Tokenizer per spec per process (grain workers build their own)."""
  return Tokenizer(spec)


def record_image(record: dict, min_size: int | None = None) -> np.ndarray:
  """The record's RGB uint8 image, decoding `image_bytes` if needed (grayscale made RGB)."""
  if "image" in record:
    img = np.asarray(record["image"])
    if img.ndim == 2:
      img = img[..., None]
    if img.shape[-1] == 1:
      img = np.repeat(img, 3, axis=-1)
    return img[..., :3]
  return host_ops.decode_image(record["image_bytes"], record.get("key", "<unnamed>"),
                               min_size=min_size)


def draft_size(size: int, min_scale: float) -> int:
  """Smallest decode size that keeps a crop of area fraction `min_scale` at >= `size` pixels."""
  return int(round(size / min_scale ** 0.5))


def _with_label(out: dict, record: dict) -> dict:
  out["label"] = np.int32(record.get("label", -1))
  return out


@EXAMPLES.register("image_text")
def image_text(record: dict, rng: np.random.Generator, *, image_size: int,
               tokenizer_spec: TokenizerSpec, train: bool, train_crop_scale: tuple | None = None,
               eval_resize_ratio: float = 1.0, **_) -> dict:
  """CLIP-style example: image (random-resized crop when training with `train_crop_scale`, else
  resize + centre crop), tokenised caption, label (-1 if none)."""
  text = record.get("text", "")
  if not text.strip():
    raise ValueError(f"empty caption for record {record.get('key')}")
  crop = train and train_crop_scale
  img = record_image(record, min_size=draft_size(image_size, train_crop_scale[0]) if crop else
                     round(image_size / eval_resize_ratio))
  if crop:
    img = host_ops.random_resized_crop(img, host_ops.CropSpec(image_size, tuple(train_crop_scale),
                                                              flip=0.0), rng)
  else:
    img = host_ops.resize_center_crop(img, image_size, eval_resize_ratio)
  out = {"image": img, "tokens": tokenizer(tokenizer_spec).encode([text])[0]}
  return _with_label(out, record)


@EXAMPLES.register("image_label")
def image_label(record: dict, rng: np.random.Generator, *, image_size: int,
                eval_resize_ratio: float = 1.0, **_) -> dict:
  """Evaluation example: resized + centre-cropped uint8 image and its label (-1 if none)."""
  del rng
  img = host_ops.resize_center_crop(
      record_image(record, min_size=round(image_size / eval_resize_ratio)), image_size,
      eval_resize_ratio)
  return _with_label({"image": img}, record)


def crop_spec(crops: str | None, crop_groups: tuple | None) -> host_ops.MultiCropSpec:
  """A preset from host_ops.CROPS, or explicit groups ((size, (scale_lo, scale_hi), count), ...)."""
  if crop_groups:
    return host_ops.MultiCropSpec(tuple((host_ops.CropSpec(int(size), tuple(scale)), int(count))
                                        for size, scale, count in crop_groups))
  return host_ops.CROPS.get(crops)


@EXAMPLES.register("multi_view")
def multi_view(record: dict, rng: np.random.Generator, *, crops: str | None = None,
               crop_groups: tuple | None = None, **_) -> dict:
  """SSL example: random-resized crops grouped by size, `views0` (n0, s0, s0, 3), `views1`, ..."""
  spec = crop_spec(crops, crop_groups)
  img = record_image(record, min_size=max(draft_size(c.size, c.scale[0]) for c, _ in spec.groups))
  flat = host_ops.multi_crop(img, spec, rng)
  out, i = {}, 0
  for g, (_, count) in enumerate(spec.groups):
    out[f"views{g}"] = np.stack(flat[i:i + count])
    i += count
  return _with_label(out, record)


def is_labelled(key: str, fraction: float, seed: int = 0) -> bool:
  """Whether the record `key` is in the seeded labelled subset: a 64-bit hash of (seed, key)
  below `fraction` of its range, so the subset is fixed per key whatever the order, process or
  epoch, and holds a `fraction` of the records in expectation."""
  digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
  return int.from_bytes(digest, "little") < fraction * 2 ** 64


@EXAMPLES.register("labelled_views")
def labelled_views(record: dict, rng: np.random.Generator, *, labelled_fraction: float,
                   labelled_seed: int = 0, **kwargs) -> dict:
  """Semi-supervised example: the `multi_view` crops, label kept for the records of the
  `labelled_fraction` subset (`is_labelled` of the record's key) and -1 for the others."""
  out = multi_view(record, rng, **kwargs)
  if not is_labelled(str(record["key"]), labelled_fraction, labelled_seed):
    out["label"] = np.int32(-1)
  return out


@EXAMPLES.register("image_text_views")
def image_text_views(record: dict, rng: np.random.Generator, **kwargs) -> dict:
  """SLIP example: the CLIP example plus SSL crops of the same image (`views0`, ...)."""
  img = record_image(record)
  rec = {**record, "image": img}
  rec.pop("image_bytes", None)
  out = image_text(rec, rng, **kwargs)
  views = multi_view(rec, rng, **kwargs)
  return {**out, **{k: v for k, v in views.items() if k.startswith("views")}}

"""Host transforms that turn a source record into a training example (registry by name)."""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image

from sslvl_jax.data.tokenizer import Tokenizer, TokenizerSpec
from sslvl_jax.registry import Registry

EXAMPLES: Registry = Registry("example transform")


@functools.lru_cache(maxsize=8)
def tokenizer(spec: TokenizerSpec) -> Tokenizer:
  """One Tokenizer per spec per process (grain workers build their own)."""
  return Tokenizer(spec)


def resize_center_crop(image: np.ndarray, size: int, resize_ratio: float = 1.0) -> np.ndarray:
  """Resize the shorter side to size/resize_ratio (bicubic), then centre-crop size x size."""
  h, w = image.shape[:2]
  short = round(size / resize_ratio)
  if (h, w) == (size, size) and short == size:
    return image
  scale = short / min(h, w)
  nh, nw = max(short, round(h * scale)), max(short, round(w * scale))
  img = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BICUBIC))
  top, left = (nh - size) // 2, (nw - size) // 2
  return img[top:top + size, left:left + size]


@EXAMPLES.register("image_text")
def image_text(record: dict, rng: np.random.Generator, *, image_size: int,
               tokenizer_spec: TokenizerSpec, train: bool) -> dict:
  """CLIP-style example: resized/centre-cropped uint8 image, tokenised caption, label if any."""
  del rng, train  # the CLIP recipe trains on resize + centre crop, like eval
  out = {"image": resize_center_crop(record["image"], image_size),
         "tokens": tokenizer(tokenizer_spec).encode([record["text"]])[0]}
  if "label" in record:
    out["label"] = np.int32(record["label"])
  return out


@EXAMPLES.register("image_label")
def image_label(record: dict, rng: np.random.Generator, *, image_size: int, **_) -> dict:
  """Evaluation example: resized/centre-cropped uint8 image and its label."""
  del rng
  return {"image": resize_center_crop(record["image"], image_size),
          "label": np.int32(record.get("label", -1))}

"""Host-side image ops (numpy/PIL): decode, random-resized crops, flips, eval resize, multi-crop.

Everything random takes a `numpy.random.Generator` (or an int seed) and is deterministic given it.
Crops follow torchvision's RandomResizedCrop (area fraction ~ U(scale), log-uniform aspect ratio,
up to `attempts` tries, then a central-crop fallback); `fallback='clamp'` with `attempts=1` is
BYOL's variant (one try, crop sides clamped to the image). Photometric ops run on the device:
see sslvl_jax/data/device_ops.py.
"""

from __future__ import annotations

import dataclasses
import io
import math
from typing import Any

import numpy as np
from PIL import Image

from sslvl_jax.errors import ConfigError
from sslvl_jax.registry import Registry

INTERPOLATIONS: Registry = Registry("interpolation")
for _name, _mode in (("nearest", Image.NEAREST), ("bilinear", Image.BILINEAR),
                     ("bicubic", Image.BICUBIC), ("lanczos", Image.LANCZOS), ("box", Image.BOX)):
  INTERPOLATIONS.add(_name, _mode)

CROP_FALLBACKS = ("center", "clamp")
Box = tuple[int, int, int, int]  # (top, left, height, width)


class BadImageError(ValueError):
  """An image record that cannot be decoded (corrupt, truncated, not an image)."""

  def __init__(self, key: str, reason: str):
    super().__init__(key, reason)
    self.key, self.reason = key, reason

  def __str__(self) -> str:
    return f"cannot decode image {self.key!r}: {self.reason}"


def decode_image(data: bytes, key: str = "<unnamed>", *, min_size: int | None = None) -> np.ndarray:
  """Decode encoded image bytes to an RGB uint8 array (h, w, 3); any PIL mode is converted.

  With `min_size`, a JPEG is decoded in draft mode at the largest power-of-two reduction (up to
  1/8) that keeps both sides >= min_size, which is much faster when the target is far smaller.
  Raises BadImageError(key, reason) for corrupt or truncated data.
  """
  try:
    img = Image.open(io.BytesIO(data))
    if min_size is not None and img.format == "JPEG":
      img.draft("RGB", (min_size, min_size))
    img.load()
    if img.mode == "P" and "transparency" in img.info:
      img = img.convert("RGBA")  # PIL's advice for palette transparency; alpha dropped below
    return np.asarray(img.convert("RGB"))
  except Exception as e:  # pylint: disable=broad-except  # PIL raises many types on bad data
    raise BadImageError(key, f"{type(e).__name__}: {e}") from e


def sample_crop(height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float],
                rng: np.random.Generator, *, attempts: int = 10, fallback: str = "center") -> Box:
  """Sample a random-resized-crop box (top, left, h, w) with torchvision semantics.

  Each attempt draws area ~ U(scale) * height * width and aspect w/h log-uniform in `ratio`, and
  is kept if it fits. After `attempts` misses, 'center' takes torchvision's fallback (the largest
  central crop with aspect clamped to `ratio`); 'clamp' clamps the last draw's sides to the image
  and places it at random (BYOL).
  """
  area = height * width
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  h = w = 0
  for _ in range(attempts):
    target = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(log_lo, log_hi))
    w = int(round(math.sqrt(target * aspect)))
    h = int(round(math.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      return (int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w)
  if fallback == "clamp":
    h, w = min(max(h, 1), height), min(max(w, 1), width)
    return (int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w)
  in_ratio = width / height
  if in_ratio < ratio[0]:
    w, h = width, int(round(width / ratio[0]))
  elif in_ratio > ratio[1]:
    h, w = height, int(round(height * ratio[1]))
  else:
    h, w = height, width
  return ((height - h) // 2, (width - w) // 2, h, w)


def crop_resize(image: np.ndarray, box: Box, size: int,
                interpolation: str = "bicubic") -> np.ndarray:
  """Crop `box` (top, left, h, w) out of a uint8 image, then resize it to size x size (PIL)."""
  top, left, h, w = box
  crop = Image.fromarray(np.ascontiguousarray(image[top:top + h, left:left + w]))
  return np.asarray(crop.resize((size, size), INTERPOLATIONS.get(interpolation)))


def hflip(image: np.ndarray) -> np.ndarray:
  """Mirror an (h, w, c) image left-right (contiguous copy)."""
  return np.ascontiguousarray(image[:, ::-1])


def resize_center_crop(image: np.ndarray, size: int, resize_ratio: float = 224 / 256,
                       interpolation: str = "bicubic") -> np.ndarray:
  """Eval transform: resize the shorter side to round(size / resize_ratio), centre-crop size.

  torchvision Resize(int) + CenterCrop semantics (the longer side is truncated, the crop offset
  rounded). resize_ratio 0.875 is DINO's k-NN/linear eval (256 -> 224); 1.0 is CLIP's (224 ->
  224). Images smaller than the target are upscaled.
  """
  h, w = image.shape[:2]
  short = int(round(size / resize_ratio))
  if h <= w:
    nh, nw = short, int(short * w / h)
  else:
    nh, nw = int(short * h / w), short
  if (nh, nw) != (h, w):
    image = np.asarray(Image.fromarray(image).resize((nw, nh), INTERPOLATIONS.get(interpolation)))
  top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
  return image[top:top + size, left:left + size]


@dataclasses.dataclass(frozen=True)
class CropSpec:
  """One random-resized crop: output size, area fraction and aspect ranges, resampling, flip p."""

  size: int
  scale: tuple[float, float] = (0.08, 1.0)
  ratio: tuple[float, float] = (3 / 4, 4 / 3)
  interpolation: str = "bicubic"
  flip: float = 0.5
  attempts: int = 10
  fallback: str = "center"

  def __post_init__(self):
    INTERPOLATIONS.get(self.interpolation)
    if self.fallback not in CROP_FALLBACKS:
      raise ConfigError(f"crop fallback {self.fallback!r}; known: {', '.join(CROP_FALLBACKS)}")
    if not (0 < self.scale[0] <= self.scale[1] and 0 < self.ratio[0] <= self.ratio[1]):
      raise ConfigError(f"crop scale {self.scale} / ratio {self.ratio} must be increasing and > 0")


@dataclasses.dataclass(frozen=True)
class MultiCropSpec:
  """Groups of (CropSpec, count); crops come out group by group, in order."""

  groups: tuple[tuple[CropSpec, int], ...]

  def crops(self) -> tuple[CropSpec, ...]:
    """The flat list of crop specs, one per output crop."""
    return tuple(spec for spec, count in self.groups for _ in range(count))


def random_resized_crop(image: np.ndarray, spec: CropSpec,
                        rng: np.random.Generator | int) -> np.ndarray:
  """One random-resized crop (size, size, 3) of a uint8 image, flipped with p = spec.flip."""
  rng = np.random.default_rng(rng)
  box = sample_crop(image.shape[0], image.shape[1], spec.scale, spec.ratio, rng,
                    attempts=spec.attempts, fallback=spec.fallback)
  out = crop_resize(image, box, spec.size, spec.interpolation)
  return hflip(out) if rng.uniform() < spec.flip else out


def multi_crop(image: np.ndarray, spec: MultiCropSpec,
               rng: np.random.Generator | int) -> list[np.ndarray]:
  """All crops of `spec` from one uint8 image, each cropped and flipped independently."""
  rng = np.random.default_rng(rng)
  return [random_resized_crop(image, crop, rng) for crop in spec.crops()]


def two_views(size: int = 224, scale: tuple[float, float] = (0.08, 1.0),
              **kw: Any) -> MultiCropSpec:
  """Two identically distributed views (SimCLR, BYOL, MoCo, SimSiam)."""
  return MultiCropSpec(((CropSpec(size, scale, **kw), 2),))


def dino_multicrop(num_local: int = 10, global_scale: tuple[float, float] = (0.4, 1.0),
                   local_scale: tuple[float, float] = (0.05, 0.4), global_size: int = 224,
                   local_size: int = 96) -> MultiCropSpec:
  """DINO: 2 global crops + num_local local crops, bicubic (paper: 10 local; code default 8)."""
  return MultiCropSpec(((CropSpec(global_size, global_scale), 2),
                        (CropSpec(local_size, local_scale), num_local)))


# Host crop presets per method, as in the reference code; every view is also flipped (p=0.5)
# unless noted.
CROPS: Registry = Registry("crop preset")
CROPS.add("simclr", two_views(attempts=100))  # TF distorted_bounding_box_crop: 100 tries, bicubic
CROPS.add("byol", two_views(attempts=1, fallback="clamp"))  # one attempt, sides clamped, bicubic
CROPS.add("dino", dino_multicrop())
CROPS.add("mocov2", two_views(scale=(0.2, 1.0), interpolation="bilinear"))  # torchvision default
CROPS.add("simsiam", two_views(scale=(0.2, 1.0), interpolation="bilinear"))
CROPS.add("mocov3", two_views(interpolation="bilinear"))  # crop_min 0.08 (ViT)
CROPS.add("mocov3_r50", two_views(scale=(0.2, 1.0), interpolation="bilinear"))  # --crop-min=.2
CROPS.add("solo_cifar", two_views(size=32))  # solo-learn CIFAR: RRC (0.08, 1) at 32 px, bicubic
CROPS.add("clip", MultiCropSpec(((CropSpec(224, (0.9, 1.0), flip=0.0), 1),)))  # open_clip train

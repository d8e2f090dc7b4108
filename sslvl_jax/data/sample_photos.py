"""Built-in offline colour photos: scikit-learn's two sample images (china.jpg, flower.jpg).

The built-in digits are grayscale (no ab to predict), so colorization's CPU-scale recipe trains on
random crops of these two 427 x 640 photos and is evaluated on the digits. `data.num_examples`
records (default 1,500, one digits epoch), alternating the two photos, make an epoch.
"""

from __future__ import annotations

import functools

import numpy as np
from ml_collections import ConfigDict

from sslvl_jax.data import SOURCES


@functools.lru_cache(maxsize=None)
def _photos() -> tuple[np.ndarray, ...]:
  from sklearn.datasets import load_sample_images  # pylint: disable=g-import-not-at-top
  return tuple(np.asarray(img, np.uint8) for img in load_sample_images().images)


class SamplePhotos:
  """Random-access source of {'image', 'label', 'key'} records, label -1 (unlabelled)."""

  def __init__(self, num_examples: int = 1500):
    self.num_examples = num_examples

  def __len__(self) -> int:
    return self.num_examples

  def __getitem__(self, index: int) -> dict:
    photos = _photos()
    return {"image": photos[index % len(photos)], "label": -1, "key": f"sample_photos/{index}"}


@SOURCES.register("sample_photos")
def _sample_photos(cfg: ConfigDict, split: str) -> SamplePhotos:
  del split
  return SamplePhotos(cfg.get("num_examples") or 1500)

"""Built-in offline image-text data: scikit-learn's 1,797 handwritten digits with captions.

Nothing is downloaded: the images ship inside scikit-learn. Each 8x8 digit is upsampled to an RGB
image; captions come from training templates, and zero-shot evaluation on the held-out split uses
templates never seen in training.
"""

from __future__ import annotations

import functools
import os

import numpy as np

CLASSNAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TRAIN_TEMPLATES = (
    "a photo of the number {}.",
    "a handwritten {}.",
    "the digit {}.",
    "a picture of a {}.",
    "an image showing the number {}.",
    "a blurry scan of the digit {}.",
    "a small {} drawn by hand.",
    "the number {} in white on black.",
)
EVAL_TEMPLATES = (  # never used in training: zero-shot prompts
    "a drawing of the number {}.",
    "this is a {}.",
    "a {}, written by hand.",
    "a photo of a handwritten digit {}.",
)
NUM_TEST = 297
TOKENIZER_ASSET = os.path.join(os.path.dirname(__file__), "assets", "digits_sp.model")


@functools.lru_cache(maxsize=None)
def _digits() -> tuple[np.ndarray, np.ndarray]:
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  d = load_digits()
  perm = np.random.default_rng(0).permutation(len(d.target))
  return d.images[perm].astype(np.float32) / 16.0, d.target[perm].astype(np.int32)


def digits(split: str) -> tuple[np.ndarray, np.ndarray]:
  """(images (n, 8, 8) in [0, 1], labels) of the 'train' (1,500) or 'test' (297) split."""
  images, labels = _digits()
  if split == "train":
    return images[:-NUM_TEST], labels[:-NUM_TEST]
  if split == "test":
    return images[-NUM_TEST:], labels[-NUM_TEST:]
  raise ValueError(f"unknown split {split!r} for the built-in digits; use 'train' or 'test'")


def upsample(image: np.ndarray, size: int) -> np.ndarray:
  """Bilinear upsampling of one (8, 8) digit in [0, 1] to an RGB uint8 image (size, size, 3)."""
  src = np.linspace(0, image.shape[0] - 1, size)
  i0 = np.floor(src).astype(int)
  i1 = np.minimum(i0 + 1, image.shape[0] - 1)
  w = src - i0
  rows = image[i0] * (1 - w)[:, None] + image[i1] * w[:, None]
  out = rows[:, i0] * (1 - w)[None] + rows[:, i1] * w[None]
  return np.repeat((out * 255.0 + 0.5).astype(np.uint8)[..., None], 3, axis=-1)


def caption(label: int, index: int, templates: tuple[str, ...] = TRAIN_TEMPLATES) -> str:
  """Deterministic caption of example `index` with class `label` (cycles over the templates)."""
  return templates[index % len(templates)].format(CLASSNAMES[label])


def tokenizer_corpus() -> list[str]:
  """The texts the shipped tokenizer is trained on: every training caption."""
  return [t.format(c) for t in TRAIN_TEMPLATES for c in CLASSNAMES]


class DigitsSource:
  """Random-access source of {'image', 'text', 'label', 'key'} records for grain."""

  labelled, num_classes = True, len(CLASSNAMES)

  def __init__(self, split: str = "train", image_size: int = 32, captions: bool = True):
    self.images, self.labels = digits(split)
    self.image_size, self.captions, self.split = image_size, captions, split

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, index: int) -> dict:
    label = int(self.labels[index])
    rec = {"image": upsample(self.images[index], self.image_size), "label": label,
           "key": f"digits/{self.split}/{index}"}
    if self.captions:
      rec["text"] = caption(label, index)
    return rec

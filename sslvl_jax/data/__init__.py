"""Data: sources (registry), host example transforms, tokenizer, grain pipeline."""

from __future__ import annotations

import os
from typing import Any

from etils import epath
from ml_collections import ConfigDict

from sslvl_jax.data import builtin, sources
from sslvl_jax.errors import ConfigError
from sslvl_jax.data.examples import EXAMPLES
from sslvl_jax.data.pipeline import (GlobalBatches, Transform, make_dataset,
                                     resolve_worker_count)
from sslvl_jax.data.streaming import make_streaming_dataset
from sslvl_jax.data.tokenizer import TokenizerSpec
from sslvl_jax.registry import Registry

SOURCES: Registry = Registry("data source", package=__name__)


def split_location(cfg: ConfigDict, split: str) -> str:
  """`data.splits[split]`: a folder, file, shard pattern or TFDS split string."""
  splits = cfg.get("splits") or {}
  if split not in splits:
    raise ConfigError(f"data.splits has no {split!r} entry (has: {sorted(splits)}); set "
                      f"--config.data.splits.{split}=PATH")
  return splits[split]


@SOURCES.register("digits")
def _digits(cfg: ConfigDict, split: str) -> builtin.DigitsSource:
  return builtin.DigitsSource(split, image_size=cfg.image_size)


@SOURCES.register("image_folder")
def _image_folder(cfg: ConfigDict, split: str) -> sources.ImageFolder:
  return sources.ImageFolder(split_location(cfg, split))


@SOURCES.register("csv")
def _csv(cfg: ConfigDict, split: str) -> sources.CaptionTable:
  return sources.CaptionTable(split_location(cfg, split),
                              image_column=cfg.get("image_column", "filepath"),
                              caption_column=cfg.get("caption_column", "title"),
                              root=cfg.get("image_root"), label_column=cfg.get("label_column"),
                              delimiter=cfg.get("delimiter"))


@SOURCES.register("webdataset")
def _webdataset(cfg: ConfigDict, split: str) -> sources.TarShards:
  return sources.TarShards(split_location(cfg, split), text_ext=cfg.get("text_ext", "txt"))


@SOURCES.register("arrayrecord")
def _arrayrecord(cfg: ConfigDict, split: str) -> sources.ArrayRecords:
  return sources.ArrayRecords(split_location(cfg, split))


@SOURCES.register("tfds")
def _tfds(cfg: ConfigDict, split: str) -> sources.Tfds:
  tfds_split = (cfg.get("splits") or {}).get(split, split)
  return sources.Tfds(cfg.dataset, tfds_split, data_dir=cfg.get("data_dir"),
                      image_key=cfg.get("image_key", "image"), label_key=cfg.get("label_key", "label"),
                      text_key=cfg.get("text_key"))


def tokenizer_spec(cfg: ConfigDict) -> TokenizerSpec:
  """The tokenizer of a data config (`tokenizer`: a .model path or 'builtin:digits')."""
  path = cfg.tokenizer
  if path == "builtin:digits":
    path = builtin.TOKENIZER_ASSET
  return TokenizerSpec(os.path.expanduser(path), cfg.context_length, cfg.get("lowercase", True))


def source(cfg: ConfigDict, split: str) -> Any:
  """The random-access source named by `cfg.name` for `split`."""
  return SOURCES.get(cfg.name)(cfg, split)


EXAMPLE_OPTIONS = ("train_crop_scale", "eval_resize_ratio", "crops", "crop_groups",
                   "labelled_fraction", "labelled_seed")


def train_split(cfg: ConfigDict) -> tuple[Any, int]:
  """(what to read, number of examples) of the training split: a random-access source, or with
  `data.streaming` (webdataset) the shard pattern and `data.num_examples` (streams are not
  counted: nothing is opened at start)."""
  if not cfg.get("streaming"):
    train = source(cfg, "train")
    return train, len(train)
  if cfg.name != "webdataset":
    raise ConfigError(f"data.streaming=True reads webdataset shards; data.name is {cfg.name!r}")
  if not cfg.get("num_examples"):
    raise ConfigError("data.streaming=True needs data.num_examples (the number of training "
                      "examples), since the shards are not scanned")
  return split_location(cfg, "train"), cfg.num_examples


def train_dataset(cfg: ConfigDict, what: Any, transform: Transform, *, local_batch_size: int,
                  seed: int) -> Any:
  """The training stream of local batches over `what` (from train_split)."""
  options = dict(local_batch_size=local_batch_size, seed=seed, train=True,
                 worker_count=cfg.get("worker_count", 0))
  if not cfg.get("streaming"):
    return make_dataset(what, transform, **options)
  return make_streaming_dataset(what, transform, resampled=cfg.get("resampled", False),
                                shuffle_buffer=cfg.get("shuffle_buffer", 0),
                                open_fn=lambda path, mode: epath.Path(path).open(mode),
                                text_ext=cfg.get("text_ext", "txt"), **options)


def example_transform(cfg: ConfigDict, example: str, *, train: bool) -> Transform:
  """Bind the host transform `example` to the data config."""
  kwargs = {"image_size": cfg.image_size, "train": train}
  kwargs.update({k: cfg[k] for k in EXAMPLE_OPTIONS if cfg.get(k) is not None})
  if cfg.get("tokenizer") and example.startswith("image_text"):
    kwargs["tokenizer_spec"] = tokenizer_spec(cfg)
  return Transform(EXAMPLES.get(example), kwargs)


__all__ = ["SOURCES", "EXAMPLES", "GlobalBatches", "make_dataset", "make_streaming_dataset",
           "resolve_worker_count", "train_split", "train_dataset", "source", "example_transform",
           "tokenizer_spec"]

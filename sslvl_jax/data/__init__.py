"""Data: sources (registry), host example transforms, tokenizer, grain pipeline."""

from __future__ import annotations

import os
from typing import Any

from ml_collections import ConfigDict

from sslvl_jax.data import builtin
from sslvl_jax.data.examples import EXAMPLES
from sslvl_jax.data.pipeline import GlobalBatches, Transform, make_dataset
from sslvl_jax.data.tokenizer import TokenizerSpec
from sslvl_jax.registry import Registry

SOURCES: Registry = Registry("data source")


@SOURCES.register("digits")
def _digits(cfg: ConfigDict, split: str) -> builtin.DigitsSource:
  return builtin.DigitsSource(split, image_size=cfg.image_size)


def tokenizer_spec(cfg: ConfigDict) -> TokenizerSpec:
  """The tokenizer of a data config (`tokenizer`: a .model path or 'builtin:digits')."""
  path = cfg.tokenizer
  if path == "builtin:digits":
    path = builtin.TOKENIZER_ASSET
  return TokenizerSpec(os.path.expanduser(path), cfg.context_length, cfg.get("lowercase", True))


def source(cfg: ConfigDict, split: str) -> Any:
  """The random-access source named by `cfg.name` for `split`."""
  return SOURCES.get(cfg.name)(cfg, split)


def example_transform(cfg: ConfigDict, example: str, *, train: bool) -> Transform:
  """Bind the host transform `example` to the data config."""
  kwargs = {"image_size": cfg.image_size, "train": train}
  if cfg.get("tokenizer"):
    kwargs["tokenizer_spec"] = tokenizer_spec(cfg)
  return Transform(EXAMPLES.get(example), kwargs)


__all__ = ["SOURCES", "EXAMPLES", "GlobalBatches", "make_dataset", "source", "example_transform",
           "tokenizer_spec"]

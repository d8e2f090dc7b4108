"""Pretrained networks for distillation teachers and locked towers: one loader for every source.

A source is `kind:path`:
  export:DIR         our encoder export (python -m sslvl_jax.export, sslvl_jax.interop.save_encoder)
  checkpoint:WORKDIR a training run of ours: its latest checkpoint, with WORKDIR/config.json
  open_clip:FILE     an open_clip ViT CLIP checkpoint (.safetensors, or .pt/.bin with torch)
  openai:FILE        OpenAI's CLIP release (TorchScript .pt: loading it runs code from the file)
  dino:FILE          a DINO / timm / DeiT ViT backbone checkpoint
  init:MODEL         a randomly initialised model-registry architecture (tests, baselines)
All arrive as the same `Pretrained`: a checkpoint as `sslvl_jax.export` would export it (the run's
method chooses the network and its preprocessing), PyTorch files converted to our export format.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from typing import Any, Callable

import jax
import numpy as np
from flax import nnx
from ml_collections import ConfigDict

from sslvl_jax import interop
from sslvl_jax.errors import ConfigError
from sslvl_jax.interop.mapping import abstract_module, fill_module, flat_arrays
from sslvl_jax.registry import Registry


@dataclasses.dataclass(frozen=True)
class Pretrained:
  """A loaded network: how to rebuild it, its variables (host arrays), what input it expects.

  `preprocessing` is {'image_size', 'mean', 'std'} on the 0-1 scale, or None when the network
  takes the consumer's own input unchanged (`init:`); `tower` is 'image' or 'image_text'.
  """

  source: str
  model_config: dict
  arrays: dict[str, np.ndarray]
  preprocessing: dict | None
  tower: str

  def module(self) -> nnx.Module:
    """The network as an nnx.Module holding the loaded variables."""
    return fill_module(abstract_module(self.model_config), self.arrays,
                       what=self.source)

  def image_tower(self) -> tuple[dict, dict[str, np.ndarray]]:
    """({'name', 'kwargs'}, arrays) of the image encoder alone (a two-tower's `image`)."""
    if self.tower == "image":
      return self.model_config, self.arrays
    prefix = "image/"
    return (self.model_config["kwargs"]["image"],
            {k[len(prefix):]: v for k, v in self.arrays.items() if k.startswith(prefix)})


SOURCES: Registry[Callable[[str, ConfigDict, str], Pretrained]] = Registry("pretrained source")


def from_export(path: str, source: str) -> Pretrained:
  """A `Pretrained` of an export directory of ours."""
  config = interop.read_config(path)
  if config["tower"] == "text":
    raise ConfigError(f"{source}: a text encoder; an image or image-text export is needed")
  return Pretrained(source, config["model"], flat_arrays(interop.load_module(path)),
                    config["preprocessing"], config["tower"])


def _through_export(write: Callable[[str], Any], source: str) -> Pretrained:
  """Convert with `write(out_dir)` into a temporary export directory, then read it back."""
  with tempfile.TemporaryDirectory() as tmp:
    write(tmp)
    return from_export(tmp, source)


@SOURCES.register("export")
def _export(path: str, cfg: ConfigDict, source: str) -> Pretrained:
  if not os.path.isfile(os.path.join(path, interop.export.CONFIG_FILE)):
    raise ConfigError(f"{source}: no {interop.export.CONFIG_FILE} in {path}; export a run first "
                      "(python -m sslvl_jax.export) or use checkpoint:WORKDIR")
  return from_export(path, source)


@SOURCES.register("checkpoint")
def _checkpoint(path: str, cfg: ConfigDict, source: str) -> Pretrained:
  from sslvl_jax import train  # pylint: disable=g-import-not-at-top (train imports the methods)
  config_file = os.path.join(path, "config.json")
  if not os.path.isfile(config_file):
    raise ConfigError(f"{source}: no config.json in {path}; point it at a training run's workdir "
                      "(train it first) or use export:DIR")
  with open(config_file) as f:
    s = train.setup(ConfigDict(json.load(f)), path, step=cfg.get("step"))
  try:
    if int(s.state.step) == 0:
      raise ConfigError(f"{source}: no checkpoint in {path}; train it first")
    model_config, module, info = s.method.export_encoder(  # what `sslvl_jax.export` would write
        s.state.params, s.state.model_state, s.state.extras, role=cfg.get("role"))
  finally:
    s.batches.close()
    s.ckpt.close()
  return Pretrained(source, json.loads(json.dumps(model_config)), flat_arrays(module),
                    info["preprocessing"], info["tower"])


def _torch(kind: str, convert: Callable[..., Any], **kw: Any) -> Callable[..., Pretrained]:
  """A source reading a PyTorch checkpoint file and importing it with `convert`."""
  def load(path: str, cfg: ConfigDict, source: str) -> Pretrained:
    if not os.path.isfile(path):
      raise ConfigError(f"{source}: no file {path}; download the {kind} checkpoint there")
    sd = interop.load_torch_state_dict(path, key=cfg.get("key"), allow_jit=kind == "openai")
    return _through_export(lambda out: convert(sd, out, **kw), source)
  return load


SOURCES.add("open_clip", _torch("open_clip", interop.convert_clip, source="open_clip"))
SOURCES.add("openai", _torch("openai", interop.convert_clip, source="openai"))
SOURCES.add("dino", _torch("dino", interop.convert_dino))


@SOURCES.register("init")
def _init(name: str, cfg: ConfigDict, source: str) -> Pretrained:
  model_config = {"name": name, "kwargs": dict(cfg.get("kwargs", {}))}
  module = interop.build_module(model_config, nnx.Rngs(params=jax.random.key(cfg.get("seed", 0))))
  tower = "image_text" if name == "two_tower" else "image"
  return Pretrained(source, model_config, flat_arrays(module), None, tower)


def load(cfg: ConfigDict, setting: str) -> Pretrained:
  """The network `cfg.source` names (see the module docstring); `setting` names `cfg` in errors.

  cfg: source ('kind:path'), role ('teacher' / 'student' of a checkpoint; default the network its
  k-NN evaluator used), step (checkpoint step; default the latest), key (entry of a PyTorch
  checkpoint, e.g. 'teacher'), kwargs and seed (`init:` only).
  """
  source = cfg.get("source") or ""
  kind, sep, path = source.partition(":")
  if not sep or not path:
    raise ConfigError(f"{setting}.source={source!r}: set it to kind:path with kind one of "
                      f"{', '.join(SOURCES.names())} (e.g. export:/path/to/export)")
  if kind not in SOURCES:
    raise ConfigError(f"{setting}.source={source!r}: unknown kind {kind!r}; use one of "
                      f"{', '.join(SOURCES.names())}")
  return SOURCES.get(kind)(path, cfg, source)

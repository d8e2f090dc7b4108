"""One-call conversions: PyTorch checkpoint -> our encoder export, and our export -> PyTorch layout."""

from __future__ import annotations

import logging
import os
from typing import Any, Mapping

import numpy as np
import safetensors.numpy

from sslvl_jax import models
from sslvl_jax.interop import clip, timm
from sslvl_jax.interop.export import load_module, read_config, save_encoder
from sslvl_jax.interop.mapping import abstract_module, fill_module, flat_arrays
from sslvl_jax.interop.torch_io import save_safetensors

HEAD_FILE = "dino_head.safetensors"  # next to model.safetensors when the checkpoint has a head


def convert_clip(state_dict: Mapping[str, np.ndarray], out_dir: str, *, source: str | None = None,
                 mean: tuple[float, ...] = clip.MEAN, std: tuple[float, ...] = clip.STD,
                 **overrides: Any) -> models.TwoTower:
  """Import a ViT CLIP checkpoint ('openai' or 'open_clip' `source`, required) to `out_dir`."""
  cfg = clip.infer_clip_config(state_dict, source=source, **overrides)
  model = clip.clip_from_torch(state_dict, source=source, **overrides)
  extra = {
      "tower": "image_text", "role": "imported", "imported_from": source,
      "preprocessing": {"image_size": cfg["image_size"], "mean": list(mean), "std": list(std),
                        "resize": "shorter side to image_size, bicubic, centre crop",
                        "resize_ratio": 1.0},
      "tokenizer": {"type": "openai_bpe", "context_length": cfg["context_length"],
                    "lowercase": True, "pad_id": cfg["pad_id"], "bos_id": cfg["vocab_size"] - 2,
                    "eot_id": cfg["eot_id"], "pool": cfg["text_pool"],
                    "note": "tokenize with open_clip.get_tokenizer / OpenAI clip.tokenize"}}
  save_encoder(out_dir, model, clip.clip_model_config(cfg), extra)
  return model


def convert_dino(state_dict: Mapping[str, np.ndarray], out_dir: str, *,
                 mean: tuple[float, ...] = timm.IMAGENET_MEAN,
                 std: tuple[float, ...] = timm.IMAGENET_STD, **overrides: Any) -> models.ViT:
  """Import a DINO/timm ViT backbone as our image encoder export in `out_dir`, with its DINO head.

  A DINO head in the checkpoint (full training checkpoints) is saved too (see `load_dino_head`);
  its absence (the released backbone-only weights) is logged.
  """
  cfg = timm.infer_vit_config(state_dict, **overrides)
  model = timm.dino_vit_from_torch(state_dict, **overrides)
  extra = {"tower": "image", "role": "imported", "imported_from": "dino",
           "preprocessing": {"image_size": cfg["image_size"], "mean": list(mean), "std": list(std),
                             "resize": "shorter side to image_size / 0.875, bicubic, centre crop",
                             "resize_ratio": 0.875}}
  head = None
  if timm.HEAD_V in state_dict:
    head = timm.dino_head_from_torch(state_dict)
    extra["dino_head"] = {"weights": HEAD_FILE, "model": timm.dino_head_model_config(
        timm.infer_dino_head_config(state_dict))}
  else:
    logging.warning("no DINO head in the checkpoint (no %s): exported the backbone only",
                    timm.HEAD_V)
  save_encoder(out_dir, model, timm.vit_model_config(cfg), extra)
  if head is not None:
    save_safetensors(flat_arrays(head), os.path.join(out_dir, HEAD_FILE))
  return model


def load_dino_head(encoder_dir: str) -> models.DINOHead:
  """The DINO head `convert_dino` saved next to an imported backbone."""
  config = read_config(encoder_dir)
  if "dino_head" not in config:
    raise KeyError(f"{encoder_dir} has no DINO head: the checkpoint it came from had none")
  spec = config["dino_head"]
  arrays = safetensors.numpy.load_file(os.path.join(encoder_dir, spec["weights"]))
  return fill_module(abstract_module(spec["model"]), arrays, what=f"{encoder_dir}/{spec['weights']}")


def to_torch(module: Any) -> dict[str, np.ndarray]:
  """PyTorch state dict of our TwoTower (open_clip layout) or ViT (DINO/timm layout)."""
  if isinstance(module, models.TwoTower):
    return clip.clip_to_torch(module)
  if isinstance(module, models.ViT):
    return timm.vit_to_timm(module)
  raise TypeError(f"no PyTorch layout for {type(module).__name__}; export a TwoTower or a ViT")


def export_to_torch(encoder_dir: str, out_path: str) -> dict[str, np.ndarray]:
  """Write our encoder export as an open_clip / timm .safetensors state dict."""
  sd = to_torch(load_module(encoder_dir))
  save_safetensors(sd, out_path)
  return sd

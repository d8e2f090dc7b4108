"""One-call conversions: PyTorch checkpoint -> our encoder export, and our export -> PyTorch layout."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from sslvl_jax import models
from sslvl_jax.interop import clip, timm
from sslvl_jax.interop.export import load_module, save_encoder
from sslvl_jax.interop.torch_io import save_safetensors


def convert_clip(state_dict: Mapping[str, np.ndarray], out_dir: str, *, source: str = "openai",
                 mean: tuple[float, ...] = clip.MEAN, std: tuple[float, ...] = clip.STD,
                 **overrides: Any) -> models.TwoTower:
  """Import a ViT CLIP checkpoint and save it as our two-tower encoder export in `out_dir`."""
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
  """Import a DINO/timm ViT backbone and save it as our image encoder export in `out_dir`."""
  cfg = timm.infer_vit_config(state_dict, **overrides)
  model = timm.dino_vit_from_torch(state_dict, **overrides)
  extra = {"tower": "image", "role": "imported", "imported_from": "dino",
           "preprocessing": {"image_size": cfg["image_size"], "mean": list(mean), "std": list(std),
                             "resize": "shorter side to image_size / 0.875, bicubic, centre crop",
                             "resize_ratio": 0.875}}
  save_encoder(out_dir, model, timm.vit_model_config(cfg), extra)
  return model


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

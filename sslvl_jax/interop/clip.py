"""OpenAI CLIP / open_clip ViT checkpoints <-> our TwoTower(ViT, TextTransformer)."""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

from sslvl_jax import models
from sslvl_jax.data.device_ops import NORMALIZATIONS
from sslvl_jax.interop.mapping import (Rule, abstract_module, count_blocks, export_weights,
                                       import_weights, layer_norm, linear, with_overrides)

# OpenAI's weights (also inside open_clip's `*-quickgelu` models) use QuickGELU; open_clip's own
# configs (ViT-B-16, ViT-L-14, ...) use exact GELU. Neither is recorded in the weights, so every
# import names its source.
DEFAULT_ACT = {"openai": "quick_gelu", "open_clip": "gelu"}
SOURCES = "source='openai' (OpenAI's weights, QuickGELU) or source='open_clip' (open_clip's exact GELU)"
# OpenAI's image normalisation, also open_clip's default.
MEAN, STD = NORMALIZATIONS.get("clip")
# Scalars OpenAI's TorchScript archives keep next to the weights; not weights.
IGNORED_KEYS = ("input_resolution", "context_length", "vocab_size", "attn_mask")
LAYOUT = "OpenAI/open_clip CLIP"


def infer_clip_config(state_dict: Mapping[str, np.ndarray], *, source: str | None = None,
                      **overrides: Any) -> dict[str, Any]:
  """Architecture of a ViT CLIP checkpoint from its tensor shapes; `overrides` win.

  `source` is required: 'openai' or 'open_clip', it sets `act` (see DEFAULT_ACT; a wrong one is
  off by ~1e-2); pass act='quick_gelu' for open_clip `*-quickgelu` models. Heads are width // 64,
  right for OpenAI and most open_clip models; pass vision_heads=16 for open_clip ViT-H-14,
  ViT-g-14 and ViT-bigG-14.
  """
  if source not in DEFAULT_ACT:
    raise ValueError(f"CLIP import needs {SOURCES}; got source={source!r}")
  sd = state_dict
  if "visual.conv1.weight" not in sd:
    raise KeyError(f"not a ViT {LAYOUT} state dict (no visual.conv1.weight; ResNet towers and "
                   "timm/HF towers are not supported)")
  vision_width, _, patch, _ = sd["visual.conv1.weight"].shape
  grid = math.isqrt(sd["visual.positional_embedding"].shape[0] - 1)
  context_length, text_width = sd["positional_embedding"].shape
  vocab_size = sd["token_embedding.weight"].shape[0]
  cfg = dict(
      image_size=grid * patch, patch_size=patch, vision_width=vision_width,
      vision_layers=count_blocks(sd, "visual.transformer.resblocks."), vision_heads=vision_width // 64,
      vision_mlp_dim=sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
      context_length=context_length, vocab_size=vocab_size, text_width=text_width,
      text_layers=count_blocks(sd, "transformer.resblocks."), text_heads=text_width // 64,
      text_mlp_dim=sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
      embed_dim=sd["visual.proj"].shape[1], act=DEFAULT_ACT[source], ln_eps=1e-5,
      text_pool="argmax", eot_id=vocab_size - 1, pad_id=0,  # OpenAI BPE: EOT is the largest id
      attention_impl=None, dtype="float32", param_dtype="float32")
  return with_overrides(cfg, overrides, "CLIP")


def clip_model_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
  """Our architecture config (for `build_module` / `save_encoder`) of an inferred CLIP config."""
  common = dict(act=cfg["act"], ln_eps=cfg["ln_eps"], attention_impl=cfg["attention_impl"],
                dtype=cfg["dtype"], param_dtype=cfg["param_dtype"])
  image = dict(image_size=cfg["image_size"], patch_size=cfg["patch_size"], width=cfg["vision_width"],
               depth=cfg["vision_layers"], num_heads=cfg["vision_heads"],
               mlp_dim=cfg["vision_mlp_dim"], pool="cls", pre_norm=True, patch_bias=False, **common)
  text = dict(vocab_size=cfg["vocab_size"], context_length=cfg["context_length"],
              width=cfg["text_width"], depth=cfg["text_layers"], num_heads=cfg["text_heads"],
              mlp_dim=cfg["text_mlp_dim"], causal=True, pool=cfg["text_pool"], eot_id=cfg["eot_id"],
              pad_id=cfg["pad_id"], **common)
  return {"name": "two_tower", "kwargs": {
      "image": {"name": "vit", "kwargs": image}, "text": {"name": "text_transformer", "kwargs": text},
      "embed_dim": cfg["embed_dim"], "logit_scale_init": math.log(1 / 0.07)}}


def _block_rules(ours: str, theirs: str) -> list[Rule]:
  return [*layer_norm(f"{ours}/ln1", f"{theirs}.ln_1"),
          Rule(f"{ours}/attn/qkv/kernel", f"{theirs}.attn.in_proj_weight", "linear"),
          Rule(f"{ours}/attn/qkv/bias", f"{theirs}.attn.in_proj_bias"),
          *linear(f"{ours}/attn/out", f"{theirs}.attn.out_proj"),
          *layer_norm(f"{ours}/ln2", f"{theirs}.ln_2"),
          *linear(f"{ours}/mlp/fc1", f"{theirs}.mlp.c_fc"),
          *linear(f"{ours}/mlp/fc2", f"{theirs}.mlp.c_proj")]


def clip_rules(vision_layers: int, text_layers: int) -> list[Rule]:
  """Our TwoTower paths <-> open_clip state-dict keys (PyTorch MHA's fused in_proj is q, k, v)."""
  rules = [Rule("image/patch_embed/kernel", "visual.conv1.weight", "conv"),
           Rule("image/cls_token", "visual.class_embedding", "token"),
           Rule("image/pos_embed", "visual.positional_embedding", "pos"),
           *layer_norm("image/ln_pre", "visual.ln_pre"),
           *layer_norm("image/norm", "visual.ln_post"),
           Rule("image_proj/kernel", "visual.proj"),
           Rule("text/token_embed/embedding", "token_embedding.weight"),
           Rule("text/pos_embed", "positional_embedding"),
           *layer_norm("text/norm", "ln_final"),
           Rule("text_proj/kernel", "text_projection"),
           Rule("logit_scale", "logit_scale")]
  for i in range(vision_layers):
    rules += _block_rules(f"image/blocks/{i}", f"visual.transformer.resblocks.{i}")
  for i in range(text_layers):
    rules += _block_rules(f"text/blocks/{i}", f"transformer.resblocks.{i}")
  return rules


def clip_from_torch(state_dict: Mapping[str, np.ndarray], *, source: str | None = None,
                    **overrides: Any) -> models.TwoTower:
  """Our TwoTower holding an OpenAI / open_clip ViT CLIP checkpoint; `source` required.

  See `infer_clip_config`. Images are NHWC. `encode_image` / `encode_text` return L2-normalised
  embeddings (open_clip's `normalize=True`); open_clip's default unnormalised `encode_image(x)` is
  `model.image_proj(model.image(x)['pooled'])` (text: `text_proj`, `text`), or
  `load_encoder(..., normalize=False)` on an export.
  """
  cfg = infer_clip_config(state_dict, source=source, **overrides)
  abstract = abstract_module(clip_model_config(cfg))
  return import_weights(abstract, state_dict, clip_rules(cfg["vision_layers"], cfg["text_layers"]),
                        ignore=IGNORED_KEYS, layout=LAYOUT)


def clip_to_torch(model: models.TwoTower) -> dict[str, np.ndarray]:
  """open_clip state dict of our TwoTower (pre-norm ViT without patch bias + causal text tower)."""
  return export_weights(model, clip_rules(len(model.image.blocks), len(model.text.blocks)),
                        layout=LAYOUT)

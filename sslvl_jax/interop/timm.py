"""DINO / timm VisionTransformer checkpoints <-> our ViT."""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

from sslvl_jax import models
from sslvl_jax.data.device_ops import NORMALIZATIONS
from sslvl_jax.interop.mapping import (Rule, abstract_module, count_blocks, export_weights,
                                       import_weights, layer_norm, linear)

IMAGENET_MEAN, IMAGENET_STD = NORMALIZATIONS.get("imagenet")
# DINO's projection head (full checkpoints) and timm's classifier: not part of the backbone.
IGNORED_PREFIXES = ("head.",)
LAYOUT = "DINO/timm ViT"


def infer_vit_config(state_dict: Mapping[str, np.ndarray], **overrides: Any) -> dict[str, Any]:
  """Our ViT kwargs for a DINO/timm ViT checkpoint from its tensor shapes; `overrides` win.

  Heads are width // 64 (DINO ViT-S/16: 6, ViT-B/16: 12); LayerNorm eps 1e-6, exact GELU, class
  token pooling, as in DINO and timm.
  """
  sd = state_dict
  if "patch_embed.proj.weight" not in sd:
    raise KeyError(f"not a {LAYOUT} state dict (no patch_embed.proj.weight)")
  width, _, patch, _ = sd["patch_embed.proj.weight"].shape
  grid = math.isqrt(sd["pos_embed"].shape[1] - 1)
  cfg = dict(image_size=grid * patch, patch_size=patch, width=width,
             depth=count_blocks(sd, "blocks."), num_heads=width // 64,
             mlp_dim=sd["blocks.0.mlp.fc1.weight"].shape[0], pool="cls",
             pre_norm="norm_pre.weight" in sd, patch_bias="patch_embed.proj.bias" in sd,
             qkv_bias="blocks.0.attn.qkv.bias" in sd, ln_eps=1e-6, act="gelu",
             attention_impl=None, dtype="float32", param_dtype="float32")
  unknown = sorted(set(overrides) - set(cfg))
  if unknown:
    raise ValueError(f"unknown ViT config keys {unknown}; known: {sorted(cfg)}")
  cfg.update(overrides)
  return {k: int(v) if isinstance(v, np.integer) else v for k, v in cfg.items()}


def timm_rules(depth: int, *, pre_norm: bool, patch_bias: bool, qkv_bias: bool) -> list[Rule]:
  """Our ViT paths <-> DINO/timm state-dict keys (timm's qkv output is laid out (3, heads, dim) too)."""
  rules = [Rule("patch_embed/kernel", "patch_embed.proj.weight", "conv"),
           Rule("cls_token", "cls_token"), Rule("pos_embed", "pos_embed"),
           *layer_norm("norm", "norm")]
  if patch_bias:
    rules.append(Rule("patch_embed/bias", "patch_embed.proj.bias"))
  if pre_norm:
    rules += layer_norm("ln_pre", "norm_pre")
  for i in range(depth):
    o, t = f"blocks/{i}", f"blocks.{i}"
    rules += [*layer_norm(f"{o}/ln1", f"{t}.norm1"),
              *linear(f"{o}/attn/qkv", f"{t}.attn.qkv", bias=qkv_bias),
              *linear(f"{o}/attn/out", f"{t}.attn.proj"), *layer_norm(f"{o}/ln2", f"{t}.norm2"),
              *linear(f"{o}/mlp/fc1", f"{t}.mlp.fc1"), *linear(f"{o}/mlp/fc2", f"{t}.mlp.fc2")]
  return rules


def vit_model_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
  """Our architecture config (for `build_module` / `save_encoder`) of an inferred ViT config."""
  return {"name": "vit", "kwargs": dict(cfg)}


def dino_vit_from_torch(state_dict: Mapping[str, np.ndarray], **overrides: Any) -> models.ViT:
  """Our ViT holding a DINO (or timm, DeiT) ViT backbone; head tensors are ignored."""
  cfg = infer_vit_config(state_dict, **overrides)
  rules = timm_rules(cfg["depth"], pre_norm=cfg["pre_norm"], patch_bias=cfg["patch_bias"],
                     qkv_bias=cfg["qkv_bias"])
  return import_weights(abstract_module(vit_model_config(cfg)), state_dict, rules,
                        ignore=IGNORED_PREFIXES, layout=LAYOUT)


def vit_to_timm(model: models.ViT) -> dict[str, np.ndarray]:
  """DINO/timm state dict of our ViT (learned or fixed position embeddings; no register tokens)."""
  rules = timm_rules(len(model.blocks), pre_norm=model.ln_pre is not None,
                     patch_bias=model.patch_embed.bias is not None,
                     qkv_bias=model.blocks[0].attn.qkv.bias is not None)
  return export_weights(model, rules, layout=LAYOUT)

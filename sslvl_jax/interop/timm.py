"""DINO / timm VisionTransformer checkpoints <-> our ViT, and DINO's projection head."""

from __future__ import annotations

import logging
import math
from typing import Any, Mapping

import numpy as np

from sslvl_jax import models
from sslvl_jax.data.device_ops import NORMALIZATIONS
from sslvl_jax.interop.mapping import (Rule, abstract_module, count_blocks, export_weights,
                                       import_weights, layer_norm, linear, with_overrides)

IMAGENET_MEAN, IMAGENET_STD = NORMALIZATIONS.get("imagenet")
# DINO's projection head (full checkpoints) and timm's classifier: not part of the backbone.
IGNORED_PREFIXES = ("head.",)
LAYOUT, HEAD_LAYOUT = "DINO/timm ViT", "DINO head"
HEAD_V, HEAD_G = "head.last_layer.weight_v", "head.last_layer.weight_g"  # torch weight_norm


def infer_vit_config(state_dict: Mapping[str, np.ndarray], **overrides: Any) -> dict[str, Any]:
  """Our ViT kwargs for a DINO/timm ViT checkpoint from its tensor shapes; `overrides` win.

  Heads are width // 64 (DINO ViT-S/16: 6, ViT-B/16: 12); LayerNorm eps 1e-6, exact GELU, class
  token pooling, as in DINO and timm. Position embeddings follow other resolutions by DINO's
  interpolation (pos_interp='dino'), so 96 px local crops give DINO's own features.
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
             qkv_bias="blocks.0.attn.qkv.bias" in sd, ln_eps=1e-6, act="gelu", pos_interp="dino",
             attention_impl=None, dtype="float32", param_dtype="float32")
  return with_overrides(cfg, overrides, "ViT")


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
  """Our ViT holding a DINO (or timm, DeiT) ViT backbone; head.* tensors are logged, not imported.

  A DINO head in the state dict (full training checkpoints) is imported by `dino_head_from_torch`.
  """
  cfg = infer_vit_config(state_dict, **overrides)
  head = sorted(k for k in state_dict if k.startswith(IGNORED_PREFIXES))
  if head:
    logging.info("%s import: %d head tensors (%s ...) are not part of the backbone%s", LAYOUT,
                 len(head), ", ".join(head[:3]),
                 "; import the DINO head with dino_head_from_torch" if HEAD_V in state_dict else "")
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


def infer_dino_head_config(state_dict: Mapping[str, np.ndarray], **overrides: Any
                           ) -> dict[str, Any]:
  """DINOHead kwargs of the head.* tensors of a DINO training checkpoint; `overrides` win.

  norm_last_layer (the weight-norm gain g frozen at 1) is read off g: True when every g is 1.
  """
  sd = state_dict
  if HEAD_V not in sd or HEAD_G not in sd:
    present = sorted(k for k in sd if k.startswith("head."))
    raise KeyError(f"no DINO head in the state dict: {HEAD_V} / {HEAD_G} missing (head tensors "
                   f"present: {present[:4]}); DINO's released backbone-only weights have none, its "
                   "full training checkpoints ('teacher'/'student' entries) do")
  if "head.mlp.weight" in sd:  # nlayers=1: a single Linear, not a Sequential
    linears, use_bn = ["head.mlp"], False
  else:
    ids = sorted(int(k.split(".")[2]) for k in sd
                 if k.startswith("head.mlp.") and k.endswith(".weight"))
    linears = [f"head.mlp.{i}" for i in ids if np.ndim(sd[f"head.mlp.{i}.weight"]) == 2]
    use_bn = len(ids) > len(linears)
  if not linears:
    raise KeyError(f"DINO head without its MLP: no head.mlp.N.weight next to {HEAD_V}")
  v = sd[HEAD_V]
  cfg = dict(in_dim=sd[f"{linears[0]}.weight"].shape[1], out_dim=v.shape[0],
             hidden=sd[f"{linears[0]}.weight"].shape[0], bottleneck=v.shape[1],
             nlayers=len(linears), use_bn=use_bn,
             norm_last_layer=bool(np.all(np.asarray(sd[HEAD_G]) == 1)),
             dtype="float32", param_dtype="float32")
  unknown = sorted(set(overrides) - set(cfg))
  if unknown:
    raise ValueError(f"unknown DINO head config keys {unknown}; known: {sorted(cfg)}")
  cfg.update(overrides)
  return {k: int(v) if isinstance(v, np.integer) else v for k, v in cfg.items()}


def dino_head_rules(nlayers: int, use_bn: bool) -> list[Rule]:
  """Our DINOHead paths <-> DINO's head.* keys (nn.Sequential of Linear[, BatchNorm1d], GELU)."""
  stride = 3 if use_bn else 2  # Sequential indices: Linear, [BN,] GELU, Linear, ...
  theirs = ["head.mlp"] if nlayers == 1 else [f"head.mlp.{i * stride}" for i in range(nlayers)]
  rules = [Rule("last_layer/v", HEAD_V, "linear"), Rule("last_layer/g", HEAD_G, "gain")]
  for i, name in enumerate(theirs):
    rules += linear(f"mlp/layers/{i}", name)
    if use_bn and i < nlayers - 1:
      bn = f"head.mlp.{i * stride + 1}"
      rules += [*layer_norm(f"mlp/hidden_norms/{i}", bn),  # BN's affine: LayerNorm's names
                Rule(f"mlp/hidden_norms/{i}/mean", f"{bn}.running_mean"),
                Rule(f"mlp/hidden_norms/{i}/var", f"{bn}.running_var")]
  return rules


def dino_head_model_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
  """Our architecture config (for `build_module`) of an inferred DINO head config."""
  return {"name": "dino_head", "kwargs": dict(cfg)}


def dino_head_from_torch(state_dict: Mapping[str, np.ndarray], **overrides: Any) -> models.DINOHead:
  """Our DINOHead holding the head.* tensors of a DINO checkpoint (KeyError naming them if absent)."""
  cfg = infer_dino_head_config(state_dict, **overrides)
  head = {k: v for k, v in state_dict.items()
          if k.startswith("head.") and not k.endswith(".num_batches_tracked")}  # a BN step counter
  return import_weights(abstract_module(dino_head_model_config(cfg)), head,
                        dino_head_rules(cfg["nlayers"], cfg["use_bn"]), layout=HEAD_LAYOUT)

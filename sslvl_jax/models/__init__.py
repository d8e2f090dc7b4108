"""Model registry: config names (`vit_b16`, `text_b`, ...) -> Flax NNX modules."""

from __future__ import annotations

import functools
from typing import Any

import jax.numpy as jnp
from flax import nnx

from sslvl_jax.models.heads import HEADS, DINOHead, MLPHead
from sslvl_jax.models.resnet import RESNET_STAGES, ResNet
from sslvl_jax.models.text import TextTransformer
from sslvl_jax.losses import l2_normalize
from sslvl_jax.models.two_tower import TwoTower
from sslvl_jax.models.vit import ViT
from sslvl_jax.errors import ConfigError
from sslvl_jax.registry import Registry

MODELS: Registry = Registry("model", package=__name__)

_VIT_SIZES = {  # width, depth, heads
    "tiny": (192, 12, 3), "s": (384, 12, 6), "b": (768, 12, 12), "l": (1024, 24, 16),
}
for _size, (_w, _d, _h) in _VIT_SIZES.items():
  for _patch in (8, 14, 16, 32):
    MODELS.add(f"vit_{_size}{_patch}", functools.partial(ViT, width=_w, depth=_d, num_heads=_h,
                                                         patch_size=_patch))
# A few-layer ViT for CPU smoke runs and tests; set image_size/patch_size in the config.
MODELS.add("vit_micro", functools.partial(ViT, width=64, depth=2, num_heads=2, mlp_dim=128,
                                          image_size=32, patch_size=8))

_TEXT_SIZES = {"micro": (64, 2, 2), "s": (384, 12, 6), "b": (512, 12, 8), "l": (768, 12, 12)}
for _size, (_w, _d, _h) in _TEXT_SIZES.items():
  MODELS.add(f"text_{_size}", functools.partial(TextTransformer, width=_w, depth=_d, num_heads=_h))

for _depth in RESNET_STAGES:  # resnet18, resnet34, resnet50, resnet101, resnet152
  MODELS.add(f"resnet{_depth}", functools.partial(ResNet, depth=_depth))


def build(name: str, *, rngs: nnx.Rngs, **kwargs: Any) -> nnx.Module:
  """Instantiate the registered model `name` with config overrides `kwargs`."""
  factory = MODELS.get(name)
  try:
    return factory(rngs=rngs, **kwargs)
  except TypeError as e:
    raise ConfigError(f"bad arguments for model {name!r}: {e}") from e


def width_of(module: nnx.Module) -> int:
  """Feature width of an encoder's pooled output."""
  for attr in ("width", "num_features"):
    if hasattr(module, attr):
      return int(getattr(module, attr))
  return int(module.norm.num_features)


def dtype_of(name: str) -> Any:
  """'float32' / 'bfloat16' config strings -> jnp dtypes."""
  try:
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[name]
  except KeyError:
    raise ConfigError(f"unknown dtype {name!r}; use float32, bfloat16 or float16") from None


__all__ = ["MODELS", "build", "width_of", "dtype_of", "ViT", "TextTransformer", "TwoTower",
           "l2_normalize", "ResNet", "HEADS", "MLPHead", "DINOHead"]

"""DINO ViT-B/16 (norm_last_layer=True, "more stable" for ViT-B per the reference); see dino_vits16.py."""

from ml_collections import ConfigDict

from configs.dino_vits16 import dino_config


def get_config(arg: str | None = None) -> ConfigDict:
  return dino_config("vit_b16", arg)

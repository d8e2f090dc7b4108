"""DINO ViT-B/16 (norm_last_layer=True, "more stable" for ViT-B per the reference); see dino_vits16.py."""

from ml_collections import ConfigDict

from configs import common
from configs.dino_vits16 import VARIANTS, dino_config


def get_config(arg: str | None = None) -> ConfigDict:
  arg = common.parse_arg(arg, variant="")
  common.check_variant(__file__, arg.variant, VARIANTS)
  return dino_config("vit_b16", arg.variant)

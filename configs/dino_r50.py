"""DINO ResNet-50 (batch 4080, SGD lr 0.03, wd 1e-4, global crops 0.14-1, local 0.05-0.14, as the
README suggests for ResNet-50); see dino_vits16.py."""

from ml_collections import ConfigDict

from configs import common
from configs.dino_vits16 import VARIANTS, dino_config


def get_config(arg: str | None = None) -> ConfigDict:
  arg = common.parse_arg(arg, variant="")
  common.check_variant(__file__, arg.variant, VARIANTS)
  return dino_config("resnet50", arg.variant)

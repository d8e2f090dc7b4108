"""config_check.validate and the recipes' variants: bad input gets one line before any building."""

import importlib
import os
from typing import Any

import pytest
from absl import flags
from ml_collections import ConfigDict

from sslvl_jax import config_check
from sslvl_jax.errors import ConfigError
from tests.test_config_args import CONFIGS, parse_cli

RECIPES = sorted(f[:-3] for f in os.listdir(CONFIGS)
                 if f.endswith(".py") and f not in ("__init__.py", "common.py"))
LOOP_FIELDS = ("stop_at_step", "keep_checkpoints", "num_devices", "nonfinite",
               "max_consecutive_skips")
DINO_SMOKE_BAD_CROPS = ((32, (0.4, 1.0), 2), (12, (0.1, 0.4), 4))
PATCH_8 = "must be a multiple of the patch size 8 of model.image (vit_micro), got"

CASES = [  # (config[:variant], {dotted key: value}, what the message says)
    ("quickstart:smoke", {"log_every_steps": 0},
     "log_every_steps must be a positive integer, got 0"),
    ("quickstart:smoke", {"checkpoint_every_steps": -1},
     "checkpoint_every_steps must be a positive integer, got -1"),
    ("quickstart:smoke", {"global_batch_size": 0},
     "global_batch_size must be a positive integer, got 0"),
    ("quickstart:smoke", {"total_steps": 0}, "total_steps must be a positive integer, got 0"),
    ("quickstart:smoke", {"total_steps": -5}, "total_steps must be a positive integer, got -5"),
    ("mocov2_r50", {"total_epochs": 0}, "total_epochs must be a positive number, got 0"),
    ("clip_vitb16", {"total_examples": -1}, "total_examples must be a positive number, got -1"),
    ("quickstart:smoke", {"optim.lr": -1e-3}, "optim.lr must be a finite number >= 0, got -0.001"),
    ("quickstart:smoke", {"optim.lr": float("nan")},
     "optim.lr must be a finite number >= 0, got nan"),
    ("quickstart:smoke", {"optim.lr": float("inf")},
     "optim.lr must be a finite number >= 0, got inf"),
    ("byol_r50", {"optim.lr_per_256": -0.2},
     "optim.lr_per_256 must be a finite number >= 0, got -0.2"),
    ("quickstart:smoke", {"data.max_skip_fraction": 1.5},
     "data.max_skip_fraction must be a fraction in [0, 1], got 1.5"),
    ("mocov2_r50", {"data.max_skip_fraction": -0.1},
     "data.max_skip_fraction must be a fraction in [0, 1], got -0.1"),
    ("quickstart:smoke", {"model.embed_dim": 0},
     "model.embed_dim must be a positive integer, got 0"),
    ("byol_r50:smoke", {"model.heads.projector.hidden_dim": 0},
     "model.heads.projector.hidden_dim must be a positive integer, got 0"),
    ("simclr_r50", {"model.heads.projector.out_dim": -128},
     "model.heads.projector.out_dim must be a positive integer, got -128"),
    ("dino_vits16:smoke", {"model.heads.head.bottleneck": 0},
     "model.heads.head.bottleneck must be a positive integer, got 0"),
    ("siglip_vitb16", {"model.text.num_heads": 0},
     "model.text.num_heads must be a positive integer, got 0"),
    ("mocov2_r50:smoke", {"model.bn_group_size": 0},
     "model.bn_group_size must be a positive integer, got 0"),
    ("quickstart:smoke", {"data.context_length": 0},
     "data.context_length must be a positive integer, got 0"),
    ("quickstart:smoke", {"data.image_size": -32},
     "data.image_size must be a positive integer, got -32"),
    ("quickstart:smoke", {"model.image.image_size": 33}, f"model.image.image_size {PATCH_8} 33"),
    ("quickstart:smoke", {"data.image_size": 36}, f"data.image_size {PATCH_8} 36"),
    ("clip_vitb16:smoke", {"model.image.patch_size": 0},
     "model.image.patch_size must be a positive integer, got 0"),
    ("mocov3_vits16:smoke", {"model.backbone.patch_size": 3},
     "model.backbone.image_size must be a multiple of the patch size 3 of model.backbone "
     "(vit_micro), got 16"),
    ("dino_vits16:smoke", {"data.crop_groups": DINO_SMOKE_BAD_CROPS},
     "data.crop_groups size must be a multiple of the patch size 8 of model.backbone (vit_micro), "
     "got 12"),
    ("dino_vits16", {"model.backbone.name": "vit_s14"},
     "data.crops='dino' crop size must be a multiple of the patch size 14 of model.backbone "
     "(vit_s14), got 96"),
    ("clip_vitb16", {"evals.imagenet_zero_shot.data.image_size": 200},
     "evals.imagenet_zero_shot.data.image_size must be a multiple of the patch size 16 of "
     "model.image (vit_b16), got 200"),
    ("quickstart:smoke", {"nonfinite": "halt"}, "nonfinite must be 'stop' or 'skip', got 'halt'"),
    ("quickstart:smoke", {"max_consecutive_skips": 0},
     "max_consecutive_skips must be a positive integer, got 0"),
    ("quickstart:smoke", {"keep_checkpoints": 0},
     "keep_checkpoints must be a positive integer, got 0"),
    ("quickstart:smoke", {"stop_at_step": 0}, "stop_at_step must be a positive integer, got 0"),
]


def load(spec: str) -> ConfigDict:
  """get_config of `configs/<name>.py[:variant]`, in process."""
  name, _, arg = spec.partition(":")
  return importlib.import_module(f"configs.{name}").get_config(arg or None)


@pytest.mark.parametrize("spec,overrides,needle", CASES,
                         ids=[f"{s}-{','.join(o)}" for s, o, _ in CASES])
def test_bad_setting_gets_one_line_naming_it(spec: str, overrides: dict[str, Any], needle: str):
  c = load(spec)
  c.lock()  # an override of a key the recipe does not declare fails here, not silently
  c.update_from_flattened_dict(overrides)
  with pytest.raises(ConfigError) as e:
    config_check.validate(c)
  assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)


@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_variant_passes_and_declares_the_loop_fields(name: str):
  module = importlib.import_module(f"configs.{name}")
  for arg in (None, *module.VARIANTS):
    c = module.get_config(arg)
    config_check.validate(c)
    assert set(LOOP_FIELDS) <= set(c.keys()), (arg, sorted(c.keys()))


@pytest.mark.parametrize("name", RECIPES)
def test_unknown_variant_is_named_with_the_known_ones(name: str):
  module = importlib.import_module(f"configs.{name}")
  with pytest.raises(ConfigError) as e:
    module.get_config("digit")
  assert str(e.value) == (f"configs/{name}.py: unknown variant 'digit'; known: "
                          f"{', '.join(module.VARIANTS)} (or no argument for the paper recipe)")


def test_loop_fields_are_settable_and_a_typo_in_the_variant_reaches_the_cli():
  c = parse_cli(f"--config={CONFIGS}/quickstart.py:smoke", "--config.keep_checkpoints=5",
                "--config.stop_at_step=2", "--config.num_devices=1", "--config.nonfinite=skip",
                "--config.max_consecutive_skips=4")
  assert (c.keep_checkpoints, c.stop_at_step, c.num_devices, c.nonfinite,
          c.max_consecutive_skips) == (5, 2, 1, "skip", 4)
  # config_flags re-raises get_config's ValueError with its traceback as the message and absl
  # wraps that in IllegalFlagValueError: the recipe's ConfigError is at the end of __context__.
  with pytest.raises(flags.IllegalFlagValueError) as e:
    parse_cli(f"--config={CONFIGS}/mocov2_r50.py:digit")
  chain = [e.value]
  while chain[-1].__context__ is not None:
    chain.append(chain[-1].__context__)
  assert isinstance(chain[-1], ConfigError)
  assert str(chain[-1]).startswith("configs/mocov2_r50.py: unknown variant 'digit'; known: digits")

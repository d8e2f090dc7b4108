"""Typed recipe arguments (`--config=x.py:variant=digits,batch=256`) and declared reader fields."""

import importlib
import os
import re

import pytest
from absl import flags
from ml_collections import ConfigDict, config_flags

from configs import common
from sslvl_jax.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")
RECIPES = sorted(f[:-3] for f in os.listdir(CONFIGS)
                 if f.endswith(".py") and f not in ("__init__.py", "common.py"))
WITH_BATCH = ("barlow_r50", "vicreg_r50")  # end_lr is absolute: derived from the batch


def recipe(name: str):
  return importlib.import_module(f"configs.{name}")


def one_line_error(fn, *args) -> str:
  with pytest.raises(ConfigError) as e:
    fn(*args)
  assert "\n" not in str(e.value), str(e.value)
  return str(e.value)


# ---- common.parse_arg ----------------------------------------------------------------------------

def test_parse_arg_types_values_like_their_defaults():
  a = common.parse_arg("variant=digits, batch=64,lr=1e-3,ema=false", variant="", batch=0,
                       lr=0.1, ema=True)
  assert a.to_dict() == dict(variant="digits", batch=64, lr=1e-3, ema=False)
  assert isinstance(a.batch, int) and isinstance(a.lr, float) and isinstance(a.ema, bool)
  assert common.parse_arg("lr=3", lr=0.1).lr == 3.0 and common.parse_arg("ema=1", ema=False).ema


@pytest.mark.parametrize("arg", [None, "", ","])
def test_parse_arg_without_text_gives_the_defaults(arg):
  assert common.parse_arg(arg, variant="", batch=0).to_dict() == dict(variant="", batch=0)


def test_a_bare_word_is_the_variant():
  assert common.parse_arg("smoke", variant="", batch=0).to_dict() == dict(variant="smoke", batch=0)
  assert common.parse_arg("digits,batch=8", variant="", batch=0).to_dict() == dict(
      variant="digits", batch=8)


def test_parse_arg_unknown_key_and_bad_value_get_one_line():
  msg = one_line_error(lambda: common.parse_arg("variant=smoke,bacth=64", variant="", batch=0))
  assert "'bacth'" in msg and "known: variant, batch" in msg, msg
  msg = one_line_error(lambda: common.parse_arg("batch=big", variant="", batch=0))
  assert msg == "config argument batch='big' does not parse as int (default 0)", msg
  msg = one_line_error(lambda: common.parse_arg("ema=maybe", ema=True))
  assert "ema='maybe'" in msg and "bool" in msg, msg
  msg = one_line_error(lambda: common.parse_arg("batch=1.5", batch=0))
  assert "batch='1.5'" in msg, msg


# ---- every recipe --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", RECIPES)
def test_variant_key_is_the_bare_word_and_no_arg_is_the_paper_recipe(name: str):
  module = recipe(name)
  assert module.get_config("").to_dict() == module.get_config(None).to_dict()
  assert module.get_config().to_dict() == module.get_config(None).to_dict()
  for v in module.VARIANTS:
    assert module.get_config(f"variant={v}").to_dict() == module.get_config(v).to_dict(), v


@pytest.mark.parametrize("name", RECIPES)
def test_unknown_argument_and_unknown_variant_are_named(name: str):
  module = recipe(name)
  msg = one_line_error(module.get_config, "batchsize=64")
  assert "'batchsize'" in msg and "known: variant" in msg, msg
  msg = one_line_error(module.get_config, "variant=digit")
  assert msg == (f"configs/{name}.py: unknown variant 'digit'; known: "
                 f"{', '.join(module.VARIANTS)} (or no argument for the paper recipe)")


@pytest.mark.parametrize("name", WITH_BATCH)
def test_batch_sets_the_global_batch_and_the_end_lr(name: str):
  module = recipe(name)
  for variant in ("", *module.VARIANTS):
    base = module.get_config(variant)
    c = module.get_config(f"{variant},batch=64" if variant else "batch=64")
    assert c.global_batch_size == 64
    assert c.optim.end_lr == pytest.approx(0.001 * c.optim.lr_per_256 * 64 / 256)
    c.global_batch_size, c.optim.end_lr = base.global_batch_size, base.optim.end_lr
    assert c.to_dict() == base.to_dict(), variant  # nothing else moves
  assert module.get_config("batch=0").to_dict() == module.get_config(None).to_dict()
  msg = one_line_error(module.get_config, "digits,batch=large")
  assert msg == "config argument batch='large' does not parse as int (default 0)", msg


def parse_cli(*args: str) -> ConfigDict:
  """The config `--config=... --config.a.b=v` gives, parsed by config_flags as the CLI does."""
  argv = ["prog", *args]
  values = flags.FlagValues()
  holder = config_flags.DEFINE_config_file("config", None, "", flag_values=values, sys_argv=argv)
  values(argv)
  return holder.value


def test_typed_arguments_reach_get_config_through_the_cli():
  c = parse_cli(f"--config={CONFIGS}/barlow_r50.py:variant=smoke,batch=32",
                "--config.optim.lr_per_256=1.0")
  assert (c.global_batch_size, c.total_steps, c.optim.lr_per_256) == (32, 4, 1.0)
  assert parse_cli(f"--config={CONFIGS}/quickstart.py:variant=smoke").to_dict() == (
      recipe("quickstart").get_config("smoke").to_dict())


# ---- fields the readers read are declared (settable from the CLI) --------------------------------

def reads(path: str, pattern: str) -> set[str]:
  with open(os.path.join(ROOT, "sslvl_jax", path)) as f:
    return set(re.findall(pattern, f.read()))


TOP = r'\bconfig\.get\("(\w+)"'
TOP_LEVEL = (reads("train.py", TOP) | reads("parallel.py", TOP)
             ) - {"evals", "loss"}  # sections a recipe may leave out
DATA = (reads("data/__init__.py", r'\bcfg\.get\("(\w+)"')
        | reads("train.py", r'config\.data\.get\("(\w+)"')
        ) - {"tokenizer"}  # image-only data has no tokenizer (the reader's test is `if tokenizer`)


def test_the_scan_finds_the_fields_named_in_the_issue():
  assert {"stop_at_step", "keep_checkpoints", "num_devices", "collapse_rules"} <= TOP_LEVEL
  assert {"image_key", "label_key", "lowercase", "worker_count"} <= DATA


@pytest.mark.parametrize("name", RECIPES)
def test_every_field_a_reader_reads_is_declared(name: str):
  module = recipe(name)
  for arg in (None, *module.VARIANTS):
    c = module.get_config(arg)
    assert not TOP_LEVEL - set(c.keys()), (arg, sorted(TOP_LEVEL - set(c.keys())))
    assert not DATA - set(c.data.keys()), (arg, sorted(DATA - set(c.data.keys())))
    assert (c.data.image_key, c.data.label_key, c.data.lowercase) == ("image", "label", True)

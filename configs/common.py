"""Helpers shared by recipe configs: typed config arguments, loop fields, data, small variants."""

import os
from typing import Any, Sequence

from ml_collections import ConfigDict, config_dict

from sslvl_jax.errors import ConfigError
from sslvl_jax.data.device_ops import NORMALIZATIONS

CLIP_MEAN, CLIP_STD = NORMALIZATIONS.get("clip")
TRUE, FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def _typed(key: str, text: str, default: Any) -> Any:
  """`text` as a value of `default`'s type (bool, int, float, str), or ConfigError naming `key`."""
  kind = type(default)
  if kind is bool:
    if text.lower() in TRUE + FALSE:
      return text.lower() in TRUE
  elif kind in (int, float):
    try:
      return kind(text)
    except ValueError:
      pass
  elif kind is str:
    return text
  else:
    raise TypeError(f"config argument {key!r}: default of type {kind.__name__} is not supported")
  raise ConfigError(f"config argument {key}={text!r} does not parse as {kind.__name__} "
                    f"(default {default!r})")


def parse_arg(arg: str | None, **defaults: Any) -> ConfigDict:
  """The recipe arguments `defaults` updated from `--config=x.py:ARG`.

  ARG is comma-separated `key=value` items, each value parsed as the type of the key's default
  (bool, int, float, str); a bare word `w` means `variant=w`, so `x.py:smoke` is
  `x.py:variant=smoke`. An unknown key or a value that does not parse raises a one-line
  ConfigError. None or '' gives the defaults.
  """
  out = dict(defaults)
  for item in (arg or "").split(","):
    item = item.strip()
    if not item:
      continue
    key, eq, text = item.partition("=")
    key, text = (key.strip(), text.strip()) if eq else ("variant", item)
    if key not in defaults:
      raise ConfigError(f"unknown config argument {key!r} in {arg!r}; "
                        f"known: {', '.join(defaults) or '(none)'}")
    out[key] = _typed(key, text, defaults[key])
  return ConfigDict(out)


def check_variant(config_file: str, variant: str | None, known: Sequence[str]) -> None:
  """Raise ConfigError unless `variant` (from the text after `:` in --config) is in `known`."""
  if variant and variant not in known:
    folder, name = os.path.split(os.path.abspath(config_file))
    raise ConfigError(f"{os.path.basename(folder)}/{name}: unknown variant {variant!r}; "
                      f"known: {', '.join(known)} (or no argument for the paper recipe)")


def loop_fields(c: ConfigDict) -> ConfigDict:
  """Declare the loop's (and model.remat's) optional settings the recipe left out, for the CLI."""
  defaults = dict(
      stop_at_step=config_dict.placeholder(int),  # save and exit after this step
      keep_checkpoints=3,
      num_devices=config_dict.placeholder(int),  # None: all devices
      microbatches=1,  # k > 1: gradient caching (contrastive) or accumulation over k micro-batches
      nonfinite="stop",  # 'stop' | 'skip': what a step with a non-finite loss or gradient does
      max_consecutive_skips=10,
      preemption_check_every_steps=10,  # multi-host: steps between agreeing on a SIGTERM
      # ("data", "fsdp") mesh sizes, -1: the rest of the devices; fsdp > 1 shards the state
      mesh=ConfigDict(dict(data=-1, fsdp=1)),
      # (regex over a TrainState leaf path, spec), first match wins: see sslvl_jax/sharding.py
      sharding_rules=((".*", "fsdp"),),
      collapse_rules=())  # (metric, '<' | '>', threshold): stop when a logged metric crosses it
  for key, value in defaults.items():
    if key not in c:
      c[key] = value
  if "remat" not in c.model:  # 'block' | 'dots_saveable' | ...: recompute activations in backward
    c.model.remat = "none"
  return c


def data_config(**fields) -> ConfigDict:
  """A data config with every field a source reads declared, so each can be set from the CLI."""
  str_field = lambda: config_dict.placeholder(str)  # noqa: E731
  # worker_count: decode processes (-1: one per core this process may use, less one);
  # prefetch_batches: batches put on the devices while the step runs (0: none);
  # streaming (webdataset): read shards in order, no index; needs num_examples;
  # image_key / label_key: TFDS feature names; lowercase: the tokenizer lowercases captions;
  # delimiter (csv): unset sniffs it from the header line (a tab for .tsv), else e.g. ',' or 'tab'.
  d = dict(name="digits", splits=dict(train="", test=""), image_size=224, tokenizer="",
           context_length=77, lowercase=True, worker_count=0, prefetch_batches=2,
           max_skip_fraction=0.05, streaming=False, resampled=False, shuffle_buffer=0,
           num_examples=config_dict.placeholder(int),
           image_column="filepath", caption_column="title", label_column=str_field(),
           delimiter=str_field(),
           image_root=str_field(), text_ext="txt", dataset=str_field(), data_dir=str_field(),
           image_key="image", label_key="label", text_key=str_field(), crops=str_field(),
           eval_resize_ratio=1.0, crop_groups=config_dict.placeholder(tuple),
           train_crop_scale=config_dict.placeholder(tuple))
  d.update(fields)
  return ConfigDict(d)


def digits_data(**overrides) -> ConfigDict:
  """The built-in handwritten-digits image-text data (no download)."""
  return data_config(**{**dict(name="digits", image_size=32, tokenizer="builtin:digits",
                               context_length=24, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
                        **overrides})


def digits_images(crop_groups: tuple, image_size: int = 32) -> ConfigDict:
  """The built-in digits as image-only data: `crop_groups` crops at `image_size`, no tokenizer."""
  d = digits_data(crop_groups=crop_groups, crops=None, image_size=image_size)
  drop(d, "tokenizer")
  return d


def imagenet_data(crops: str, **overrides) -> ConfigDict:
  """ImageNet-1k through TFDS (prepared ArrayRecord), or an ImageFolder via `name='image_folder'`."""
  return data_config(**{**dict(name="tfds", dataset="imagenet2012",
                               splits=dict(train="train", test="validation"), image_size=224,
                               crops=crops, eval_resize_ratio=224 / 256, worker_count=-1,
                               max_skip_fraction=0.01), **overrides})


def drop(c: ConfigDict, *keys: str) -> None:
  """Remove `keys` from a ConfigDict if present (durations given in other units, etc.)."""
  for k in keys:
    if k in c:
      del c[k]


def micro_vit(**overrides) -> ConfigDict:
  """The quickstart's image tower: vit_micro at 32 px with 8 px patches (`overrides` on top)."""
  return ConfigDict({**dict(name="vit_micro", image_size=32, patch_size=8), **overrides})


def micro_resnet() -> ConfigDict:
  """A quarter-width ResNet-18 with the CIFAR stem (3x3 conv, no max-pool) for small images."""
  return ConfigDict(dict(name="resnet18", cifar_stem=True, width_multiplier=0.25))


def micro_towers(c: ConfigDict, embed_dim: int) -> None:
  """Set model.image to `micro_vit()`, model.text to text_micro (keeping the recipe's causal and
  pool) and model.embed_dim to `embed_dim`."""
  c.model.image = micro_vit()
  c.model.text = ConfigDict(dict(name="text_micro", **{k: v for k, v in c.model.text.items()
                                                       if k in ("causal", "pool")}))
  c.model.embed_dim = embed_dim


def train_in_steps(c: ConfigDict, *, batch: int, steps: int, warmup_steps: int, log_every: int,
                   checkpoint_every: int) -> None:
  """Set global_batch_size, total_steps, optim.warmup_steps, log_every_steps and
  checkpoint_every_steps; drop the durations in other units (total_epochs/examples,
  optim.warmup_epochs/examples)."""
  drop(c, "total_epochs", "total_examples")
  drop(c.optim, "warmup_epochs", "warmup_examples")
  c.global_batch_size, c.total_steps, c.optim.warmup_steps = batch, steps, warmup_steps
  c.log_every_steps, c.checkpoint_every_steps = log_every, checkpoint_every


def smoke_run(c: ConfigDict) -> None:
  """`:smoke`'s loop: 4 steps of 16 examples, warm-up 1, log and checkpoint every 2, no evals."""
  train_in_steps(c, batch=16, steps=4, warmup_steps=1, log_every=2, checkpoint_every=2)
  c.evals = ConfigDict()


def digits_image_text(c: ConfigDict, variant: str) -> None:
  """An image-text recipe at CPU scale (`variant` 'digits' or 'smoke'): the built-in digits and
  micro towers in float32; `:digits` trains 600 steps of 128 with the quickstart's lr and decay
  (the recipe's optimiser kept) and reports zero-shot, `:smoke` runs 4 steps."""
  c.data = digits_data()
  c.model.dtype = "float32"
  if variant == "digits":
    micro_towers(c, embed_dim=64)
    train_in_steps(c, batch=128, steps=600, warmup_steps=50, log_every=50, checkpoint_every=1000)
    c.optim.update(lr=2e-3, weight_decay=0.1)
    c.evals = ConfigDict(dict(zero_shot=digits_zero_shot()))
  else:
    micro_towers(c, embed_dim=32)
    smoke_run(c)


def digits_resnet(c: ConfigDict) -> None:
  """An image-only recipe on the built-in digits with the micro ResNet in float32: two 16 px
  crops (8 x 8 digits: 16 px keeps every pixel) of scale 0.35-1."""
  c.data = digits_images(crop_groups=((16, (0.35, 1.0), 2),), image_size=16)
  c.model.backbone = micro_resnet()
  c.model.dtype = "float32"


def digits_ssl_run(c: ConfigDict, steps: int = 300) -> None:
  """`:digits`' loop for the image-only recipes: `steps` of 128, warm-up 30, log every 25, k-NN
  at the end."""
  train_in_steps(c, batch=128, steps=steps, warmup_steps=30, log_every=25, checkpoint_every=1000)
  c.evals = ConfigDict(dict(knn=knn_eval(0, batch_size=256)))


def imagenet_zero_shot(every_steps: int = 10_000) -> ConfigDict:
  """Zero-shot top-1 on ImageNet-1k validation (TFDS) with the 80 CLIP prompt templates."""
  return ConfigDict(dict(type="zero_shot", split="validation",
                         data=dict(name="tfds", dataset="imagenet2012", image_size=224),
                         classnames="imagenet", templates="imagenet", every_steps=every_steps,
                         batch_size=1024))


def knn_eval(every_steps: int, **overrides) -> ConfigDict:
  """DINO's k-NN protocol (k=20, T=0.07) on train -> test features."""
  d = dict(type="knn", k=20, temperature=0.07, train_split="train", test_split="test",
           every_steps=every_steps, batch_size=1024)
  d.update(overrides)
  return ConfigDict(d)


def digits_zero_shot(every_steps: int = 0) -> ConfigDict:
  """Zero-shot top-1 on the held-out digits with the evaluation prompt templates (batch 128)."""
  return ConfigDict(dict(type="zero_shot", split="test", classnames="digits",
                         templates="digits_eval", every_steps=every_steps, batch_size=128))

"""Helpers shared by recipe configs: variant check, loop fields, smoke shrink, built-in data."""

import os
from typing import Sequence

from ml_collections import ConfigDict, config_dict

from sslvl_jax.errors import ConfigError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def check_variant(config_file: str, arg: str | None, known: Sequence[str]) -> None:
  """Raise ConfigError unless `arg` (the text after `:` in --config) is a variant of the recipe."""
  if arg and arg not in known:
    folder, name = os.path.split(os.path.abspath(config_file))
    raise ConfigError(f"{os.path.basename(folder)}/{name}: unknown variant {arg!r}; "
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
      sharding_rules=((".*", "fsdp"),))
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
  # streaming (webdataset): read shards in order, no index; needs num_examples.
  d = dict(name="digits", splits=dict(train="", test=""), image_size=224, tokenizer="",
           context_length=77, worker_count=0, prefetch_batches=2, max_skip_fraction=0.05,
           streaming=False, resampled=False, shuffle_buffer=0,
           num_examples=config_dict.placeholder(int),
           image_column="filepath", caption_column="title", label_column=str_field(),
           image_root=str_field(), text_ext="txt", dataset=str_field(), data_dir=str_field(),
           text_key=str_field(), crops=str_field(), eval_resize_ratio=1.0,
           crop_groups=config_dict.placeholder(tuple),
           train_crop_scale=config_dict.placeholder(tuple))
  d.update(fields)
  return ConfigDict(d)


def digits_data(**overrides) -> ConfigDict:
  """The built-in handwritten-digits image-text data (no download)."""
  return data_config(**{**dict(name="digits", image_size=32, tokenizer="builtin:digits",
                               context_length=24, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
                        **overrides})


def drop(c: ConfigDict, *keys: str) -> None:
  """Remove `keys` from a ConfigDict if present (durations given in other units, etc.)."""
  for k in keys:
    if k in c:
      del c[k]


def vl_on_digits(c: ConfigDict, steps: int = 600) -> ConfigDict:
  """An image-text recipe at CPU scale on the built-in digits (quickstart-sized towers)."""
  c.data = digits_data()
  c.model.image = ConfigDict(dict(name="vit_micro", image_size=32, patch_size=8))
  c.model.text = ConfigDict(dict(name="text_micro", **{k: v for k, v in c.model.text.items()
                                                       if k in ("causal", "pool")}))
  c.model.embed_dim = 64
  c.model.dtype = "float32"
  c.global_batch_size, c.total_steps = 128, steps
  drop(c, "total_examples", "total_epochs")
  drop(c.optim, "warmup_epochs", "warmup_examples")
  c.optim.update(warmup_steps=50, weight_decay=0.1)
  drop(c.optim, "lr_per_256", "lr_sqrt")
  c.optim.lr = 2e-3
  c.log_every_steps, c.checkpoint_every_steps = 50, 1000
  c.evals = ConfigDict(dict(zero_shot=dict(
      type="zero_shot", split="test", classnames="digits", templates="digits_eval",
      every_steps=0, batch_size=128)))
  return c


def shrink_to_smoke(c: ConfigDict, *, text: bool = True) -> ConfigDict:
  """A few steps of the same recipe on the built-in data with micro towers (`--config=x.py:smoke`)."""
  c.data = digits_data()
  c.model.image = ConfigDict(dict(name="vit_micro", image_size=32, patch_size=8))
  if text:
    c.model.text = ConfigDict(dict(name="text_micro", **{k: v for k, v in c.model.text.items()
                                                         if k in ("causal", "pool")}))
    c.model.embed_dim = 32
  c.model.dtype = "float32"
  c.global_batch_size, c.total_steps = 16, 4
  drop(c, "total_examples", "total_epochs")
  drop(c.optim, "warmup_epochs", "warmup_examples")
  c.optim.warmup_steps = 1
  c.log_every_steps, c.checkpoint_every_steps = 2, 2
  c.evals = ConfigDict()
  return c


def imagenet_data(crops: str, **overrides) -> ConfigDict:
  """ImageNet-1k through TFDS (prepared ArrayRecord), or an ImageFolder via `name='image_folder'`."""
  return data_config(**{**dict(name="tfds", dataset="imagenet2012",
                               splits=dict(train="train", test="validation"), image_size=224,
                               crops=crops, eval_resize_ratio=224 / 256, worker_count=-1,
                               max_skip_fraction=0.01), **overrides})


def knn_eval(every_steps: int, **overrides) -> ConfigDict:
  """DINO's k-NN protocol (k=20, T=0.07) on train -> test features."""
  d = dict(type="knn", k=20, temperature=0.07, train_split="train", test_split="test",
           every_steps=every_steps, batch_size=1024)
  d.update(overrides)
  return ConfigDict(d)


def ssl_on_digits(c: ConfigDict, *, backbone: str = "vit_micro", steps: int = 300,
                  crop_groups: tuple = ((32, (0.7, 1.0), 2),), batch: int = 128) -> ConfigDict:
  """The same SSL recipe at CPU scale on the built-in digits: small backbone and heads, k-NN eval."""
  c.data = digits_data(crop_groups=crop_groups, crops=None)
  drop(c.data, "tokenizer")
  if backbone == "resnet18":
    c.model.backbone = ConfigDict(dict(name="resnet18", cifar_stem=True, width_multiplier=0.25))
  else:
    c.model.backbone = ConfigDict(dict(name="vit_micro", image_size=32, patch_size=8))
  c.model.dtype = "float32"
  c.global_batch_size, c.total_steps = batch, steps
  drop(c, "total_epochs", "total_examples")
  c.log_every_steps, c.checkpoint_every_steps = 25, 1000
  c.optim.warmup_steps = max(steps // 10, 1)
  drop(c.optim, "warmup_epochs", "warmup_examples")
  c.evals = ConfigDict(dict(knn=knn_eval(0, k=20, batch_size=256)))
  return c


def cpu_adamw(c: ConfigDict, lr: float = 1e-3, steps: int = 1500) -> ConfigDict:
  """AdamW for the `:digits` variants: the papers' LARS/SGD settings assume batches of 512-4096;
  at batch 128 on a CPU a micro ViT learns with AdamW (measured: BYOL k-NN 70% vs 58% random)."""
  keep = {k: c.optim[k] for k in ("freeze_rules", "clip_grad_per_tensor", "constant_lr_rules")
          if k in c.optim}
  c.optim = ConfigDict(dict(name="adamw", lr=lr, weight_decay=0.05, warmup_steps=30,
                            **keep))
  c.total_steps = steps
  return c


def ssl_smoke(c: ConfigDict, **kw) -> ConfigDict:
  """A few steps of `ssl_on_digits` (tests)."""
  c = ssl_on_digits(c, steps=4, batch=16, **kw)
  c.log_every_steps, c.checkpoint_every_steps = 2, 2
  c.evals = ConfigDict()
  return c

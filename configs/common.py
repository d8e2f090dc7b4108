"""Helpers shared by recipe configs: the smoke-run shrink, the built-in data block, CLIP evals."""

from ml_collections import ConfigDict

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def digits_data(**overrides) -> ConfigDict:
  """The built-in handwritten-digits image-text data (no download)."""
  d = dict(name="digits", image_size=32, tokenizer="builtin:digits", context_length=24,
           worker_count=0, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
  d.update(overrides)
  return ConfigDict(d)


def shrink_to_smoke(c: ConfigDict, *, text: bool = True) -> ConfigDict:
  """A few steps of the same recipe on the built-in data with micro towers (`--config=x.py:smoke`)."""
  c.data = digits_data()
  c.model.image = ConfigDict(dict(name="vit_micro", image_size=32, patch_size=8))
  if text:
    c.model.text = ConfigDict(dict(name="text_micro"))
    c.model.embed_dim = 32
  c.model.dtype = "float32"
  c.global_batch_size, c.total_steps = 16, 4
  c.pop("total_examples", None)
  c.optim.warmup_steps = 1
  c.log_every_steps, c.checkpoint_every_steps = 2, 2
  c.evals = ConfigDict()
  return c

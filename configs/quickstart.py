"""Quickstart: a tiny CLIP on the built-in handwritten digits, minutes on a laptop CPU.

  python -m sslvl_jax.main --config=configs/quickstart.py --workdir=/tmp/quickstart

Reports zero-shot top-1 on 297 held-out digits with prompt templates never seen in training.
`--config=configs/quickstart.py:smoke` runs a few steps (used by the tests).
"""

from ml_collections import ConfigDict

from configs import common

VARIANTS = ("smoke",)


def get_config(arg: str | None = None) -> ConfigDict:
  arg = common.parse_arg(arg, variant="")
  common.check_variant(__file__, arg.variant, VARIANTS)
  c = ConfigDict()
  c.method = "clip"
  c.seed = 0
  c.global_batch_size = 128
  c.total_steps = 600
  c.log_every_steps = 50
  c.checkpoint_every_steps = 200

  # 32x32 digits with captions, the shipped tokenizer, context 24 (see configs/common.py)
  c.data = common.digits_data()
  c.model = ConfigDict(dict(
      image=dict(name="vit_micro", image_size=32, patch_size=8),
      text=dict(name="text_micro"),
      embed_dim=64, dtype="float32"))
  c.loss = ConfigDict(dict(logit_scale_init=2.6592600369644043, max_logit_scale=100.0,  # log(1/0.07)
                           chunk_size=0))
  c.optim = ConfigDict(dict(name="adamw", lr=2e-3, b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.1,
                            warmup_steps=50, clip_grad_norm=1.0))
  c.evals = ConfigDict(dict(zero_shot=common.digits_zero_shot(every_steps=200)))
  if arg.variant == "smoke":
    c.total_steps, c.log_every_steps, c.checkpoint_every_steps = 4, 2, 2
    c.global_batch_size = 16
    c.evals.zero_shot.every_steps = 0
  return common.loop_fields(c)

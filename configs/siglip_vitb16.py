"""SigLIP ViT-B/16 (Zhai et al. 2023): pairwise sigmoid loss, t' = log 10, b = -10.

  python -m sslvl_jax.main --config=configs/siglip_vitb16.py --workdir=DIR \
      --config.data.splits.train="/data/webli/{00000..99999}.tar" --config.data.tokenizer=tok.model

Paper settings: batch 32k, AdamW lr 1e-3, weight decay 1e-4, beta2 0.95 (stabilises training),
224 px, 16 text tokens, 32k SentencePiece vocabulary. `:smoke` shrinks it to the built-in digits.
"""

from ml_collections import ConfigDict

from configs import common

VARIANTS = ("smoke",)


def get_config(arg: str | None = None) -> ConfigDict:
  arg = common.parse_arg(arg, variant="")
  common.check_variant(__file__, arg.variant, VARIANTS)
  c = ConfigDict()
  c.method = "siglip"
  c.seed = 0
  c.global_batch_size = 32768
  c.total_examples = 9_000_000_000          # the paper's 9B-example B/16 runs
  c.log_every_steps = 100
  c.checkpoint_every_steps = 2000

  c.data = common.data_config(**dict(
      name="webdataset", splits=dict(train=""), image_size=224, tokenizer="", context_length=16,
      worker_count=-1, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)))
  c.model = ConfigDict(dict(
      image=dict(name="vit_b16", image_size=224, pool="mean", attention_impl="cudnn"),
      text=dict(name="text_b", width=768, num_heads=12, pool="last_nonpad"),
      embed_dim=768, dtype="bfloat16"))
  c.loss = ConfigDict(dict(logit_scale_init=2.302585092994046,   # log 10
                           logit_bias_init=-10.0, max_logit_scale=None, chunk_size=0))
  c.optim = ConfigDict(dict(name="adamw", lr=1e-3, b1=0.9, b2=0.95, eps=1e-8, weight_decay=1e-4,
                            warmup_steps=5_000, clip_grad_norm=1.0))
  c.evals = ConfigDict(dict(imagenet_zero_shot=common.imagenet_zero_shot()))
  if arg.variant == "smoke":  # CPU scale: the built-in digits, micro towers, 4 steps
    common.digits_image_text(c, arg.variant)
  return common.loop_fields(c)

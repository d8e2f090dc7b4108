"""CLIP ViT-B/16 (Radford et al. 2021; open_clip's recipe) on an image-text corpus.

  python -m sslvl_jax.main --config=configs/clip_vitb16.py --workdir=DIR \
      --config.data.splits.train="/data/laion400m/{00000..41407}.tar" --config.data.tokenizer=tok.model

`:smoke` shrinks it to a few steps on the built-in digits.
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
  c.global_batch_size = 32768
  c.total_examples = 12_800_000_000        # 32 epochs of 400M pairs
  c.log_every_steps = 100
  c.checkpoint_every_steps = 2000

  c.data = common.data_config(**dict(
      name="webdataset", splits=dict(train=""), image_size=224, tokenizer="", context_length=77,
      worker_count=-1, mean=common.CLIP_MEAN, std=common.CLIP_STD))
  c.model = ConfigDict(dict(
      image=dict(name="vit_b16", image_size=224, pre_norm=True, patch_bias=False, ln_eps=1e-5,
                 attention_impl="cudnn"),
      text=dict(name="text_b"),
      embed_dim=512, dtype="bfloat16"))
  c.loss = ConfigDict(dict(logit_scale_init=2.6592600369644043,  # log(1 / 0.07)
                           max_logit_scale=100.0, chunk_size=0))
  c.optim = ConfigDict(dict(name="adamw", lr=5e-4, b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.2,
                            warmup_steps=10_000, clip_grad_norm=None))
  c.evals = ConfigDict(dict(imagenet_zero_shot=common.imagenet_zero_shot()))
  if arg.variant == "smoke":  # CPU scale: the built-in digits, micro towers, 4 steps
    common.digits_image_text(c, arg.variant)
  return common.loop_fields(c)

"""UniCL ViT-B/16 (Yang et al. 2022): image-text-label contrastive over a mix of image-label data
(class names as prompts) and image-text pairs; pairs sharing a label are all positives.

  python -m sslvl_jax.main --config=configs/unicl_vitb16.py --workdir=DIR \
      --config.data.splits.train=/data/in21k_gcc/train.csv --config.data.label_column=label

Rows with label -1 are plain image-text pairs (each its own class). UniCL's recipe: batch 4096,
AdamW lr 5e-4, wd 0.05... as CLIP for the towers; 500 epochs on ImageNet-1k for the label-only
setting. `:digits` trains on the built-in digits, where every caption carries its digit class.
"""

from ml_collections import ConfigDict

from configs import common

VARIANTS = ("digits", "smoke")


def get_config(arg: str | None = None) -> ConfigDict:
  arg = common.parse_arg(arg, variant="")
  common.check_variant(__file__, arg.variant, VARIANTS)
  c = ConfigDict()
  c.method = "unicl"
  c.seed = 0
  c.global_batch_size = 4096
  c.total_epochs = 32
  c.log_every_steps = 100
  c.checkpoint_every_steps = 2000
  c.data = common.data_config(**dict(
      name="csv", splits=dict(train=""), image_size=224, tokenizer="",
                           context_length=77, worker_count=-1, label_column="label",
                           train_crop_scale=(0.08, 1.0), mean=common.CLIP_MEAN, std=common.CLIP_STD))
  c.model = ConfigDict(dict(image=dict(name="vit_b16", image_size=224), text=dict(name="text_b"),
                            embed_dim=512, dtype="bfloat16"))
  c.loss = ConfigDict(dict(logit_scale_init=2.6592600369644043, max_logit_scale=100.0, chunk_size=0))
  c.optim = ConfigDict(dict(name="adamw", lr=5e-4, b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.05,
                            warmup_epochs=5))
  c.evals = ConfigDict()
  if arg.variant in ("digits", "smoke"):  # CPU scale: the built-in digits, micro towers
    common.digits_image_text(c, arg.variant)
  return common.loop_fields(c)

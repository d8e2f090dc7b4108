"""SLIP ViT-B/16 (Mu et al. 2022): CLIP + SimCLR on two augmented views, shared image tower.

  python -m sslvl_jax.main --config=configs/slip_vitb16.py --workdir=DIR \
      --config.data.splits.train=/data/yfcc15m/train.csv --config.data.tokenizer=tok.model

SLIP's settings (its README for ViT-B/L): batch 4096, 25 epochs, AdamW lr 5e-4, wd 0.5, betas
(0.9, 0.98), 1 warm-up epoch; SSL head 4096-4096-256 with BN, SimCLR temperature 0.1, weight 1.0;
SimCLR-style views (crop 0.08-1, jitter 0.4/0.4/0.4/0.1 p=0.8, grayscale 0.2, blur 0.5).
"""

from ml_collections import ConfigDict

from configs import common

VARIANTS = ("digits", "smoke")


def get_config(arg: str | None = None) -> ConfigDict:
  arg = common.parse_arg(arg, variant="")
  common.check_variant(__file__, arg.variant, VARIANTS)
  c = ConfigDict()
  c.method = "slip"
  c.seed = 0
  c.global_batch_size = 4096
  c.total_epochs = 25
  c.log_every_steps = 100
  c.checkpoint_every_steps = 2000
  c.data = common.data_config(**dict(
      name="csv", splits=dict(train=""), image_size=224, tokenizer="",
                           context_length=77, worker_count=-1, crops="simclr",
                           train_crop_scale=(0.5, 1.0), mean=common.CLIP_MEAN, std=common.CLIP_STD))
  c.augment = ConfigDict(dict(views0=("mocov2",)))
  c.model = ConfigDict(dict(
      image=dict(name="vit_b16", image_size=224), text=dict(name="text_b"),
      ssl_head=dict(hidden_dim=4096, out_dim=256), embed_dim=512, dtype="bfloat16"))
  c.loss = ConfigDict(dict(logit_scale_init=2.6592600369644043, max_logit_scale=100.0,
                           ssl_weight=1.0, ssl_temperature=0.1, chunk_size=0))
  c.optim = ConfigDict(dict(name="adamw", lr=5e-4, b1=0.9, b2=0.98, eps=1e-8, weight_decay=0.5,
                            warmup_epochs=1))
  c.evals = ConfigDict()
  if arg.variant in ("digits", "smoke"):  # CPU scale: the built-in digits, micro towers
    common.digits_image_text(c, arg.variant)
    c.data.update(crops=None, crop_groups=((32, (0.5, 1.0), 2),))
    c.model.ssl_head = ConfigDict(dict(hidden_dim=64, out_dim=32))
  return common.loop_fields(c)

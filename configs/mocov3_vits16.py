"""MoCo v3 ViT-S/16, 300 epochs (Chen, Xie & He 2021; facebookresearch/moco-v3 CONFIG.md).

  python -m sslvl_jax.main --config=configs/mocov3_vits16.py --workdir=DIR

Queries predictor(projector(x)), keys from the momentum encoder's projector (no queue); loss
ctr(q1, k2) + ctr(q2, k1) with T = 0.2 (ViT; ResNet-50 uses 1.0), each scaled by 2T; momentum
0.99 -> 1 along a cosine, updated before the key forward. ViT-S with 12 heads (DINO/DeiT use 6),
fixed 2-D sin-cos position embedding, frozen random patch projection (`--stop-grad-conv1`: its
gradient is stopped and it gets no weight decay, so it never moves). Projector 384-4096-4096-256
and predictor 256-4096-256, bias-free, BN after every linear (last BNs without affine). AdamW
lr 1.5e-4 x bs/256 (batch 4096), betas (0.9, 0.999), wd 0.1, 40 warm-up epochs, cosine; BYOL-style
asymmetric augmentations with torchvision semantics, crop scale (0.08, 1). The reference's AdamW
also decays biases and norms; our optimisers never do.
`:digits` trains the same recipe at CPU scale on the built-in digits; `:smoke` runs 4 steps.
"""

from ml_collections import ConfigDict

from configs import common

VARIANTS = ("digits", "smoke")
FROZEN_RANDOM_PATCHES = dict(pos_embed="sincos", freeze_patch_embed=True)


def get_config(arg: str | None = None) -> ConfigDict:
  arg = common.parse_arg(arg, variant="")
  common.check_variant(__file__, arg.variant, VARIANTS)
  c = ConfigDict()
  c.method = "mocov3"
  c.seed = 0
  c.global_batch_size = 4096
  c.total_epochs = 300
  c.log_every_steps = 100
  c.checkpoint_every_steps = 2000
  c.data = common.imagenet_data("mocov3")
  c.augment = ConfigDict(dict(views0=("mocov3_view1", "mocov3_view2")))
  c.model = ConfigDict(dict(
      backbone=dict(name="vit_s16", num_heads=12, **FROZEN_RANDOM_PATCHES),
      heads=dict(projector=dict(name="moco_v3_projector_vit", hidden_dim=4096, out_dim=256),
                 predictor=dict(name="moco_v3_predictor_vit", input="projector", hidden_dim=4096,
                                out_dim=256)),
      dtype="bfloat16"))
  c.teacher = ConfigDict(dict(momentum=0.99, momentum_end=1.0, init="copy",
                              eval_on_teacher=False))  # the query encoder is evaluated
  c.loss = ConfigDict(dict(temperature=0.2, chunk_size=0))
  c.optim = ConfigDict(dict(name="adamw", lr_per_256=1.5e-4, b1=0.9, b2=0.999, weight_decay=0.1,
                            warmup_epochs=40, no_decay_rules=("backbone/patch_embed",)))
  c.evals = ConfigDict(dict(knn=common.knn_eval(20_000)))
  c.collapse_rules = (("train/embed_std", "<", 0.01),)
  if arg.variant in ("digits", "smoke"):  # CPU scale: the built-in digits, micro ViT
    # 8 x 8 digits: 16 px keeps every pixel
    c.data = common.digits_images(crop_groups=((16, (0.35, 1.0), 2),), image_size=16)
    c.model.backbone = common.micro_vit(image_size=16, patch_size=4, **FROZEN_RANDOM_PATCHES)
    c.model.dtype = "float32"
    c.optim.lr_per_256 = 1.5e-3  # AdamW kept, 10x lr: 300 steps instead of 94k
  if arg.variant == "digits":
    c.model.heads.projector.update(hidden_dim=256, out_dim=64)
    c.model.heads.predictor.update(hidden_dim=256, out_dim=64)
    common.digits_ssl_run(c)
  elif arg.variant == "smoke":
    c.model.heads.projector.update(hidden_dim=32, out_dim=16)
    c.model.heads.predictor.update(hidden_dim=32, out_dim=16)
    common.smoke_run(c)
  return common.loop_fields(c)

"""Barlow Twins ResNet-50, 1000 epochs (Zbontar et al. 2021; facebookresearch/barlowtwins).

  python -m sslvl_jax.main --config=configs/barlow_r50.py --workdir=DIR

Loss sum (diag(c) - 1)^2 + 0.0051 sum offdiag(c)^2, c the cross-correlation of the two
batch-normalised (global statistics) projections; projector 8192-8192-8192 (bias-free linears, BN
+ ReLU between); SyncBN, each view in its own forward. LARS (eta 1e-3, momentum 0.9, biases and BN
excluded from decay and adaptation) with separate base lrs 0.2 for weights and 0.0048 for biases
and BN (an lr multiplier of 0.0048 / 0.2), each x bs/256 (batch 2048); wd 1e-6; 10 warm-up
epochs, cosine to 0.001 x the peak (`end_lr` is absolute: set from the batch and lr below, so
recompute it when overriding them on the command line). Augmentations: BYOL's asymmetric set
(blur 1.0 / 0.1, solarise 0 / 0.2) with torchvision semantics, bicubic crops of scale (0.08, 1).
`:digits` trains the same recipe at CPU scale on the built-in digits; `:smoke` runs 4 steps.
`:batch=N` (also `:digits,batch=N`) sets the global batch and the end_lr that follows from it.
"""

from ml_collections import ConfigDict

from configs import common

VARIANTS = ("digits", "smoke")
BIAS_AND_NORM = r"/(bias|scale)$"  # the reference's 1-D parameters: biases and BN scales/offsets


def get_config(arg: str | None = None) -> ConfigDict:
  arg = common.parse_arg(arg, variant="", batch=0)  # batch 0: the recipe's (or variant's)
  common.check_variant(__file__, arg.variant, VARIANTS)
  c = ConfigDict()
  c.method = "barlow_twins"
  c.seed = 0
  c.global_batch_size = 2048
  c.total_epochs = 1000
  c.log_every_steps = 100
  c.checkpoint_every_steps = 2000
  c.data = common.imagenet_data(None, crop_groups=((224, (0.08, 1.0), 2),))
  c.augment = ConfigDict(dict(views0=("mocov3_view1", "mocov3_view2")))  # = BT's transforms
  c.model = ConfigDict(dict(
      backbone=dict(name="resnet50"),
      heads=dict(projector=dict(name="barlow_twins_projector", hidden_dim=8192, out_dim=8192)),
      dtype="bfloat16"))
  c.loss = ConfigDict(dict(lambd=0.0051, scale_loss=1.0))
  c.optim = ConfigDict(dict(name="lars", lr_per_256=0.2, weight_decay=1e-6, momentum=0.9,
                            trust_coefficient=1e-3, warmup_epochs=10,
                            lr_multiplier_rules=((BIAS_AND_NORM, 0.0048 / 0.2),)))
  c.evals = ConfigDict(dict(knn=common.knn_eval(20_000)))
  c.collapse_rules = (("train/embed_std", "<", 0.001),)  # healthy 1/sqrt(8192) = 0.011
  if arg.variant in ("digits", "smoke"):  # CPU scale: the built-in digits, micro ResNet
    common.digits_resnet(c)
    # LARS kept. With eta 1e-3 it takes steps of ~lr x 1e-3 x |w|: at batch 128 the linearly
    # scaled lr (0.1) barely moves the weights in 300 steps: peak 1.0 here (ImageNet's is 1.6).
    c.optim.lr_per_256 = 2.0
  if arg.variant == "digits":
    c.model.heads.projector.update(hidden_dim=256, out_dim=128)
    common.digits_ssl_run(c)
  elif arg.variant == "smoke":
    c.model.heads.projector.update(hidden_dim=32, out_dim=16)
    common.smoke_run(c)
  if arg.batch:
    c.global_batch_size = arg.batch
  c.optim.end_lr = 0.001 * c.optim.lr_per_256 * c.global_batch_size / 256  # cosine to 0.001 x peak
  return common.loop_fields(c)

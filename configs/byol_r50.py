"""BYOL ResNet-50, 1000 epochs (Grill et al. 2020; deepmind-research/byol).

  python -m sslvl_jax.main --config=configs/byol_r50.py --workdir=DIR

LARS lr 0.2 x bs/256, wd 1.5e-6 (no decay/adaptation on biases and BN), 10 warm-up epochs, cosine;
target momentum 0.996 -> 1 (cosine), target initialised with its own seed as the reference;
asymmetric augmentations (blur 1.0 / 0.1, solarise 0 / 0.2), additive brightness.
`:digits` trains the same recipe at CPU scale on the built-in digits; `:smoke` runs 4 steps.
"""

from ml_collections import ConfigDict

from configs import common

VARIANTS = ("digits", "smoke")


def get_config(arg: str | None = None) -> ConfigDict:
  arg = common.parse_arg(arg, variant="")
  common.check_variant(__file__, arg.variant, VARIANTS)
  c = ConfigDict()
  c.method = "byol"
  c.seed = 0
  c.global_batch_size = 4096
  c.total_epochs = 1000
  c.log_every_steps = 100
  c.checkpoint_every_steps = 2000
  c.data = common.imagenet_data("byol")
  c.augment = ConfigDict(dict(views0=("byol_view1", "byol_view2")))
  c.model = ConfigDict(dict(
      backbone=dict(name="resnet50"),
      heads=dict(projector=dict(name="byol_projector", hidden_dim=4096, out_dim=256),
                 predictor=dict(name="byol_predictor", input="projector", hidden_dim=4096,
                                out_dim=256)),
      dtype="bfloat16"))
  c.teacher = ConfigDict(dict(momentum=0.996, momentum_end=1.0, init="independent",
                              eval_on_teacher=False))
  c.loss = ConfigDict()
  c.optim = ConfigDict(dict(name="lars", lr_per_256=0.2, weight_decay=1.5e-6, momentum=0.9,
                            trust_coefficient=1e-3, warmup_epochs=10))
  c.evals = ConfigDict(dict(knn=common.knn_eval(20_000)))
  c.collapse_rules = (("train/embed_std", "<", 0.01),)
  if arg.variant in ("digits", "smoke"):  # CPU scale: the built-in digits, micro ViT
    c.data = common.digits_images(crop_groups=((32, (0.7, 1.0), 2),))
    c.model.backbone = common.micro_vit()
    c.model.dtype = "float32"
  if arg.variant == "digits":
    c.model.heads.projector.update(hidden_dim=256, out_dim=64)
    c.model.heads.predictor.update(hidden_dim=256, out_dim=64)
    c.teacher.momentum = 0.99
    # AdamW instead of LARS: the paper's LARS settings assume batches of 512-4096.
    c.optim = ConfigDict(dict(name="adamw", lr=1e-3, weight_decay=0.05))
    common.digits_ssl_run(c, steps=1500)
  elif arg.variant == "smoke":
    c.model.heads.projector.update(hidden_dim=32, out_dim=16)
    c.model.heads.predictor.update(hidden_dim=32, out_dim=16)
    common.smoke_run(c)
  return common.loop_fields(c)

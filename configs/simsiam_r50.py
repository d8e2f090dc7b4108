"""SimSiam ResNet-50, 100 epochs (Chen & He 2021; facebookresearch/simsiam).

  python -m sslvl_jax.main --config=configs/simsiam_r50.py --workdir=DIR

SGD lr 0.05 x bs/256 (batch 512), momentum 0.9, wd 1e-4, cosine without warmup, predictor at a
fixed lr (--fix-pred-lr, used for the released runs); projector 3 x 2048 with BN (last BN without
affine), predictor 2048-512-2048; MoCo v2 augmentations; zero-init residual. Negative cosine with
stop-gradient, the two directions averaged. `loss.stop_gradient=False` is the paper's collapsing
ablation. `:digits` / `:smoke` as in every recipe.
"""

from ml_collections import ConfigDict

from configs import common

VARIANTS = ("digits", "smoke")


def get_config(arg: str | None = None) -> ConfigDict:
  arg = common.parse_arg(arg, variant="")
  common.check_variant(__file__, arg.variant, VARIANTS)
  c = ConfigDict()
  c.method = "simsiam"
  c.seed = 0
  c.global_batch_size = 512
  c.total_epochs = 100
  c.log_every_steps = 100
  c.checkpoint_every_steps = 2000
  c.data = common.imagenet_data("simsiam")
  c.augment = ConfigDict(dict(views0=("simsiam",)))
  c.model = ConfigDict(dict(
      backbone=dict(name="resnet50", zero_init_residual=True),
      heads=dict(projector=dict(name="simsiam_projector", hidden_dim=2048, out_dim=2048),
                 predictor=dict(name="simsiam_predictor", input="projector", hidden_dim=512,
                                out_dim=2048)),
      dtype="bfloat16"))
  c.loss = ConfigDict(dict(stop_gradient=True))
  c.optim = ConfigDict(dict(name="sgd", lr_per_256=0.05, weight_decay=1e-4, momentum=0.9,
                            warmup_steps=0, constant_lr_rules=("predictor",)))
  c.evals = ConfigDict(dict(knn=common.knn_eval(20_000)))
  # The projector ends in BN, so a collapsing z keeps its per-dimension std while its effective
  # rank falls (the no-stop-gradient ablation): the RankMe rule catches it (threshold: README).
  c.collapse_rules = (("train/embed_std", "<", 0.01), ("train/rankme", "<", 7.0))
  if arg.variant in ("digits", "smoke"):  # CPU scale: the built-in digits, micro ViT
    c.data = common.digits_images(crop_groups=((32, (0.7, 1.0), 2),))
    c.model.backbone = common.micro_vit()
    c.model.heads.projector.update(hidden_dim=128, out_dim=128)
    c.model.heads.predictor.update(hidden_dim=32, out_dim=128)
    c.model.dtype = "float32"
  if arg.variant == "digits":
    # AdamW instead of SGD (the predictor still at a constant lr): SGD's settings assume batch 512.
    c.optim = ConfigDict(dict(name="adamw", lr=1e-3, weight_decay=0.05,
                              constant_lr_rules=c.optim.constant_lr_rules))
    common.digits_ssl_run(c, steps=1500)
  elif arg.variant == "smoke":
    common.smoke_run(c)
    c.optim.warmup_steps = 0
  return common.loop_fields(c)

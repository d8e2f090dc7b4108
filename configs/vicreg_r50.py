"""VICReg ResNet-50, 1000 epochs (Bardes, Ponce & LeCun 2022; facebookresearch/vicreg).

  python -m sslvl_jax.main --config=configs/vicreg_r50.py --workdir=DIR

Loss 25 x MSE + 25 x variance hinge (std eps 1e-4) + 1 x off-diagonal covariance, statistics on
the gradient-carrying all-gather of the global batch; projector 8192-8192-8192 (linears with bias,
BN + ReLU between, last linear without bias). The rest follows the reference, which shares Barlow
Twins' settings (barlow_r50.py): LARS base lr 0.2 x bs/256 for every parameter (batch 2048; no
separate bias lr), wd 1e-6, 10 warm-up epochs, cosine to 0.001 x the peak (`end_lr` is absolute:
set from the batch and lr below), the same augmentations.
`:digits` trains the same recipe at CPU scale on the built-in digits; `:smoke` runs 4 steps.
`:batch=N` (also `:digits,batch=N`) sets the global batch and the end_lr that follows from it.
"""

from ml_collections import ConfigDict

from configs import common

VARIANTS = ("digits", "smoke")


def get_config(arg: str | None = None) -> ConfigDict:
  arg = common.parse_arg(arg, variant="", batch=0)  # batch 0: the recipe's (or variant's)
  common.check_variant(__file__, arg.variant, VARIANTS)
  c = ConfigDict()
  c.method = "vicreg"
  c.seed = 0
  c.global_batch_size = 2048
  c.total_epochs = 1000
  c.log_every_steps = 100
  c.checkpoint_every_steps = 2000
  c.data = common.imagenet_data(None, crop_groups=((224, (0.08, 1.0), 2),))
  c.augment = ConfigDict(dict(views0=("mocov3_view1", "mocov3_view2")))  # = BT's transforms
  c.model = ConfigDict(dict(
      backbone=dict(name="resnet50"),
      heads=dict(projector=dict(name="vicreg_projector", hidden_dim=8192, out_dim=8192)),
      dtype="bfloat16"))
  c.loss = ConfigDict(dict(sim_coeff=25.0, std_coeff=25.0, cov_coeff=1.0))
  c.optim = ConfigDict(dict(name="lars", lr_per_256=0.2, weight_decay=1e-6, momentum=0.9,
                            trust_coefficient=1e-3, warmup_epochs=10))
  c.evals = ConfigDict(dict(knn=common.knn_eval(20_000)))
  c.collapse_rules = (("train/embed_std", "<", 0.001),)
  if arg.variant in ("digits", "smoke"):  # CPU scale: the built-in digits, micro ResNet
    common.digits_resnet(c)
  if arg.variant == "digits":
    c.model.heads.projector.update(hidden_dim=256, out_dim=128)
    c.optim.lr_per_256 = 4.0  # LARS kept; a higher peak than the linear scaling, as Barlow's
    common.digits_ssl_run(c)
  elif arg.variant == "smoke":
    c.model.heads.projector.update(hidden_dim=32, out_dim=16)
    c.optim.lr_per_256 = 2.0
    common.smoke_run(c)
  if arg.batch:
    c.global_batch_size = arg.batch
  c.optim.end_lr = 0.001 * c.optim.lr_per_256 * c.global_batch_size / 256  # cosine to 0.001 x peak
  return common.loop_fields(c)

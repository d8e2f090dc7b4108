"""VICReg ResNet-50, 1000 epochs (Bardes, Ponce & LeCun 2022; facebookresearch/vicreg).

  python -m sslvl_jax.main --config=configs/vicreg_r50.py --workdir=DIR

Loss 25 x MSE + 25 x variance hinge (std eps 1e-4) + 1 x off-diagonal covariance, statistics on
the gradient-carrying all-gather of the global batch; projector 8192-8192-8192 (linears with bias,
BN + ReLU between, last linear without bias). Otherwise Barlow Twins' recipe (barlow_r50.py):
LARS base lr 0.2 x bs/256 for every parameter (batch 2048), wd 1e-6, 10 warm-up epochs, cosine to
0.001 x the peak, the same augmentations.
`:digits` trains the same recipe at CPU scale on the built-in digits; `:smoke` runs 4 steps.
"""

from ml_collections import ConfigDict

from configs import barlow_r50, common

VARIANTS = barlow_r50.VARIANTS


def get_config(arg: str | None = None) -> ConfigDict:
  common.check_variant(__file__, arg, VARIANTS)
  c = barlow_r50.get_config(arg)
  c.method = "vicreg"
  c.model.heads.projector.name = "vicreg_projector"
  c.loss = ConfigDict(dict(sim_coeff=25.0, std_coeff=25.0, cov_coeff=1.0))
  del c.optim["lr_multiplier_rules"]
  if arg == "digits":
    c.optim.lr_per_256 = 4.0
    barlow_r50.set_end_lr(c)
  return c

"""SimCLR ResNet-50, 1000 epochs (Chen et al. 2020, v1 recipe; google-research/simclr).

  python -m sslvl_jax.main --config=configs/simclr_r50.py --workdir=DIR

NT-Xent over the 2N views of the global batch, temperature 0.1 (ImageNet flag default; 0.5 is the
README's CIFAR command), the two directions summed; projection head 2048-2048-2048-128
(num_proj_layers=3, BN after every linear, last BN with scale only), both views in one forward
(BN statistics over the 2N views, SyncBN across devices). LARS lr 0.3 x bs/256 (batch 4096),
momentum 0.9, trust 1e-3, no decay/adaptation on biases and BN, 10 warm-up epochs, cosine to 0.
Weight decay 1e-6: the v1 paper's value and the reference code's flag default; the README's
ImageNet command uses 1e-4 (`--config.optim.weight_decay=1e-4`). Our LARS applies the lr outside
the momentum (optax); SimCLR's "classic momentum" applies it inside, which differs only while the
lr changes. SimCLR v2 augmentations; the model sees [0, 1] images (no mean/std normalisation), in
training and, through the preset, in evaluation.
`:digits` trains the same recipe at CPU scale on the built-in digits; `:smoke` runs 4 steps.
"""

from ml_collections import ConfigDict

from configs import common

VARIANTS = ("digits", "smoke")


def get_config(arg: str | None = None) -> ConfigDict:
  arg = common.parse_arg(arg, variant="")
  common.check_variant(__file__, arg.variant, VARIANTS)
  c = ConfigDict()
  c.method = "simclr"
  c.seed = 0
  c.global_batch_size = 4096
  c.total_epochs = 1000
  c.log_every_steps = 100
  c.checkpoint_every_steps = 2000
  c.data = common.imagenet_data("simclr")
  c.augment = ConfigDict(dict(views0=("simclr",)))
  c.model = ConfigDict(dict(
      backbone=dict(name="resnet50"),
      heads=dict(projector=dict(name="simclr_projector", hidden_dim=2048, out_dim=128,
                                num_layers=3)),
      dtype="bfloat16"))
  c.loss = ConfigDict(dict(temperature=0.1, chunk_size=0))
  c.optim = ConfigDict(dict(name="lars", lr_per_256=0.3, weight_decay=1e-6, momentum=0.9,
                            trust_coefficient=1e-3, warmup_epochs=10))
  c.evals = ConfigDict(dict(knn=common.knn_eval(20_000)))
  c.collapse_rules = (("train/embed_std", "<", 0.01),)
  if arg.variant in ("digits", "smoke"):  # CPU scale: the built-in digits, micro ResNet
    common.digits_resnet(c)
    c.loss.temperature = 0.2  # solo-learn's CIFAR value
    c.optim.lr_per_256 = 1.0  # LARS kept
  if arg.variant == "digits":
    c.model.heads.projector.update(hidden_dim=256, out_dim=64)
    common.digits_ssl_run(c)
  elif arg.variant == "smoke":
    c.model.heads.projector.update(hidden_dim=32, out_dim=16)
    common.smoke_run(c)
  return common.loop_fields(c)

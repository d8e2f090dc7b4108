"""Colorization with a ResNet-50 (Zhang, Isola, Efros 2016; richzhang/colorization).

  python -m sslvl_jax.main --config=configs/colorization_r50.py --workdir=DIR

The network sees the L channel of a 176 px crop and predicts, at 1/4 resolution (44 x 44), a
distribution over the quantised in-gamut ab bins (grid 10); cross-entropy against the soft-encoded
targets (5 nearest bins, Gaussian sigma 5), each pixel rebalanced by its colour's rarity (prior
smoothed with sigma 5, mixed with the uniform at 0.5). The reference trains a VGG-style network
for 450k iterations of batch 40 with Adam (lr 3e-5, betas 0.9 / 0.99, weight decay 1e-3); the
ResNet-50 encoder follows Goyal et al. 2019's benchmark of the task. Here the decay is decoupled
(AdamW) and the lr decays by a cosine instead of the reference's steps; a random-resized crop
stands for the reference's random 176 px crop of the 256 px resize. The colour prior is estimated
from the training batches as they stream (sslvl_jax/methods/colorization.py).
`:digits` trains at CPU scale (micro ViT) on crops of the two built-in colour photos (the digits are
grayscale) and is k-NN evaluated on the digits; `:smoke` runs 4 steps.
"""

from ml_collections import ConfigDict

from configs import common

VARIANTS = ("digits", "smoke")


def get_config(arg: str | None = None) -> ConfigDict:
  arg = common.parse_arg(arg, variant="")
  common.check_variant(__file__, arg.variant, VARIANTS)
  c = ConfigDict()
  c.method = "colorization"
  c.seed = 0
  c.global_batch_size = 40
  c.total_steps = 450_000
  c.log_every_steps = 100
  c.checkpoint_every_steps = 10_000
  c.data = common.imagenet_data(None, crop_groups=((176, (0.2, 1.0), 1),))
  c.model = ConfigDict(dict(backbone=dict(name="resnet50"),
                            decoder=dict(hidden_dim=256, num_layers=2), dtype="bfloat16"))
  c.loss = ConfigDict(dict(downsample=4, grid=10, neighbours=5, sigma=5.0, prior_sigma=5.0,
                           prior_mix=0.5))
  c.optim = ConfigDict(dict(name="adamw", lr=3e-5, b1=0.9, b2=0.99, weight_decay=1e-3))
  c.evals = ConfigDict(dict(knn=common.knn_eval(50_000)))
  if arg.variant in ("digits", "smoke"):  # CPU scale: crops of the colour photos, micro ViT
    c.data = common.data_config(name="sample_photos", image_size=32,
                                crop_groups=((32, (0.01, 0.1), 1),))
    # mean pooling: k-NN reads the patch tokens the decoder trains on (it never reads [CLS])
    c.model.backbone = common.micro_vit(pool="mean")
    c.model.dtype = "float32"
  if arg.variant == "digits":
    c.model.decoder.hidden_dim = 64
    c.optim.lr = 1e-3  # the paper's 3e-5 is for batch 40 over 450k steps
    common.train_in_steps(c, batch=128, steps=400, warmup_steps=20, log_every=25,
                          checkpoint_every=1000)
    c.evals = ConfigDict(dict(knn=common.knn_eval(0, batch_size=256, data=dict(name="digits"))))
  elif arg.variant == "smoke":
    c.model.decoder.update(hidden_dim=16, num_layers=1)
    common.smoke_run(c)
  return common.loop_fields(c)

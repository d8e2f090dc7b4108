"""MoCo v2 ResNet-50, 200 epochs (Chen et al. 2020; facebookresearch/moco `--mlp --moco-t 0.2
--aug-plus --cos`).

  python -m sslvl_jax.main --config=configs/mocov2_r50.py --workdir=DIR

Query encoder + momentum key encoder (m = 0.999 constant, a copy at init, updated before the key
forward); queue of K = 65536 L2-normalised keys (K must be a multiple of the global batch); InfoNCE
with T = 0.2, not symmetrised; MLP head 2048-2048-128 without BN. Shuffle BN: BN statistics per
group of 32 examples (the reference's images per GPU at batch 256 on 8 GPUs) in both encoders,
and the key forward runs on a random permutation of the global batch (`model.shuffle_bn`). SGD lr
0.03 x bs/256 (batch 256), momentum 0.9, wd 1e-4, cosine without warm-up; aug+ augmentations.
The reference decays every parameter; our optimisers never decay biases and BN parameters.
`:digits` trains the same recipe at CPU scale on the built-in digits; `:smoke` runs 4 steps.
"""

from ml_collections import ConfigDict

from configs import common

VARIANTS = ("digits", "smoke")


def get_config(arg: str | None = None) -> ConfigDict:
  arg = common.parse_arg(arg, variant="")
  common.check_variant(__file__, arg.variant, VARIANTS)
  c = ConfigDict()
  c.method = "mocov2"
  c.seed = 0
  c.global_batch_size = 256
  c.total_epochs = 200
  c.log_every_steps = 100
  c.checkpoint_every_steps = 5000
  c.data = common.imagenet_data("mocov2")
  c.augment = ConfigDict(dict(views0=("mocov2",)))
  c.model = ConfigDict(dict(
      backbone=dict(name="resnet50"),
      heads=dict(projector=dict(name="moco_v2_projector", hidden_dim=2048, out_dim=128)),
      bn_group_size=32, shuffle_bn=True, dtype="bfloat16"))
  c.teacher = ConfigDict(dict(momentum=0.999, momentum_end=0.999, init="copy",
                              eval_on_teacher=False))  # the query encoder is evaluated
  c.loss = ConfigDict(dict(temperature=0.2, queue_size=65536))
  c.optim = ConfigDict(dict(name="sgd", lr_per_256=0.03, weight_decay=1e-4, momentum=0.9,
                            warmup_steps=0))
  c.evals = ConfigDict(dict(knn=common.knn_eval(20_000)))
  # The BN-free head starts with nearly parallel embeddings (std ~0.3 x healthy) that dip further
  # before spreading out; a real collapse ends near 1e-4.
  c.collapse_rules = (("train/embed_std", "<", 0.001),)
  if arg.variant in ("digits", "smoke"):  # CPU scale: the built-in digits, micro ResNet
    common.digits_resnet(c)
    c.teacher.update(momentum=0.99, momentum_end=0.99)
    c.optim.lr_per_256 = 0.3  # SGD kept, no warm-up; solo-learn's CIFAR MoCo v2+ lr
  if arg.variant == "digits":
    c.model.heads.projector.update(hidden_dim=256, out_dim=64)
    c.model.bn_group_size = 32
    # A queue much shorter than an epoch, as 65536 is 5% of ImageNet: an example's own key from
    # the previous epoch, made by a key encoder that has barely moved, is otherwise often among
    # its negatives (longer queues collapsed: README).
    c.loss.queue_size = 256
    common.train_in_steps(c, batch=128, steps=600, warmup_steps=0, log_every=25,
                          checkpoint_every=1000)
    c.evals = ConfigDict(dict(knn=common.knn_eval(0, batch_size=256)))
  elif arg.variant == "smoke":
    c.model.heads.projector.update(hidden_dim=32, out_dim=16)
    c.model.bn_group_size = 8
    c.loss.queue_size = 64
    common.smoke_run(c)
    c.optim.warmup_steps = 0
  return common.loop_fields(c)

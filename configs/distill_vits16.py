"""Distil a ViT-S/16 student from a frozen ViT-B/16-sized teacher, DeiT's schedule (Touvron et al.
2021; Hinton et al. 2015 for the soft targets).

  python -m sslvl_jax.main --config=configs/distill_vits16.py --workdir=DIR \
      --config.teacher.source=export:/path/to/vitb16_export

AdamW lr 5e-4 x bs/512 (batch 1024), wd 0.05 (none on biases and norms), 5 warm-up epochs, cosine
to 1e-5, 300 epochs, drop path 0.1. The teacher is any pretrained source (export:, checkpoint:,
open_clip:, openai:, dino:; see sslvl_jax/methods/pretrained.py); loss.targets weighs soft logits
(KL at temperature T, x T^2; DeiT's tau = 1), features (cosine or MSE after a linear projector)
and last-layer [CLS] attention (KL per head). No label loss: the data need no labels. DeiT's
RandAugment, Mixup/CutMix and random erasing are not implemented: one random-resized crop,
flip and colour jitter 0.4 per image.
`:digits` distils the quickstart CLIP's image tower (run `bash tools/quickstart.sh` first: it
trains into workdirs/quickstart) into a half-width micro ViT; `:smoke` runs 4 steps from a random
teacher.
"""

from ml_collections import ConfigDict, config_dict

from configs import common

VARIANTS = ("digits", "smoke")


def get_config(arg: str | None = None) -> ConfigDict:
  arg = common.parse_arg(arg, variant="")
  common.check_variant(__file__, arg.variant, VARIANTS)
  c = ConfigDict()
  c.method = "distill"
  c.seed = 0
  c.global_batch_size = 1024
  c.total_epochs = 300
  c.log_every_steps = 100
  c.checkpoint_every_steps = 2000
  c.data = common.imagenet_data(None, crop_groups=((224, (0.08, 1.0), 1),))
  c.augment = ConfigDict(dict(views0=("mean_teacher",)))  # ColorJitter(0.4, 0.4, 0.4, 0.1)
  c.model = ConfigDict(dict(backbone=dict(name="vit_s16", drop_path_rate=0.1), dtype="bfloat16"))
  # source: export:DIR | checkpoint:WORKDIR | open_clip:FILE | openai:FILE | dino:FILE | init:MODEL;
  # role / step: which network and checkpoint of a run (default its k-NN network, the latest);
  # key: the entry of a PyTorch checkpoint (e.g. 'teacher' of a DINO checkpoint).
  c.teacher = ConfigDict(dict(source="", role=config_dict.placeholder(str),
                              step=config_dict.placeholder(int), key=config_dict.placeholder(str)))
  c.loss = ConfigDict(dict(targets=dict(logits=1.0, features=0.0, attention=0.0),
                           temperature=1.0, feature_loss="cosine"))
  c.optim = ConfigDict(dict(name="adamw", lr_per_256=2.5e-4, weight_decay=0.05, end_lr=1e-5,
                            warmup_epochs=5))
  c.evals = ConfigDict(dict(knn=common.knn_eval(20_000)))
  if arg.variant in ("digits", "smoke"):  # CPU scale: the built-in digits, micro ViTs
    c.data = common.digits_images(crop_groups=((32, (0.4, 1.0), 1),))
    c.model.dtype = "float32"
    c.model.backbone = common.micro_vit(width=32, mlp_dim=64)  # half the quickstart tower's width
  if arg.variant == "digits":
    c.teacher.source = "checkpoint:workdirs/quickstart"
    # The CLIP teacher has no classifier: its pooled image features are the target.
    c.loss.targets = ConfigDict(dict(logits=0.0, features=1.0, attention=0.0))
    c.optim = ConfigDict(dict(name="adamw", lr=2e-3, weight_decay=0.05, end_lr=1e-5))
    common.train_in_steps(c, batch=128, steps=1000, warmup_steps=30, log_every=50,
                          checkpoint_every=1000)
    c.evals = ConfigDict(dict(knn=common.knn_eval(0, batch_size=256)))
  elif arg.variant == "smoke":  # every target, a teacher of another patch size and head count
    c.teacher = ConfigDict(dict(source="init:vit_micro", kwargs=dict(patch_size=4, num_heads=4)))
    c.loss.targets = ConfigDict(dict(logits=1.0, features=1.0, attention=1.0))
    common.smoke_run(c)
  return common.loop_fields(c)

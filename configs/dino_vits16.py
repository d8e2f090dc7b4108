"""DINO ViT-S/16, the paper's boosted 300-epoch recipe (Caron et al. 2021; facebookresearch/dino).

  python -m sslvl_jax.main --config=configs/dino_vits16.py --workdir=DIR

Paper settings (not the defaults of facebookresearch/dino's main_dino.py): teacher temperature 0.04
-> 0.07 over 30 epochs (per epoch), 10 local crops, norm_last_layer=False for ViT-S; student
temperature 0.1; center momentum 0.9; teacher momentum 0.996 -> 1 (cosine); AdamW lr 0.0005 x bs/256
(batch 1024), 10 warm-up epochs, cosine to 1e-6; weight decay cosine 0.04 -> 0.4 (no decay on biases
and norms); gradient clipping 3.0 PER TENSOR; last layer frozen for epoch 1; drop path 0.1
(student). k-NN on the teacher's [CLS] features (k=20, T=0.07, resize 256 -> crop 224).
"""

from ml_collections import ConfigDict

from configs import common

VARIANTS = ("digits", "smoke")
ARCH = {"vit_s16": dict(norm_last_layer=False, batch=1024, lr_per_256=0.0005),
        "vit_b16": dict(norm_last_layer=True, batch=1024, lr_per_256=0.00075),
        "resnet50": dict(norm_last_layer=True, batch=4080, lr_per_256=0.03)}


def dino_config(backbone: str, variant: str | None) -> ConfigDict:
  """The DINO recipe for `backbone`; `variant` '' or None (the paper's) or one of VARIANTS."""
  a = ARCH[backbone]
  c = ConfigDict()
  c.method = "dino"
  c.seed = 0
  c.global_batch_size = a["batch"]
  c.total_epochs = 300 if backbone.startswith("vit") else 800
  c.log_every_steps = 100
  c.checkpoint_every_steps = 2000
  c.data = common.imagenet_data("dino")
  c.augment = ConfigDict(dict(views0=("dino_global1", "dino_global2"), views1=("dino_local",)))
  # ViTs resize position embeddings for the 96 px local crops as DINO's interpolate_pos_encoding
  bb = (dict(name=backbone, drop_path_rate=0.1, pos_interp="dino") if backbone.startswith("vit")
        else dict(name=backbone))
  c.model = ConfigDict(dict(
      backbone=bb,
      heads=dict(head=dict(name="dino", out_dim=65536, hidden=2048, bottleneck=256,
                           norm_last_layer=a["norm_last_layer"], use_bn=False)),
      dtype="bfloat16"))
  c.teacher = ConfigDict(dict(momentum=0.996, momentum_end=1.0, init="copy", eval_on_teacher=True))
  c.loss = ConfigDict(dict(student_temp=0.1, teacher_temp=0.07, warmup_teacher_temp=0.04,
                           teacher_temp_warmup_epochs=30, center_momentum=0.9))
  c.optim = ConfigDict(dict(name="adamw", lr_per_256=a["lr_per_256"], end_lr=1e-6,
                            weight_decay=0.04, weight_decay_end=0.4, warmup_epochs=10,
                            clip_grad_per_tensor=3.0, freeze_rules=(("head/last_layer", 1),)))
  if backbone == "resnet50":  # README suggestion for ResNet-50: SGD, wd 1e-4, other crop scales
    c.optim.update(name="sgd", weight_decay=1e-4, weight_decay_end=1e-4, clip_grad_per_tensor=0.0)
    c.data.crops = None
    c.data.crop_groups = ((224, (0.14, 1.0), 2), (96, (0.05, 0.14), 10))
  c.evals = ConfigDict(dict(knn=common.knn_eval(20_000)))
  # KL -> 0: the student copies a collapsed (uniform or one-hot) teacher. Top mass -> 1: one output
  # takes the teacher's mass for every image (no centering); thresholds from measured runs (README).
  c.collapse_rules = (("train/kl_teacher_student", "<", 1e-4), ("train/teacher_top_mass", ">", 0.8))
  if variant in ("digits", "smoke"):  # CPU scale: the built-in digits, small head
    c.model.heads.head.update(hidden=128, bottleneck=32)
    c.model.dtype = "float32"
    c.optim.freeze_rules = (("head/last_layer", 0.5),)
    c.teacher.momentum = 0.99
  if variant == "digits":
    # The micro ViT for every backbone (a random ResNet-18 is already near its DINO k-NN here:
    # README), 2 global crops only. solo-learn's small-data DINO: BN after the head's hidden
    # layers (use_bn_in_head) and a sharper teacher (0.02) against the uniform collapse.
    c.data = common.digits_images(crop_groups=((32, (0.4, 1.0), 2),))
    common.drop(c.augment, "views1")
    c.model.backbone = common.micro_vit(pool="mean")  # [CLS] barely varies across images at init
    c.model.heads.head.update(out_dim=256, use_bn=True)
    c.loss.update(teacher_temp=0.02, teacher_temp_warmup_epochs=0)
    # Optimiser replaced (the ViTs' AdamW schedule, ResNet-50's SGD): AdamW lr 1e-3, constant wd
    # 0.05 (no end lr, no wd schedule), keeping the last-layer freeze and per-tensor clipping.
    c.optim = ConfigDict(dict(name="adamw", lr=1e-3, weight_decay=0.05,
                              freeze_rules=c.optim.freeze_rules,
                              clip_grad_per_tensor=c.optim.clip_grad_per_tensor))
    common.train_in_steps(c, batch=128, steps=1000, warmup_steps=30, log_every=25,
                          checkpoint_every=1000)
    c.evals = ConfigDict(dict(knn=common.knn_eval(0, batch_size=256)))
  elif variant == "smoke":  # keeps the ResNet and multi-crop so that the tests run them
    c.data = common.digits_images(crop_groups=((32, (0.4, 1.0), 2), (16, (0.1, 0.4), 4)))
    c.model.backbone = common.micro_resnet() if backbone == "resnet50" else common.micro_vit()
    c.model.heads.head.out_dim = 32
    c.loss.teacher_temp_warmup_epochs = 5  # the per-epoch schedule runs in the tests
    common.smoke_run(c)
  return common.loop_fields(c)


def get_config(arg: str | None = None) -> ConfigDict:
  arg = common.parse_arg(arg, variant="")
  common.check_variant(__file__, arg.variant, VARIANTS)
  return dino_config("vit_s16", arg.variant)

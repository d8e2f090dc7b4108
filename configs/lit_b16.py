"""LiT B/16: a locked pretrained ViT-B/16 image tower, a text tower trained from scratch (Zhai et
al. 2022; big_vision's LiT configs).

  python -m sslvl_jax.main --config=configs/lit_b16.py --workdir=DIR \
      --config.model.image_init.source=export:/path/to/vitb16_export \
      --config.data.splits.train="/data/cc12m/{00000..01242}.tar" --config.data.tokenizer=tok.model

Contrastive (CLIP) loss, batch 16384, lr 1e-3, wd 1e-4, 10k warm-up steps, cosine; the image tower
and its projection are locked (no update, no weight decay, no optimiser state: optim.lock_rules),
as LiT's 'Lu' setting; model.lock_image_head=False trains the projection. big_vision trains with
Adafactor; AdamW here. The image tower's architecture (model.image) must match the source's, and
data.mean/std the normalisation it was trained with.
`:digits` locks the quickstart CLIP's image tower (run `bash tools/quickstart.sh` first: it
trains into workdirs/quickstart) and trains a new text tower; `:smoke` runs 4 steps on a random
locked tower.
"""

from ml_collections import ConfigDict, config_dict

from configs import common

VARIANTS = ("digits", "smoke")


def get_config(arg: str | None = None) -> ConfigDict:
  arg = common.parse_arg(arg, variant="")
  common.check_variant(__file__, arg.variant, VARIANTS)
  c = ConfigDict()
  c.method = "lit"
  c.seed = 0
  c.global_batch_size = 16384
  c.total_examples = 900_000_000  # 55k steps: LiT's shorter runs (its best models see up to 18B)
  c.log_every_steps = 100
  c.checkpoint_every_steps = 2000
  c.data = common.data_config(**dict(
      name="webdataset", splits=dict(train=""), image_size=224, tokenizer="", context_length=16,
      worker_count=-1, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)))  # big_vision's [-1, 1] inputs
  # image_init: where the locked tower comes from (see sslvl_jax/methods/pretrained.py).
  c.model = ConfigDict(dict(
      image=dict(name="vit_b16", image_size=224),
      image_init=dict(source="", role=config_dict.placeholder(str),
                      step=config_dict.placeholder(int), key=config_dict.placeholder(str)),
      lock_image_head=True, text=dict(name="text_b"), embed_dim=768, dtype="bfloat16"))
  c.loss = ConfigDict(dict(logit_scale_init=2.302585092994046,  # log(10), big_vision's init
                           max_logit_scale=100.0, chunk_size=0))
  c.optim = ConfigDict(dict(name="adamw", lr=1e-3, b1=0.9, b2=0.999, weight_decay=1e-4,
                            warmup_steps=10_000, lock_rules=("^image/", "^image_proj/")))
  c.evals = ConfigDict(dict(
      imagenet_zero_shot=dict(type="zero_shot", split="validation",
                              data=dict(name="tfds", dataset="imagenet2012", image_size=224),
                              classnames="imagenet", templates="imagenet",
                              every_steps=10_000, batch_size=1024)))
  if arg.variant in ("digits", "smoke"):  # CPU scale: the built-in digits, micro towers
    c.data = common.digits_data()
    common.micro_towers(c, embed_dim=64)
    c.model.dtype = "float32"
  if arg.variant == "digits":
    c.model.image_init.source = "checkpoint:workdirs/quickstart"
    c.optim.update(lr=2e-3, weight_decay=1e-4)
    common.train_in_steps(c, batch=128, steps=400, warmup_steps=40, log_every=50,
                          checkpoint_every=400)
    c.evals = ConfigDict(dict(zero_shot=common.digits_zero_shot()))
  elif arg.variant == "smoke":
    c.model.image_init = ConfigDict(dict(source="init:vit_micro"))
    common.smoke_run(c)
  return common.loop_fields(c)

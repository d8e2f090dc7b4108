"""ALIGN (Jia et al. 2021) with a ViT-B/16 image tower and a BERT-style text encoder.

  python -m sslvl_jax.main --config=configs/align_vitb16.py --workdir=DIR \
      --config.data.splits.train="/data/pairs/{00000..09999}.tar" --config.data.tokenizer=tok.model

The paper's loss: softmax contrastive with label smoothing 0.1 and a learnable normalised-softmax
temperature initialised at 1.0 (log scale 0, no clamp); text encoder bidirectional with [CLS]
pooling; LAMB, lr 1e-3, wd 1e-5, 10k warm-up steps, batch 16384, 1.2M steps. The paper's image
tower is EfficientNet-L2 at 289 px; here ViT-B/16 at 224 (EfficientNet is not provided).
"""

from ml_collections import ConfigDict

from configs import common

VARIANTS = ("digits", "smoke")


def get_config(arg: str | None = None) -> ConfigDict:
  arg = common.parse_arg(arg, variant="")
  common.check_variant(__file__, arg.variant, VARIANTS)
  c = ConfigDict()
  c.method = "clip"
  c.seed = 0
  c.global_batch_size = 16384
  c.total_steps = 1_200_000
  c.log_every_steps = 100
  c.checkpoint_every_steps = 2000
  c.data = common.data_config(**dict(
      name="webdataset", splits=dict(train=""), image_size=224, tokenizer="",
                           context_length=64, worker_count=-1, mean=common.CLIP_MEAN,
                           std=common.CLIP_STD))
  c.model = ConfigDict(dict(
      image=dict(name="vit_b16", image_size=224),
      text=dict(name="text_l", causal=False, pool="first"),
      embed_dim=640, dtype="bfloat16"))
  c.loss = ConfigDict(dict(logit_scale_init=0.0, max_logit_scale=None, label_smoothing=0.1,
                           chunk_size=0))
  c.optim = ConfigDict(dict(name="lamb", lr=1e-3, weight_decay=1e-5, warmup_steps=10_000))
  c.evals = ConfigDict()
  if arg.variant in ("digits", "smoke"):  # CPU scale: the built-in digits, micro towers; LAMB kept
    common.digits_image_text(c, arg.variant)
  return common.loop_fields(c)

"""Export a trained encoder from a run's checkpoint (backbone only, unsharded, no optimiser).

  python -m sslvl_jax.export --config=configs/dino_vits16.py --workdir=DIR [--step=N] \
      [--role=teacher|student] [--out=DIR/export] [--torch=DIR/export/timm.safetensors]

Writes model.safetensors + config.json (architecture, teacher or student, image size and
normalisation, tokenizer file and framing rules for text towers); `sslvl_jax.load_encoder(dir)`
gives back a jitted uint8 images -> embeddings function. `--torch` also writes the open_clip /
timm state-dict layout for PyTorch users.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

from absl import flags, logging
from etils import epath
from ml_collections import config_flags

from sslvl_jax import cli
from sslvl_jax.errors import ConfigError
from sslvl_jax.workdir import is_url

_CONFIG = config_flags.DEFINE_config_file("config", None, "the run's recipe config", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "the training run's directory")
_STEP = flags.DEFINE_integer("step", None, "checkpoint step (default: the latest)")
_ROLE = flags.DEFINE_enum("role", None, ["teacher", "student"],
                          "which network (default: the one the k-NN evaluator uses)")
_OUT = flags.DEFINE_string("out", None, "output directory (default WORKDIR/export)")
_TORCH = flags.DEFINE_string("torch", None, "also write a PyTorch-layout .safetensors here")


def export(config, workdir: str, out_dir: str, *, step: int | None = None,
           role: str | None = None) -> str:
  """Write the encoder of checkpoint `step` of `workdir` to `out_dir`; returns `out_dir`."""
  from sslvl_jax import train  # pylint: disable=g-import-not-at-top
  from sslvl_jax.methods.image_text import ImageText  # pylint: disable=g-import-not-at-top
  s = train.setup(config, workdir, step=step)
  if int(s.state.step) == 0:
    raise ConfigError(f"no checkpoint in {workdir}: train first, or pass --step")
  m, st = s.method, s.state
  has_teacher = "teacher" in (st.extras or {})
  role = role or ("teacher" if has_teacher and s.config.get("teacher", {}).get(
      "eval_on_teacher", False) else "student")
  if role == "teacher" and not has_teacher:
    raise ConfigError(f"method {s.config.method!r} has no teacher; use --role=student")
  net = m.teacher_model(st.extras["teacher"]) if role == "teacher" else m.merge(st.params,
                                                                              st.model_state)
  info = {"role": role, "step": int(st.step), "method": s.config.method}
  if isinstance(m, ImageText):
    for extra_head in ("ssl_head",):  # method-only heads are not part of the encoder
      if hasattr(net, extra_head):
        delattr(net, extra_head)
    spec = data_tokenizer_spec(s.config)
    info.update(tower="image_text", preprocessing=image_preprocessing(s.config, m),
                tokenizer={"model_path": spec.model_path, "context_length": spec.context_length,
                           "lowercase": spec.lowercase, "pad_id": spec.pad_id,
                           "bos_id": spec.bos_id, "eot_id": spec.eot_id,
                           "framing": "[BOS] pieces [EOT] [PAD]...; EOT kept on truncation",
                           "pool": s.config.model.text.get("pool", "first_eot")})
    model_config, module = m.model_config(), net
  else:
    info.update(tower="image", preprocessing=image_preprocessing(s.config, m))
    model_config, module = m.backbone_config(), net.backbone
  save_encoder(out_dir, module, model_config, info)
  s.ckpt.close()
  return out_dir


def save_encoder(out_dir: str, module: Any, model_config: dict, info: dict) -> None:
  """interop.save_encoder to `out_dir`; a gs:// one is written to a local temp dir and uploaded."""
  from sslvl_jax import interop  # pylint: disable=g-import-not-at-top
  if not is_url(out_dir):
    interop.save_encoder(out_dir, module, model_config, info)
    return
  with tempfile.TemporaryDirectory() as tmp:
    interop.save_encoder(tmp, module, model_config, info)
    for f in epath.Path(tmp).iterdir():
      (epath.Path(out_dir) / f.name).write_bytes(f.read_bytes())


def data_tokenizer_spec(config):
  """The run's tokenizer spec."""
  from sslvl_jax import data  # pylint: disable=g-import-not-at-top
  return data.tokenizer_spec(config.data)


def image_preprocessing(config, method) -> dict:
  """Image size and 0-1-scale mean/std the encoder expects (what training used)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  probe = np.stack([np.zeros((1, 1, 3), np.uint8), np.full((1, 1, 3), 255, np.uint8)])
  lo, hi = (np.asarray(x).reshape(-1) for x in method.normalize(jnp.asarray(probe)))
  std = 1.0 / (hi - lo)
  mean = -lo * std
  return {"image_size": int(config.data.image_size), "mean": [float(v) for v in mean],
          "std": [float(v) for v in std], "resize": "shorter side, bicubic, then centre crop",
          "eval_resize_ratio": float(config.data.get("eval_resize_ratio", 1.0))}


def main(argv: list[str]) -> None:
  del argv
  cli.required(config=_CONFIG.value, workdir=_WORKDIR.value)
  logging.set_verbosity(logging.WARNING)
  out = _OUT.value or os.path.join(_WORKDIR.value, "export")
  export(_CONFIG.value, _WORKDIR.value, out, step=_STEP.value, role=_ROLE.value)
  print(f"exported to {out}")
  if _TORCH.value:
    from sslvl_jax import interop  # pylint: disable=g-import-not-at-top
    interop.export_to_torch(out, _TORCH.value)
    print(f"PyTorch layout: {_TORCH.value}")


if __name__ == "__main__":
  cli.run(main)

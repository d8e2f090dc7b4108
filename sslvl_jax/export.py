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

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The CLI flags, defined only when run as a program (importing this module defines none, so
  it imports beside the other CLIs)."""
  config_flags.DEFINE_config_file("config", None, "the run's recipe config", lock_config=True)
  flags.DEFINE_string("workdir", None, "the training run's directory")
  flags.DEFINE_integer("step", None, "checkpoint step (default: the latest)")
  flags.DEFINE_enum("role", None, ["teacher", "student"],
                    "which network (default: the one the evaluators use)")
  flags.DEFINE_string("out", None, "output directory (default WORKDIR/export)")
  flags.DEFINE_string("torch", None, "also write a PyTorch-layout .safetensors here")


def export(config, workdir: str, out_dir: str, *, step: int | None = None,
           role: str | None = None) -> str:
  """Write the encoder of checkpoint `step` of `workdir` to `out_dir`; returns `out_dir`.

  What is exported (which network, which of its parts, with what preprocessing) is the method's
  `export_encoder`; this only restores the state and writes the files.
  """
  from sslvl_jax import train  # pylint: disable=g-import-not-at-top
  s = train.setup(config, workdir, step=step)
  try:
    st = s.state
    if int(st.step) == 0:
      raise ConfigError(f"no checkpoint in {workdir}: train first, or pass --step")
    model_config, module, info = s.method.export_encoder(st.params, st.model_state, st.extras,
                                                         role=role)
    info = dict(info)
    info = {"role": info.pop("role"), "step": int(st.step), "method": s.config.method, **info}
    save_encoder(out_dir, module, model_config, info)
  finally:
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


def main(argv: list[str]) -> None:
  del argv
  cli.required(config=FLAGS.config, workdir=FLAGS.workdir)
  logging.set_verbosity(logging.WARNING)
  out = FLAGS.out or os.path.join(FLAGS.workdir, "export")
  export(FLAGS.config, FLAGS.workdir, out, step=FLAGS.step, role=FLAGS.role)
  print(f"exported to {out}")
  if FLAGS.torch:
    from sslvl_jax import interop  # pylint: disable=g-import-not-at-top
    interop.export_to_torch(out, FLAGS.torch)
    print(f"PyTorch layout: {FLAGS.torch}")


if __name__ == "__main__":
  define_flags()
  cli.run(main)

"""Fine-tune a pretrained image encoder with a new linear head (MAE / BEiT recipe).

  python -m sslvl_jax.finetune --config=configs/finetune.py[:digits|:smoke] --workdir=DIR \
      --from=SRC [--from_step=N] [--role=teacher|student]

SRC is a training workdir of any method (its encoder as `Method.export_encoder` gives it), an
exported encoder directory (`sslvl_jax.export`, `sslvl_jax.interop`), or any source of
`sslvl_jax.methods.pretrained` as kind:path (open_clip:FILE, openai:FILE, dino:FILE, init:MODEL
for a from-scratch baseline); its image encoder is exported once to WORKDIR/pretrained, which
the run trains from (a resume reads only that). Training is the ordinary loop (sslvl_jax.train:
mesh, data pipeline, checkpoints, resume by rerunning the same command) on the `finetune` method,
with layer-wise lr decay as `optim.lr_multiplier_rules` made from the encoder's parameter paths.
The classifier evaluators' test top-1 is printed and written to WORKDIR/finetune_result.json.
"""

from __future__ import annotations

import copy
import json
import os

from absl import flags, logging
from etils import epath
from ml_collections import ConfigDict, config_flags

from sslvl_jax import cli
from sslvl_jax.preemption import StopSignal

RESULT_FILE = "finetune_result.json"


def is_export(path: str) -> bool:
  """Whether `path` holds an exported encoder (a training workdir has a config.json too)."""
  from sslvl_jax.interop import export  # pylint: disable=g-import-not-at-top
  return all(os.path.isfile(os.path.join(path, f)) for f in (export.CONFIG_FILE,
                                                             export.WEIGHTS_FILE))


def as_source(source: str) -> str:
  """`--from` as a `sslvl_jax.methods.pretrained` source: `kind:path` as given; a bare path is an
  export directory (export:) if it holds one, else a training workdir (checkpoint:)."""
  from sslvl_jax.methods import pretrained  # pylint: disable=g-import-not-at-top
  if source.partition(":")[0] in pretrained.SOURCES:
    return source
  return f"{'export' if is_export(source) else 'checkpoint'}:{source}"


def write_pretrained(config: ConfigDict, source: str, out: str, *, step: int | None = None,
                     role: str | None = None) -> None:
  """The image encoder of `source` (checkpoint `step`, network `role` of a training workdir)
  exported to `out`, with its preprocessing (a randomly initialised `init:` one: the data's)."""
  from sslvl_jax import interop  # pylint: disable=g-import-not-at-top
  from sslvl_jax.methods import base, pretrained  # pylint: disable=g-import-not-at-top
  p = pretrained.load(ConfigDict(dict(source=as_source(source), step=step, role=role)), "--from")
  model_config, arrays = p.image_tower()
  module = interop.mapping.fill_module(interop.mapping.abstract_module(model_config), arrays,
                                       what=p.source)
  prep = p.preprocessing or {"image_size": config.data.image_size,
                             "mean": list(config.data.get("mean", base.IMAGENET_MEAN)),
                             "std": list(config.data.get("std", base.IMAGENET_STD))}
  interop.save_encoder(out, module, model_config,
                       {"role": "imported", "tower": "image", "preprocessing": prep,
                        "source": p.source})


def resolve(config: ConfigDict, workdir: str, source: str, *, step: int | None = None,
            role: str | None = None) -> ConfigDict:
  """`config` with finetune.init_from (WORKDIR/pretrained, exported from `source` on the first
  call) and finetune.source set, and the layer-decay rules of its encoder prepended to
  optim.lr_multiplier_rules: the run `train.run` trains."""
  from sslvl_jax.interop import mapping  # pylint: disable=g-import-not-at-top
  from sslvl_jax.methods import finetune  # pylint: disable=g-import-not-at-top
  init_from = os.path.join(workdir, "pretrained")
  if not is_export(init_from):
    write_pretrained(config, source, init_from, step=step, role=role)
  tower, _ = finetune.load_pretrained(init_from).image_tower()
  rules = finetune.layer_decay_rules(mapping.abstract_module(tower), config.finetune.layer_decay)
  config = copy.deepcopy(config)
  with config.unlocked():
    config.finetune.init_from, config.finetune.source = init_from, source
    config.optim.lr_multiplier_rules = rules + tuple(
        tuple(r) for r in config.optim.get("lr_multiplier_rules", ()))
  return config


def latest_results(workdir: str, config: ConfigDict) -> dict[str, float]:
  """The newest results of each classifier evaluator of `config` (WORKDIR/evals/*.json)."""
  out = {}
  for name, ev in config.get("evals", {}).items():
    if ev.get("type") != "classifier":
      continue
    files = (epath.Path(workdir) / "evals").glob(f"{name}_*.json")
    saved = [json.loads(f.read_text()) for f in files]
    if saved:
      out.update(max(saved, key=lambda r: r["step"])["results"])
  return out


def finetune(config: ConfigDict, workdir: str, source: str, *, step: int | None = None,
             role: str | None = None, stop: StopSignal | None = None) -> dict:
  """Fine-tune the encoder of `source` in `workdir` (resuming if it holds a checkpoint); returns
  and writes (WORKDIR/finetune_result.json) the classifier evaluators' results with the source."""
  import jax  # pylint: disable=g-import-not-at-top
  from sslvl_jax import config_check, train  # pylint: disable=g-import-not-at-top
  config_check.validate(config)
  config = resolve(config, workdir, source, step=step, role=role)
  train.run(config, workdir, stop=stop)
  result = {"source": source, "init_from": config.finetune.init_from,
            **latest_results(workdir, config)}
  if jax.process_index() == 0:
    (epath.Path(workdir) / RESULT_FILE).write_text(json.dumps(result, indent=1))
  return result


def main() -> None:
  """The command line. Its flags are defined here, so importing this module defines none (the
  library functions above are usable beside sslvl_jax.export's or evaluate's flags)."""
  stop = StopSignal()  # first: a SIGTERM while jax imports and the run is built is not lost
  config = config_flags.DEFINE_config_file(
      "config", None, "fine-tuning config (configs/finetune.py[:digits|:smoke])", lock_config=True)
  workdir = flags.DEFINE_string("workdir", None, "directory for checkpoints, metrics and results")
  source = flags.DEFINE_string("from", None, "a training workdir, an exported encoder directory, "
                                 "or kind:path (open_clip:, openai:, dino:, init:MODEL)")
  step = flags.DEFINE_integer("from_step", None,
                              "checkpoint step of a training workdir (default: the latest)")
  role = flags.DEFINE_enum("role", None, ["teacher", "student"],
                           "which network of a training workdir (default: the one its evaluators "
                           "use)")

  def run(argv: list[str]) -> None:
    del argv
    cli.required(config=config.value, workdir=workdir.value, **{"from": source.value})
    logging.set_verbosity(logging.WARNING)
    import jax  # pylint: disable=g-import-not-at-top
    from sslvl_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
    workdir_lib.prepare(workdir.value)
    lock = workdir_lib.Lock(workdir.value) if jax.process_index() == 0 else None
    try:
      result = finetune(config.value, workdir.value, source.value, step=step.value,
                        role=role.value, stop=stop)
    finally:
      if lock:
        lock.release()
    print(json.dumps(result), flush=True)

  cli.run(run)


if __name__ == "__main__":
  main()

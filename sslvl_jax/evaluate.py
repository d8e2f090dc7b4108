"""Run a config's evaluators on a checkpoint (or on the random initialisation, as a baseline).

  python -m sslvl_jax.evaluate --config=configs/byol_r50.py:digits --workdir=DIR [--step=N] \
      [--role=teacher|student]

--step defaults to the latest checkpoint in WORKDIR; --step=0 (or an empty workdir) evaluates
the randomly initialised network of the same config, the baseline a pretraining run must beat.
Results go to stdout, WORKDIR/metrics.jsonl and WORKDIR/evals/<name>_<step>_<hash>.json, the hash
of the evaluator's settings: evaluating with other settings (templates, class names, data) writes
a new file, and no result file, the training run's included, is ever replaced (see
`evals.tasks.save_result`).
"""

from __future__ import annotations

import json

from absl import flags, logging
from ml_collections import config_flags

from sslvl_jax import cli
from sslvl_jax.errors import ConfigError

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The CLI flags, defined only when run as a program (importing this module defines none, so
  it imports beside the other CLIs)."""
  config_flags.DEFINE_config_file("config", None, "recipe config file", lock_config=True)
  flags.DEFINE_string("workdir", None, "the training run's directory")
  flags.DEFINE_integer("step", None, "checkpoint step (default latest; 0 = random init)")
  flags.DEFINE_enum("role", None, ["teacher", "student"],
                    "which network to evaluate (default: the method's, as in training)")


def evaluate(config, workdir: str, step: int | None = None, role: str | None = None
             ) -> dict[str, float]:
  """Evaluate checkpoint `step` of `workdir` (latest if None, random init if 0 or none saved)
  with the network `role` (None: the method's default, the one training evaluated)."""
  from sslvl_jax import metrics, train  # pylint: disable=g-import-not-at-top
  s = train.setup(config, workdir, step=step, role=role)
  at = int(s.state.step)
  writer = metrics.Writer(workdir)
  writer.log(f"evaluating the {s.role} at "
             f"{'random initialisation' if at == 0 else f'step {at}'} of {workdir}")
  if not s.evaluators:
    raise ConfigError("config.evals is empty: nothing to evaluate")
  out = train.run_evaluators(s.evaluators, s, s.state, at, writer, workdir)
  s.ckpt.close()
  writer.close()
  return out


def main(argv: list[str]) -> None:
  del argv
  cli.required(config=FLAGS.config, workdir=FLAGS.workdir)
  logging.set_verbosity(logging.WARNING)
  res = evaluate(FLAGS.config, FLAGS.workdir, FLAGS.step, FLAGS.role)
  print(json.dumps({k: round(float(v), 5) for k, v in res.items()}))


if __name__ == "__main__":
  define_flags()
  cli.run(main)

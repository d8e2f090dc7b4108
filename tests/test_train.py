"""The training loop end to end: resume exactness, SIGTERM, CLI errors, quickstart smoke run."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import dino_vits16, quickstart
from sslvl_jax import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO}


def small_config(total_steps: int):
  c = quickstart.get_config("smoke")
  c.unlock()
  c.total_steps = total_steps
  c.checkpoint_every_steps = 1000
  c.log_every_steps = 1
  c.evals = {}
  return c


def read_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def final_params(workdir, steps):
  from sslvl_jax import checkpoint  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  mgr = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
  out = mgr.restore(steps, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  del checkpoint
  return jax.tree.leaves(out["state"]["params"])


def test_resume_gives_identical_params_and_metrics(tmp_path):
  full, split = str(tmp_path / "full"), str(tmp_path / "split")
  train.run(small_config(6), full)
  c = small_config(6)
  c.stop_at_step = 3
  train.run(c, split)                       # saves and stops after 3 of the 6 steps
  train.run(small_config(6), split)         # same workdir: resumes at 3
  a, b = read_metrics(full), read_metrics(split)
  assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
  for ra, rb in zip(a, b):
    for k in ("train/loss", "train/grad_norm", "train/lr"):
      assert ra[k] == rb[k], (ra["step"], k)
  for x, y in zip(final_params(full, 6), final_params(split, 6)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_same_config_and_seed_give_bitwise_identical_losses(tmp_path):
  """Nothing but the seed drives a run: host crops, device augmentations, dropout, EMA, centre."""
  def losses(seed, name):
    c = dino_vits16.get_config("smoke")  # multi-crop: the most random pipeline of the recipes
    c.seed, c.total_steps, c.log_every_steps = seed, 6, 1
    c.num_devices = 1  # the mesh is tested elsewhere
    train.run(c, str(tmp_path / name))
    return [(r["train/loss"], r["train/grad_norm"], r["train/teacher_entropy"])
            for r in read_metrics(str(tmp_path / name))]
  first = losses(0, "a")
  assert len(first) == 6
  assert losses(0, "b") == first  # bitwise: floats from json round-trip exactly
  assert all(x != y for x, y in zip(losses(1, "c"), first))


def _main(args, **kw):
  return subprocess.run([sys.executable, "-m", "sslvl_jax.main", *args], cwd=REPO, env=ENV,
                        capture_output=True, text=True, timeout=300, **kw)


@pytest.mark.parametrize("override,needle", [
    ("--config.no_such_key=1", "no_such_key"),
    ("--config.global_batch_size=abc", "global_batch_size"),
    ("--config.global_batch_size=12", "not divisible by the 8 devices"),
    ("--config.method=clipp", "unknown method 'clipp'"),
    ("--config.data.tokenizer=/nonexistent/tok.model", "/nonexistent/tok.model"),
])
def test_cli_errors_name_the_bad_setting(tmp_path, override, needle):
  env = {**ENV, "JAX_NUM_CPU_DEVICES": "8"}
  r = subprocess.run([sys.executable, "-m", "sslvl_jax.main", "--config=configs/quickstart.py:smoke",
                      f"--workdir={tmp_path}", override], cwd=REPO, env=env, capture_output=True,
                     text=True, timeout=300)
  assert r.returncode != 0
  assert needle in r.stderr, r.stderr[-2000:]
  assert "Traceback" not in r.stderr, r.stderr[-2000:]


def test_missing_config_file_is_named(tmp_path):
  r = _main(["--config=configs/nope.py", f"--workdir={tmp_path}"])
  assert r.returncode != 0 and "configs/nope.py" in r.stderr


def test_sigterm_saves_and_rerun_resumes(tmp_path):
  workdir = str(tmp_path / "w")
  args = ["--config=configs/quickstart.py:smoke", f"--workdir={workdir}",
          "--config.total_steps=100000", "--config.checkpoint_every_steps=100000",
          "--config.log_every_steps=1"]
  p = subprocess.Popen([sys.executable, "-m", "sslvl_jax.main", *args], cwd=REPO, env=ENV,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  metrics_file = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + 240
  while time.time() < deadline and not (os.path.exists(metrics_file)
                                         and len(open(metrics_file).readlines()) >= 3):
    time.sleep(0.5)
  p.send_signal(signal.SIGTERM)
  out, _ = p.communicate(timeout=120)
  assert p.returncode == 0, out[-3000:]
  assert "SIGTERM: saved step" in out
  saved = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
  assert saved, out[-2000:]
  r = _main([*args[:2], f"--config.total_steps={saved[-1] + 2}", "--config.log_every_steps=1"])
  assert r.returncode == 0, r.stderr[-3000:]
  assert f"resumed from step {saved[-1]}" in r.stdout + r.stderr
  steps = [row["step"] for row in read_metrics(workdir) if "train/loss" in row]
  assert steps[-2:] == [saved[-1] + 1, saved[-1] + 2]


def test_interrupted_save_leaves_previous_checkpoint_usable(tmp_path):
  workdir = str(tmp_path / "w")
  c = small_config(4)
  c.checkpoint_every_steps = 2
  train.run(c, workdir)
  ckdir = os.path.join(workdir, "checkpoints")
  # What a kill -9 in the middle of saving step 6 leaves behind: an uncommitted temporary dir.
  os.makedirs(os.path.join(ckdir, "6.orbax-checkpoint-tmp-1234", "state"))
  with open(os.path.join(ckdir, "6.orbax-checkpoint-tmp-1234", "state", "garbage"), "w") as f:
    f.write("partial")
  c = small_config(6)
  c.checkpoint_every_steps = 2
  train.run(c, workdir)
  steps = [row["step"] for row in read_metrics(workdir)]
  assert steps == [1, 2, 3, 4, 5, 6]  # resumed from 4, not from the broken 6


def test_quickstart_smoke_runs_with_zero_shot(tmp_path):
  r = _main(["--config=configs/quickstart.py:smoke", f"--workdir={tmp_path}",
             "--config.evals.zero_shot.every_steps=4"])
  assert r.returncode == 0, r.stderr[-3000:]
  rows = read_metrics(str(tmp_path))
  assert any("zero_shot/top1" in row for row in rows)
  assert any(f.startswith("zero_shot_4_") for f in os.listdir(os.path.join(tmp_path, "evals")))
  assert os.path.isdir(os.path.join(tmp_path, "tensorboard"))

"""Two local processes (4 CPU devices each, jax.distributed on 127.0.0.1) == one process with 8."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(devices: int) -> dict:
  return {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": str(devices),
          "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo", "PYTHONPATH": REPO}


def _losses(workdir: str) -> dict[int, float]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


ARGS = ["--config=configs/quickstart.py:smoke", "--config.total_steps=4",
        "--config.log_every_steps=1", "--config.evals.zero_shot.every_steps=4"]


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
  single = str(tmp_path / "single")
  r = subprocess.run([sys.executable, "-m", "sslvl_jax.main", *ARGS, f"--workdir={single}"],
                     cwd=REPO, env=_env(8), capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]

  multi = str(tmp_path / "multi")
  port = _free_port()
  procs = [subprocess.Popen(
      [sys.executable, "-m", "sslvl_jax.main", *ARGS, f"--workdir={multi}",
       f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={pid}"],
      cwd=REPO, env=_env(4), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for pid in range(2)]
  outs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]

  a, b = _losses(single), _losses(multi)
  assert sorted(a) == sorted(b) == [1, 2, 3, 4]
  np.testing.assert_allclose([a[s] for s in a], [b[s] for s in a], rtol=1e-5)
  # The evaluator gathered the held-out features of both processes: same zero-shot accuracy.
  za = [json.loads(l) for l in open(os.path.join(single, "metrics.jsonl")) if "zero_shot" in l]
  zb = [json.loads(l) for l in open(os.path.join(multi, "metrics.jsonl")) if "zero_shot" in l]
  assert za[-1]["zero_shot/top1"] == pytest.approx(zb[-1]["zero_shot/top1"], abs=1e-6)

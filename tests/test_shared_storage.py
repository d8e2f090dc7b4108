"""Two local processes must share one workdir: different local dirs stop both with one line."""

import os
import subprocess
import sys

import pytest

from tests.test_distributed import REPO, _env, _free_port

ARGS = ["--config=configs/quickstart.py:smoke", "--config.total_steps=2",
        "--config.evals.zero_shot.every_steps=0"]


def _two_processes(workdirs: list[str]) -> list[tuple[int, str]]:
  """Run the smoke recipe as 2 jax.distributed processes, process k on workdirs[k]."""
  port = _free_port()
  procs = [subprocess.Popen(
      [sys.executable, "-m", "sslvl_jax.main", *ARGS, f"--workdir={workdir}",
       f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={pid}"],
      cwd=REPO, env=_env(4), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for pid, workdir in enumerate(workdirs)]
  try:
    errs = [p.communicate(timeout=300)[1] for p in procs]
  finally:
    for p in procs:
      p.kill()  # only after a timeout: a finished process is not signalled
  return [(p.returncode, err) for p, err in zip(procs, errs)]


@pytest.mark.slow
def test_per_host_workdirs_stop_every_process_with_one_line(tmp_path):
  dirs = [str(tmp_path / "host0"), str(tmp_path / "host1")]
  for code, err in _two_processes(dirs):
    assert code == 2, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"error: workdir {dirs[0]}") or last.startswith(
        f"error: workdir {dirs[1]}"), err[-3000:]
    assert "must be storage every host sees" in last and "process 1 sees no" in last


@pytest.mark.slow
def test_shared_workdir_trains(tmp_path):
  shared = str(tmp_path / "shared")
  for code, err in _two_processes([shared, shared]):
    assert code == 0, err[-3000:]
  assert os.path.isdir(os.path.join(shared, "checkpoints", "2"))
  assert not os.path.exists(os.path.join(shared, ".shared_storage_check"))

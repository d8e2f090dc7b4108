"""Launchers and cluster start-up: the SLURM and TPU-pod scripts (with fake srun/gcloud), the
distributed-init decision, --dry_run, and how often the processes agree on a SIGTERM."""

import os
import re
import signal
import subprocess
import sys

import jax
import pytest
from jax._src import clusters
from jax._src.clusters import cloud_tpu_cluster
from jax.experimental import multihost_utils

from sslvl_jax.preemption import StopSignal, check_due

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CLUSTER_PREFIXES = ("SLURM_", "OMPI_", "PMIX_", "TPU_", "MEGASCALE_", "KUBERNETES_")
# What SLURM sets in the batch step of `sbatch --nodes=2 launch/slurm_gpu.sbatch` on 8-GPU nodes.
SLURM_2X8 = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NUM_NODES": "2", "SLURM_NNODES": "2",
             "SLURM_JOB_NODELIST": "gpu[001-002]", "SLURM_NTASKS": "16", "SLURM_NPROCS": "16",
             "SLURM_NTASKS_PER_NODE": "8", "SLURM_CPUS_PER_TASK": "8", "SLURM_GPUS_PER_TASK": "1"}
# What srun sets in task 3 (node 0) of a job step, and in the only task of a 1-task step.
SLURM_TASK = {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "gpu[001-002]", "SLURM_NTASKS": "16",
              "SLURM_PROCID": "3", "SLURM_LOCALID": "3"}
SLURM_ONE_TASK = {**SLURM_TASK, "SLURM_STEP_NODELIST": "gpu001", "SLURM_NTASKS": "1",
                  "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}
TRICKY = ["--config.data.splits.train=/shared/my data/{00000..00009}.tar",
          "--config.name=it's \"quoted\" $HOME"]


def _clean_env(**extra: str) -> dict:
  """This process's environment without any cluster's variables (tests may run under SLURM)."""
  env = {k: v for k, v in os.environ.items() if not k.startswith(_CLUSTER_PREFIXES)}
  return {**env, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO, **extra}


def _fake_tool(bin_dir, name: str, record) -> None:
  """An executable `name` that writes its argv (NUL-separated) and cwd under `record`."""
  bin_dir.mkdir(exist_ok=True)
  path = bin_dir / name
  path.write_text(f"#!/bin/bash\nprintf '%s\\0' \"$@\" > '{record}/argv'\npwd > '{record}/cwd'\n"
                  f"env > '{record}/env'\n")
  path.chmod(0o755)


def _argv(record) -> list[str]:
  """The argv a fake tool recorded."""
  return (record / "argv").read_text().split("\0")[:-1]


def _sbatch_options(path: str) -> dict[str, str]:
  """The #SBATCH options of a batch script: name -> value ('' for a flag)."""
  opts = re.findall(r"^#SBATCH --([\w-]+)(?:=(\S+))?", open(path).read(), re.M)
  return dict(opts)


def test_slurm_script_runs_one_task_per_gpu(tmp_path):
  script = os.path.join(REPO, "launch", "slurm_gpu.sbatch")
  opts = _sbatch_options(script)
  assert opts["ntasks-per-node"] == "8" and opts["gpus-per-task"] == "1"
  assert opts["cpus-per-task"] == "8" and "gpus-per-node" not in opts
  assert opts["signal"] == "TERM@120" and opts["requeue"] == ""
  submit = tmp_path / "submit"
  submit.mkdir()
  _fake_tool(tmp_path / "bin", "srun", tmp_path)
  env = _clean_env(**SLURM_2X8, SLURM_SUBMIT_DIR=str(submit),
                   PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}")
  r = subprocess.run(["bash", script, "configs/clip_vitb16.py", "/shared/runs/clip b16", *TRICKY],
                     env=env, capture_output=True, text=True, timeout=60)
  assert r.returncode == 0, r.stderr
  assert _argv(tmp_path) == [
      "--kill-on-bad-exit=1", "--cpus-per-task=8", "python", "-m", "sslvl_jax.main",
      "--config=configs/clip_vitb16.py", "--workdir=/shared/runs/clip b16", "--local_device_ids=0",
      *TRICKY]
  assert (tmp_path / "cwd").read_text().strip() == str(submit)
  assert "SLURM_NTASKS=16" in (tmp_path / "env").read_text().splitlines()


def test_tpu_pod_script_runs_on_all_workers_with_args_intact(tmp_path):
  _fake_tool(tmp_path / "bin", "gcloud", tmp_path)
  env = _clean_env(GCLOUD=str(tmp_path / "bin" / "gcloud"))
  r = subprocess.run(["bash", os.path.join(REPO, "launch", "tpu_pod.sh"), "my-v4-64",
                      "us-central2-b", "configs/clip_vitb16.py", "gs://b/runs/clip b16", *TRICKY],
                     env=env, capture_output=True, text=True, timeout=60)
  assert r.returncode == 0, r.stderr
  argv = _argv(tmp_path)
  assert argv[:-1] == ["compute", "tpus", "tpu-vm", "ssh", "my-v4-64", "--zone=us-central2-b",
                       "--worker=all", "--command"]
  remote = argv[-1]
  assert remote.startswith("cd ~/sslvl_jax && python3 -m sslvl_jax.main ")
  # What a worker's login shell (bash) makes of the remote command, with cd and python3 stubbed.
  stubs = "cd() { printf '%s\\0' \"$1\"; }; python3() { printf '%s\\0' \"$@\"; }; "
  words = subprocess.run(["bash", "-c", stubs + remote], env=env, capture_output=True, text=True,
                         check=True).stdout.split("\0")[:-1]
  assert words == [os.path.expanduser("~/sslvl_jax"), "-m", "sslvl_jax.main",
                   "--config=configs/clip_vitb16.py", "--workdir=gs://b/runs/clip b16", *TRICKY]


def _main(workdir: str, env: dict) -> subprocess.CompletedProcess:
  """python -m sslvl_jax.main --dry_run on the smoke config."""
  args = ["--config=configs/quickstart.py:smoke", f"--workdir={workdir}", "--dry_run"]
  return subprocess.run([sys.executable, "-m", "sslvl_jax.main", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("cluster", [{}, SLURM_ONE_TASK], ids=["plain", "slurm_1_task"])
def test_dry_run_prints_cluster_and_touches_nothing(tmp_path, cluster):
  workdir = tmp_path / "w"
  r = _main(str(workdir), _clean_env(**cluster))
  assert r.returncode == 0, r.stderr[-3000:]
  assert r.stdout.splitlines() == [
      "process 0 of 1 (jax.distributed initialised: False)",
      "devices: 8 local, 8 global, cpu (cpu)",
      "mesh: {'data': 8, 'fsdp': 1} over 8 devices",
      "batch: 16 global, 16 per process, 2 per device"]
  assert not workdir.exists()


def _drop_cluster_env(monkeypatch) -> None:
  """Unset every cluster variable of this process's environment."""
  for k in [k for k in os.environ if k.startswith(_CLUSTER_PREFIXES)]:
    monkeypatch.delenv(k)


def _set_env(monkeypatch, env: dict) -> None:
  """Set the variables `env`."""
  for k, v in env.items():
    monkeypatch.setenv(k, v)


@pytest.fixture(name="cluster")
def fixture_cluster(monkeypatch):
  """sslvl_jax.cluster, with no cluster in the environment."""
  from sslvl_jax import cluster  # pylint: disable=g-import-not-at-top
  _drop_cluster_env(monkeypatch)
  return cluster


@pytest.fixture(name="calls")
def fixture_calls(monkeypatch) -> list:
  """The (args, kwargs) of each jax.distributed.initialize() call, which does nothing."""
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **kw: calls.append((a, kw)))
  return calls


def test_no_cluster_and_single_process_never_initialise(cluster, calls, monkeypatch):
  cluster.maybe_initialize_distributed(None, None, None, None)
  _set_env(monkeypatch, SLURM_ONE_TASK)
  assert cluster.cluster_process_count() == 1
  cluster.maybe_initialize_distributed(None, None, None, [0])
  assert calls == []


def test_slurm_job_initialises_with_own_gpu(cluster, calls, monkeypatch):
  _set_env(monkeypatch, SLURM_TASK)
  assert cluster.cluster_process_count() == 16
  cluster.maybe_initialize_distributed(None, None, None, [0])
  assert calls == [((None, None, None), {"local_device_ids": [0]})]


def test_slurm_autodetect_picks_localid_so_the_script_overrides_it(monkeypatch):
  _drop_cluster_env(monkeypatch)
  _set_env(monkeypatch, SLURM_TASK)
  detect = clusters.ClusterEnv.auto_detect_unset_distributed_params
  port = str(4242 % 2**12 + 65535 - 2**12 + 1)
  # Alone, JAX gives task 3 device 3: absent when --gpus-per-task=1 shows each task one GPU.
  assert detect(None, None, None, None, None, None) == (f"gpu001:{port}", 16, 3, [3])
  assert detect(None, None, None, [0], None, None)[3] == [0]


def test_tpu_pod_found_from_metadata_initialises(cluster, calls, monkeypatch):
  # A gcloud-ssh'd pod worker sets no cluster variables: JAX finds the pod in the TPU metadata.
  pod = cloud_tpu_cluster.GceTpuCluster
  monkeypatch.setattr(pod, "is_env_present", classmethod(lambda c: True))
  monkeypatch.setattr(pod, "get_process_count", classmethod(lambda c: 8))
  cluster.maybe_initialize_distributed(None, None, None, None)
  assert calls == [((None, None, None), {"local_device_ids": None})]


def test_explicit_coordinator_flags_win(cluster, calls):
  cluster.maybe_initialize_distributed("10.0.0.1:1234", 2, 1, None)
  assert calls == [(("10.0.0.1:1234", 2, 1), {"local_device_ids": None})]


def test_check_due():
  assert check_due(None, 10)  # before the first step: now
  assert check_due(20, 10) and not check_due(21, 10)
  assert check_due(7, 1) and check_due(7, 0)


def test_sigterm_seen_at_once_on_one_process():
  stop = StopSignal()
  try:
    assert not stop.should_stop(3, 10)
    os.kill(os.getpid(), signal.SIGTERM)
    assert stop.should_stop(3, 10)  # off the interval: one process needs no agreement
  finally:
    stop.restore()


def test_multi_host_agrees_only_every_n_steps(monkeypatch):
  gathers = []
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(multihost_utils, "process_allgather",
                      lambda x: gathers.append(int(x)) or [int(x), 0])
  stop = StopSignal()
  try:
    stop.received = True  # as the handler sets it
    assert [stop.should_stop(s, 10) for s in (18, 19, 20)] == [False, False, True]
    assert stop.should_stop()  # before the loop: at once
  finally:
    stop.restore()
  assert gathers == [1, 1]

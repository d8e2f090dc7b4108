"""Fault injection through the real CLI: kill -9, corrupt checkpoints, NaN, config drift, a full
disk, a second run, SIGTERM during start-up, bad configs. Nothing may be lost or half-written."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_train import final_params, read_metrics

from configs import quickstart
from sslvl_jax import checkpoint, errors, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = "--config=configs/quickstart.py:smoke"
ONE_DEVICE = "--config.num_devices=1"  # the mesh is tested elsewhere; one device compiles faster


def cli(*args, module="sslvl_jax.main", timeout=300):
  """Run a command line of the package; (returncode, stdout, stderr)."""
  r = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True,
                     text=True, timeout=timeout, env={**os.environ, "PYTHONPATH": REPO})
  return r.returncode, r.stdout, r.stderr


def one_error_line(stderr: str) -> str:
  """The stderr of a refused run ends with its one line 'error: ...' (returned), no traceback.

  Libraries may warn before it (orbax: "waiting for previous save" on a loaded machine)."""
  lines = [line for line in stderr.splitlines() if line.strip()]
  found = [line for line in lines if line.startswith("error: ")]
  assert len(found) == 1 and lines[-1] == found[0], stderr[-3000:]
  assert "Traceback" not in stderr, stderr[-3000:]
  return found[0]


def smoke_config(total_steps: int, **fields):
  c = quickstart.get_config("smoke")
  c.unlock()
  c.update(dict(total_steps=total_steps, num_devices=1, log_every_steps=1), **fields)
  c.evals = {}
  return c


def saved_steps(workdir: str) -> list[int]:
  return sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())


# ---- kill -9 -------------------------------------------------------------------------------

@pytest.mark.slow  # ~2 min on an idle 2-core machine: eight CLI runs
def test_kill9_at_random_points_resumes_bitwise(tmp_path):
  """Five kill -9 at seeded random moments (mid-step, mid-save, mid-row) lose nothing: the final
  parameters equal an uninterrupted run's bit for bit, and every step is logged once."""
  args = [SMOKE, ONE_DEVICE, "--config.total_steps=30", "--config.checkpoint_every_steps=2",
          "--config.log_every_steps=1", "--config.evals.zero_shot.every_steps=0"]
  ref, work = str(tmp_path / "ref"), str(tmp_path / "killed")
  rc, _, err = cli(*args, f"--workdir={ref}")
  assert rc == 0, err[-3000:]
  rng = np.random.default_rng(0)
  kills = 0
  while kills < 5:
    rows = len(read_metrics(work)) if os.path.exists(os.path.join(work, "metrics.jsonl")) else 0
    target = rows + int(rng.integers(1, 5))  # a few more steps, then a random extra delay
    p = subprocess.Popen([sys.executable, "-m", "sslvl_jax.main", *args, f"--workdir={work}"],
                         cwd=REPO, env={**os.environ, "PYTHONPATH": REPO},
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while p.poll() is None:
      path = os.path.join(work, "metrics.jsonl")
      if os.path.exists(path) and len(open(path, encoding="utf-8").readlines()) >= target:
        time.sleep(float(rng.uniform(0, 0.5)))
        break
      time.sleep(0.05)
    if p.poll() is not None:  # finished before the kill: the run is complete
      break
    p.kill()
    p.wait()
    kills += 1
  rc, _, err = cli(*args, f"--workdir={work}")
  assert rc == 0, err[-3000:]
  assert kills == 5
  a, b = read_metrics(ref), read_metrics(work)
  train_steps = [r["step"] for r in b if "train/loss" in r]
  assert train_steps == list(range(1, 31))  # each step once, in order
  assert [r["train/loss"] for r in a if "train/loss" in r] == [
      r["train/loss"] for r in b if "train/loss" in r]
  for x, y in zip(final_params(ref, 30), final_params(work, 30)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ---- corrupt checkpoints -------------------------------------------------------------------

def _biggest(folder: str) -> str:
  files = [os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs]
  return max(files, key=os.path.getsize)


def _truncate(path: str) -> None:
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


def _garbage(path: str) -> None:
  with open(path, "wb") as f:
    f.write(np.random.default_rng(0).bytes(max(os.path.getsize(path), 64)))


def _empty(d: str) -> None:
  shutil.rmtree(d)
  os.makedirs(d)


CORRUPTIONS = {  # what a torn copy, a bad disk or a stray `rm` leaves in checkpoints/<last>/
    "truncated array file": lambda d: _truncate(_biggest(os.path.join(d, "state"))),
    "garbage array file": lambda d: _garbage(_biggest(os.path.join(d, "state"))),
    "missing state metadata": lambda d: os.remove(os.path.join(d, "state", "_METADATA")),
    "missing state manifest": lambda d: os.remove(os.path.join(d, "state", "manifest.ocdbt")),
    "garbage state manifest": lambda d: _garbage(os.path.join(d, "state", "manifest.ocdbt")),
    "truncated array metadata": lambda d: _truncate(
        os.path.join(d, "state", "array_metadatas", "process_0")),
    "missing meta": lambda d: os.remove(os.path.join(d, "meta", "metadata")),
    "garbage meta": lambda d: _garbage(os.path.join(d, "meta", "metadata")),
    "missing data iterator": lambda d: os.remove(os.path.join(d, "data_iter",
                                                              "process_0-of-1.json")),
    "garbage data iterator": lambda d: _garbage(os.path.join(d, "data_iter",
                                                             "process_0-of-1.json")),
    "missing state": lambda d: shutil.rmtree(os.path.join(d, "state")),
    "empty directory": _empty,
}


@pytest.fixture(scope="module")
def six_steps(tmp_path_factory):
  """A finished 6-step run with checkpoints 2, 4, 6 (the reference) and the same run stopped at 4."""
  root = tmp_path_factory.mktemp("six")
  train.run(smoke_config(6, checkpoint_every_steps=2), str(root / "full"))
  train.run(smoke_config(6, checkpoint_every_steps=2, stop_at_step=4), str(root / "four"))
  return root


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_corrupt_latest_checkpoint_is_moved_aside(six_steps, tmp_path, kind, capsys):
  """The latest checkpoint broken in each way: moved to <step>.corrupt with one warning, the run
  resumes from the previous one and ends with the uninterrupted run's parameters."""
  work = str(tmp_path / "w")
  shutil.copytree(six_steps / "four", work)
  CORRUPTIONS[kind](os.path.join(work, "checkpoints", "4"))
  train.run(smoke_config(6, checkpoint_every_steps=2), work)
  out = capsys.readouterr().out
  assert os.path.isdir(os.path.join(work, "checkpoints", "4.corrupt"))
  assert sum("does not load" in line for line in out.splitlines()) == 1, out
  assert "resumed from step 2" in out
  assert [r["step"] for r in read_metrics(work)] == [1, 2, 3, 4, 5, 6]
  for x, y in zip(final_params(str(six_steps / "full"), 6), final_params(work, 6)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_no_loadable_checkpoint_is_one_clear_error(six_steps, tmp_path):
  work = str(tmp_path / "w")
  shutil.copytree(six_steps / "four", work)
  for step in (2, 4):
    _empty(os.path.join(work, "checkpoints", str(step)))
  with pytest.raises(errors.RunError, match=r"no checkpoint in .* loads \(moved aside: 4.corrupt, "
                     r"2.corrupt\)"):
    train.run(smoke_config(6, checkpoint_every_steps=2), work)


# ---- non-finite steps ----------------------------------------------------------------------

def _all_checkpoints_finite(workdir: str) -> None:
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  mgr = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
  for step in mgr.all_steps():
    state = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    assert not checkpoint.nonfinite_leaves(state), step


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_nonfinite_steps_never_reach_a_checkpoint(tmp_path, policy):
  """lr=1e30 blows up after the first steps: the run stops in one line naming the first bad
  step and the last good checkpoint, which exists, and no saved checkpoint holds NaN/Inf."""
  work = str(tmp_path / "w")
  rc, _, err = cli(SMOKE, ONE_DEVICE, f"--workdir={work}", "--config.total_steps=40",
                   "--config.optim.lr=1e30", "--config.log_every_steps=20",
                   "--config.checkpoint_every_steps=1", f"--config.nonfinite={policy}",
                   "--config.max_consecutive_skips=3", "--config.evals.zero_shot.every_steps=0")
  assert rc == 2
  line = one_error_line(err)
  steps = saved_steps(work)
  assert steps, line
  assert f"the last good checkpoint is step {steps[-1]} in" in line
  first_bad = int(line.split("first non-finite step " if policy == "skip" else " at step ")[1]
                  .split(";")[0].split(",")[0])
  # stop: the save of the bad step is refused; skip: the skipped steps' state is the good one
  assert first_bad == steps[-1] + 1 if policy == "stop" else first_bad <= steps[-1]
  assert ("3 consecutive non-finite steps" if policy == "skip" else "non-finite loss") in line
  _all_checkpoints_finite(work)


def test_skip_policy_applies_no_update_on_a_nonfinite_step(tmp_path):
  """With nonfinite='skip', a step whose loss is NaN returns the state it was given (but for the
  step and the guard's counters); the next finite step is applied and resets the run."""
  s = train.setup(smoke_config(4), str(tmp_path))
  step_fn = train.make_train_step(s.method, s.tx, s.lr_schedule, s.mesh, skip_nonfinite=True)
  rng = jax.random.key(0)
  batch = next(s.batches)
  fresh = lambda: jax.tree.map(jnp.copy, s.state)  # noqa: E731  # the step donates its input
  bad_in = fresh()
  bad_in = bad_in.replace(params=jax.tree.map(lambda x: x * np.nan, bad_in.params))
  before = jax.device_get((bad_in.params, bad_in.opt_state, bad_in.extras))
  bad_out, m = step_fn(bad_in, batch, rng)
  after = jax.device_get((bad_out.params, bad_out.opt_state, bad_out.extras))
  jax.tree.map(np.testing.assert_array_equal, before, after)
  guard = jax.device_get(bad_out.guard)
  assert (guard["skipped"], guard["run"], guard["first_bad"]) == (1, 1, 1)
  assert int(bad_out.step) == 1 and int(m["train/skipped_steps"]) == 1
  good_in = fresh().replace(step=bad_out.step, guard=bad_out.guard)
  opt_before = jax.device_get(good_in.opt_state)
  good_out, _ = step_fn(good_in, next(s.batches), rng)
  guard = jax.device_get(good_out.guard)
  assert (guard["skipped"], guard["run"], guard["longest_run"]) == (1, 0, 1)
  changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), opt_before,
                         jax.device_get(good_out.opt_state))
  assert all(jax.tree.leaves(changed))  # moments and count moved: the update was applied
  s.ckpt.close()


# ---- config drift, second run, SIGTERM during start-up ----------------------------------------

def test_config_drift_is_refused_safe_changes_allowed(tmp_path):
  work = str(tmp_path / "w")
  base = [SMOKE, ONE_DEVICE, f"--workdir={work}", "--config.evals.zero_shot.every_steps=0"]
  rc, _, err = cli(*base, "--config.total_steps=2")
  assert rc == 0, err[-3000:]
  with open(os.path.join(work, "config.json")) as f:
    first_config = f.read()
  rc, _, err = cli(*base, "--config.total_steps=4", "--config.global_batch_size=32",
                   "--config.seed=3")
  line = one_error_line(err)
  assert rc == 2 and "global_batch_size: 16 -> 32" in line and "seed: 0 -> 3" in line
  assert "--allow_config_change=global_batch_size," in line
  assert saved_steps(work) == [2]
  c = smoke_config(4)
  c.model.embed_dim = 48
  with pytest.raises(errors.ConfigError, match=r"model.embed_dim: 64 -> 48"):
    train.run(c, work)
  # A change of shapes allowed by the user cannot load: said so, the checkpoint is kept.
  with pytest.raises(errors.RunError, match="does not load with the changed config"):
    train.run(c, work, allow_change=("model.embed_dim",))
  assert saved_steps(work) == [2]
  # A stale lock of a dead process is taken over; safe keys (total steps, log interval) change.
  with open(os.path.join(work, "LOCK"), "w") as f:
    json.dump({"host": os.uname().nodename, "pid": 2 ** 22 + 12345}, f)
  rc, out, err = cli(*base, "--config.total_steps=4", "--config.log_every_steps=1")
  assert rc == 0, err[-3000:]
  assert "taking over the stale lock" in out and "resumed from step 2" in out
  assert not os.path.exists(os.path.join(work, "LOCK"))
  with open(os.path.join(work, "config.json")) as f:
    assert f.read() == first_config  # never overwritten: the resumed config is config.2.json
  assert json.load(open(os.path.join(work, "config.2.json")))["total_steps"] == 4


def test_second_run_on_a_workdir_is_refused(tmp_path):
  work = str(tmp_path / "w")
  os.makedirs(work)
  with open(os.path.join(work, "LOCK"), "w") as f:
    json.dump({"host": os.uname().nodename, "pid": os.getpid()}, f)  # this test: alive
  rc, _, err = cli(SMOKE, f"--workdir={work}")
  assert rc == 2 and f"is in use by the run of pid {os.getpid()}" in one_error_line(err)
  assert os.listdir(work) == ["LOCK"]


def test_sigterm_during_start_up_exits_0_with_nothing_lost(tmp_path):
  work = str(tmp_path / "w")
  p = subprocess.Popen([sys.executable, "-m", "sslvl_jax.main", SMOKE, ONE_DEVICE,
                        f"--workdir={work}"], cwd=REPO, env={**os.environ, "PYTHONPATH": REPO},
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 240
  while not os.path.exists(os.path.join(work, "LOCK")) and time.time() < deadline:
    time.sleep(0.02)  # the lock is taken after the config checks, before the run is built
  p.send_signal(signal.SIGTERM)
  out, err = p.communicate(timeout=240)
  assert p.returncode == 0, err[-3000:]
  assert "SIGTERM before the first step" in out
  assert not os.path.exists(os.path.join(work, "LOCK"))


# ---- a full disk ---------------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
  """A 4 MiB tmpfs (room for one smoke checkpoint, not two); needs root."""
  mnt = tmp_path / "disk"
  mnt.mkdir()
  if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs",
                                          str(mnt)], capture_output=True).returncode:
    pytest.skip("mounting a small tmpfs needs root")
  yield str(mnt)
  subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_is_one_line_and_keeps_the_last_checkpoint(small_disk):
  work = os.path.join(small_disk, "w")
  rc, _, err = cli(SMOKE, ONE_DEVICE, f"--workdir={work}", "--config.total_steps=40",
                   "--config.checkpoint_every_steps=2", "--config.evals.zero_shot.every_steps=0")
  line = one_error_line(err)
  assert rc == 2 and "no space for checkpoint 4" in line, line
  assert "the last good checkpoint is step 2" in line and saved_steps(work) == [2]
  assert len(final_params(work, 2)) > 0  # it loads


def test_read_only_workdir_is_one_line(tmp_path):
  src, ro = tmp_path / "src", tmp_path / "ro"
  src.mkdir()
  ro.mkdir()
  if os.geteuid() != 0 or subprocess.run(["mount", "--bind", "-o", "ro", str(src), str(ro)],
                                         capture_output=True).returncode:
    pytest.skip("a read-only mount needs root (and root may write to any mode-0555 folder)")
  try:
    rc, _, err = cli(SMOKE, f"--workdir={ro}")
  finally:
    subprocess.run(["umount", "-l", str(ro)], check=False)
  assert rc == 2 and f"--workdir={ro} is not writable" in one_error_line(err)


# ---- bad input: one line, exit 2, before step 1 --------------------------------------------

BAD_INPUT = [  # (arguments after the config, what the one line says); the whole rule table is
    # checked in-process by test_config_check.py: these go through the real command line
    ([], "--workdir is required"),
    (["--workdir={f}"], "is a file; give a directory"),
    (["--workdir={w}", "--config.log_every_steps=0"], "log_every_steps must be a positive"),
    (["--workdir={w}", "--config.checkpoint_every_steps=0"], "checkpoint_every_steps must be"),
    (["--workdir={w}", "--config.model.image.image_size=33"], "multiple of the patch size 8"),
    (["--workdir={w}", "--config.model.embed_dim=0"], "model.embed_dim must be a positive"),
    (["--workdir={w}", "--config.data.context_length=0"], "data.context_length must be"),
    (["--workdir={w}", "--config.total_steps=-5"], "total_steps must be a positive integer"),
    (["--workdir={w}", "--config.optim.lr=-1"], "optim.lr must be a finite number >= 0"),
    (["--workdir={w}", "--config.data.max_skip_fraction=-1"], "data.max_skip_fraction must be"),
    (["--workdir={w}", "--config.global_batch_size=4096"], "larger than the 1500 training"),
    (["--workdir={w}", "--config.evals.zero_shot.classnames=nope"],
     "evals.zero_shot.classnames='nope': no such class-name set"),
    (["--workdir={w}", "--config.evals.zero_shot.split=/no/such/split"],
     "evals.zero_shot.split='/no/such/split'"),
    (["--workdir={w}", "--config.no_such_key=1"], "no_such_key"),
    (["--workdir={w}", "stray_argument"], "unexpected arguments: ['stray_argument']"),
]


@pytest.mark.parametrize("args,needle", BAD_INPUT, ids=[n for _, n in BAD_INPUT])
def test_bad_input_is_one_line_before_anything_runs(tmp_path, args, needle):
  work, a_file = str(tmp_path / "w"), tmp_path / "a_file"
  a_file.write_text("")
  rc, out, err = cli(SMOKE, *[a.format(w=work, f=a_file) for a in args])
  assert rc == 2, (out + err)[-3000:]
  assert needle in one_error_line(err)
  assert not os.path.exists(os.path.join(work, "checkpoints"))


@pytest.mark.parametrize("config,needle", [
    ("configs/nope.py", "--config=configs/nope.py: no such config file"),
    ("configs/mocov2_r50.py:digit", "unknown variant 'digit'; known: digits, smoke"),
    ("{syntax_error}", "line 1: invalid syntax"),
])
def test_bad_config_file_is_one_line(tmp_path, config, needle):
  bad = tmp_path / "bad_config.py"
  bad.write_text("def get_config(:\n  pass\n")
  rc, _, err = cli(f"--config={config.format(syntax_error=bad)}", f"--workdir={tmp_path / 'w'}")
  assert rc == 2 and needle in one_error_line(err)


@pytest.mark.parametrize("module", ["sslvl_jax.main", "sslvl_jax.evaluate", "sslvl_jax.export",
                                    "sslvl_jax.data.convert", "sslvl_jax.data.train_tokenizer"])
def test_help_prints_usage_and_exits_0(module):
  rc, out, err = cli("--help", module=module)
  assert rc == 0, err[-2000:]
  assert "flags:" in out and "--[no]verbose" in cli("--helpfull", module=module)[1]

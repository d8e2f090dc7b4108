"""FSDP on the ("data", "fsdp") mesh: the rules, a state born sharded, the same training as
plain data parallelism, and checkpoints that resume on another mesh shape and device count."""

import os

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from test_train import final_params, read_metrics, small_config

from configs import dino_vits16, quickstart
from sslvl_jax import checkpoint, durations, methods, optim, parallel, rngs, sharding, train
from sslvl_jax.errors import ConfigError


def _mesh(data, fsdp):
  return parallel.make_mesh(data * fsdp, {"data": data, "fsdp": fsdp})


def _specs(shapes: dict, mesh, rules) -> dict:
  tree = {k: jax.ShapeDtypeStruct(v, np.float32) for k, v in shapes.items()}
  return {k: tuple(v) for k, v in sharding.tree_specs(tree, mesh, rules).items()}


# ---- mesh and rules (no compilation) ----------------------------------------------------------

def test_mesh_shape_from_config_and_one_line_errors():
  assert parallel.mesh_shape(8) == (8, 1)
  assert parallel.mesh_shape(8, {"data": -1, "fsdp": 4}) == (2, 4)
  assert parallel.mesh_shape(8, {"data": 2, "fsdp": -1}) == (2, 4)
  assert parallel.mesh_shape(4, {"data": 1, "fsdp": 4}) == (1, 4)
  bad = [({"fsdp": 3}, r"mesh.fsdp=3 does not divide the 8 devices"),
         ({"data": 2, "fsdp": 2}, r"mesh.data=2, mesh.fsdp=2 makes 4 devices, not the 8"),
         ({"data": -1, "fsdp": -1}, r"only one axis may be -1"),
         ({"model": 2}, r"mesh.model: unknown mesh axis; the axes are data, fsdp"),
         ({"fsdp": 0}, r"mesh.fsdp must be a positive integer or -1")]
  for shape, msg in bad:
    with pytest.raises(ConfigError, match=msg):
      parallel.mesh_shape(8, shape)
  c = small_config(1)
  c.mesh.fsdp = 16
  with pytest.raises(ConfigError, match=r"mesh.fsdp=16 does not divide the 8 devices"):
    train.setup(c, "/nonexistent/never/written")  # refused before data, model or workdir
  mesh = parallel.config_mesh(quickstart.get_config("smoke"))
  assert dict(mesh.shape) == {"data": 8, "fsdp": 1}
  assert parallel.data_sharding(mesh).spec == P(("data", "fsdp"))


def test_rules_first_match_wins_and_misfits_are_replicated():
  mesh = _mesh(2, 4)
  shapes = {"a/fc1/kernel": (64, 256), "a/fc2/kernel": (256, 64), "a/odd/kernel": (6, 10),
            "a/wide": (48, 32), "a/fc2/bias": (256,), "b/small": (64, 64), "b/big": (6, 4096),
            "b/explicit": (8, 6), "b/misfit": (6, 8)}
  rules = (("fc1", "replicate"),            # before the kernel rule: wins for fc1
           (r"kernel$", (None, "fsdp")),    # column split; (6, 10): 10 % 4 -> replicated
           ("explicit|misfit", ("fsdp",)),  # (6, 8): 6 % 4 -> replicated
           ("small", "fsdp"),               # 4096 elements < MIN_SHARD_SIZE -> replicated
           (".*", "fsdp>=256"))
  assert _specs(shapes, mesh, rules) == {
      "a/fc1/kernel": (), "a/fc2/kernel": (None, "fsdp"), "a/odd/kernel": (),
      "a/wide": ("fsdp",),      # both dims divide: the largest, 48
      "a/fc2/bias": ("fsdp",), "b/small": (), "b/big": (None, "fsdp"),
      "b/explicit": ("fsdp",), "b/misfit": ()}
  # The default: arrays of >= 2**14 elements along their largest divisible dimension.
  d = _specs({"w": (384, 1536), "w2": (1536, 384), "v": (65536,), "x": (127, 129), "b": (384,)},
             mesh, None)
  assert d == {"w": (None, "fsdp"), "w2": ("fsdp",), "v": ("fsdp",), "x": (), "b": ()}
  # No rule matches: replicated; axes of size 1 split nothing (fsdp=1 is data parallelism).
  assert _specs({"w": (256, 256)}, mesh, (("nomatch", "fsdp"),)) == {"w": ()}
  assert _specs({"w": (256, 256)}, _mesh(8, 1), None) == {"w": ()}
  assert _specs({"w": (256, 256)}, _mesh(2, 4), ((".*", (("data", "fsdp"),)),)) == {
      "w": (("data", "fsdp"),)}
  # JSON round trip of a checkpointed config: lists instead of tuples.
  assert _specs({"w": (4, 256)}, mesh, [["w", [None, "fsdp"]]]) == {"w": (None, "fsdp")}
  for rules, msg in [((("(", "fsdp"),), r"sharding_rules\[0\]: bad regex"),
                     (((".*", "shard"),), r"sharding_rules\[0\]: unknown spec 'shard'"),
                     (((".*", ("model",)),), r"unknown mesh axis 'model'"),
                     (((".*", ("fsdp", "fsdp")),), r"appears twice"),
                     ((".*",), r"sharding_rules\[0\] must be a \(regex, spec\) pair"),
                     ("fsdp", r"must be a tuple of \(regex, spec\) pairs")]:
    with pytest.raises(ConfigError, match=msg):
      sharding.parse_rules(rules, mesh)


# ---- born sharded -----------------------------------------------------------------------------

def _initializer(config, mesh, rules=None):
  schedule = durations.Schedule(total_steps=4, steps_per_epoch=1.0, global_batch_size=16)
  method = methods.get(config.method)(config, mesh, schedule)
  build = lambda p: optim.build(config.optim, p, schedule)  # noqa: E731
  return method, train.initializer(method, build, jax.random.key(0), mesh, rules)


def test_state_is_born_sharded_params_moments_and_teacher():
  c = quickstart.get_config("smoke")
  method, (make, shardings, _, _) = _initializer(c, _mesh(2, 4))
  state = make(jax.random.key(0))
  assert method.graphdef is not None  # eval_shape left a usable graphdef
  split = sharding.describe(state)
  kernel = "text/blocks/0/mlp/fc1/kernel/value"  # (64, 256): 2**14 elements
  for prefix in ("params/", "opt_state/1/0/mu/", "opt_state/1/0/nu/"):
    assert f"{prefix}{kernel} (64, 256) P(None, 'fsdp')" in split, split
  leaf = state.params["text"]["blocks"][0]["mlp"]["fc1"]["kernel"][...]
  assert "fsdp" in leaf.sharding.spec and leaf.addressable_shards[0].data.shape == (64, 64)
  assert jax.tree.map(lambda x: x.sharding, state) == shardings
  # With fsdp=1 the state is replicated and the params the model draws eagerly (to one ulp: older
  # XLA versions fuse the jitted init's scaling differently).
  _, (make1, _, _, _) = _initializer(quickstart.get_config("smoke"), _mesh(8, 1))
  rep = make1(jax.random.key(0))
  assert not sharding.describe(rep)
  schedule = durations.Schedule(total_steps=4, steps_per_epoch=1.0, global_batch_size=16)
  eager, _ = methods.get(c.method)(c, _mesh(8, 1), schedule).init_model(
      rngs.stream(jax.random.key(0), "params"))
  for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(rep.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=3e-7, atol=0)
  for a, b in zip(jax.tree.leaves(rep), jax.tree.leaves(state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # the same values, other layout
  # A teacher EMA (in extras) is split like the student it mirrors (shapes only: no compile).
  _, (_, dino, _, _) = _initializer(dino_vits16.get_config("smoke"), _mesh(2, 4))
  student = {optim.path_str(p): s.spec for p, s in jax.tree_util.tree_leaves_with_path(dino.params)}
  teacher = {optim.path_str(p): s.spec for p, s in jax.tree_util.tree_leaves_with_path(
      optim.teacher_params(dino.extras["teacher"]["ema"]))}
  assert teacher == student and any("fsdp" in s for s in teacher.values()), teacher


def test_init_output_per_device_shrinks_with_fsdp():
  """Compile only: a 2-block ViT-S/16 state (params + AdamW moments) per device is ~1/8 with
  fsdp=8: the jitted init writes only each device's shards, never the whole state."""
  sizes = {}
  for fsdp in (1, 8):
    c = quickstart.get_config("smoke")
    c.model.image = dict(name="vit_s16", image_size=32, patch_size=16, depth=2)
    _, (make, _, _, _) = _initializer(c, _mesh(8 // fsdp, fsdp))
    mem = make.lower(jax.random.key(0)).compile().memory_analysis()
    sizes[fsdp] = mem.output_size_in_bytes
  print(f"init output per device: fsdp=1 {sizes[1] / 2**20:.1f} MiB, "
        f"fsdp=8 {sizes[8] / 2**20:.1f} MiB")
  assert sizes[1] > 40 * 2**20  # ~3.7M params x 3 (params, mu, nu) in f32
  assert sizes[8] < sizes[1] / 6


# ---- training: FSDP == data parallel; resume on another mesh and device count ------------------

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Four steps data-parallel on 8 devices; the same with fsdp=4 on 8 devices stopped after
  step 2 and resumed on 4 devices as a (1, 4) mesh. Both save steps 2 and 4."""
  root = tmp_path_factory.mktemp("fsdp")
  rep, fsdp = str(root / "rep"), str(root / "fsdp")
  c = small_config(4)
  c.checkpoint_every_steps = 2
  train.run(c, rep)
  c.mesh = {"data": 2, "fsdp": 4}
  c.stop_at_step = 2
  train.run(c, fsdp)
  c.stop_at_step, c.num_devices, c.mesh = None, 4, {"data": -1, "fsdp": 4}
  train.run(c, fsdp)  # mesh, num_devices and stop_at_step are safe to change
  return rep, fsdp


def test_fsdp_trains_like_data_parallel(runs):
  rep, fsdp = runs
  a, b = read_metrics(rep), read_metrics(fsdp)
  assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]
  for ra, rb in zip(a, b):
    for k in ("train/loss", "train/grad_norm", "train/param_norm"):
      np.testing.assert_allclose(ra[k], rb[k], rtol=2e-5, err_msg=f"step {ra['step']} {k}")
  for x, y in zip(final_params(rep, 2), final_params(fsdp, 2)):  # 8 devices, fsdp=4
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)


def test_resume_on_another_mesh_and_device_count(runs):
  rep, fsdp = runs
  for x, y in zip(final_params(rep, 4), final_params(fsdp, 4)):  # resumed on 4 devices
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # two CLI processes compiling side by side, then a resume here
def test_two_process_fsdp_checkpoint_resumes_in_one_process(runs, tmp_path):
  """Two processes of 4 devices (fsdp=8 spans both) save step 2; one process of 8 devices
  (data=4, fsdp=2) restores it resharded: the same params as the one-process run's step 2."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  from test_distributed import REPO, _env, _free_port  # pylint: disable=g-import-not-at-top
  rep, _ = runs
  work, port = str(tmp_path / "multi"), _free_port()
  env = {**_env(4), "JAX_THREEFRY_PARTITIONABLE": "0"}  # the random bits of this process's runs
  args = ["--config=configs/quickstart.py:smoke", "--config.total_steps=4",
          "--config.log_every_steps=1", "--config.checkpoint_every_steps=2",
          "--config.evals.zero_shot.every_steps=0", "--config.stop_at_step=2",
          "--config.mesh.data=1", "--config.mesh.fsdp=8", f"--workdir={work}",
          f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2"]
  procs = [subprocess.Popen([sys.executable, "-m", "sslvl_jax.main", *args, f"--process_id={i}"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  c = small_config(4)
  c.checkpoint_every_steps, c.mesh = 2, {"data": 4, "fsdp": 2}
  # The data position is per process: a resume needs the process count, refused before loading.
  with pytest.raises(ConfigError, match=r"checkpoint 2 .* was saved by 2 processes .* resume it "
                                        r"with 2 processes \(any device count or mesh shape\)"):
    train.run(c, work)
  assert sorted(os.listdir(os.path.join(work, "checkpoints"))) == ["2"]  # not moved aside
  s = train.setup(c, work, step=0)  # a fresh state on the (4, 2) mesh; the arrays restore onto it
  target = checkpoint.abstract_like(s.state)
  state, _ = s.ckpt.restore(2, target, None)
  s.batches.close()
  s.ckpt.close()
  one = checkpoint.Checkpointer(rep)
  want, _ = one.restore(2, target, None)  # the one-process run's step 2 on the same mesh
  one.close()
  assert int(state.step) == 2 and dict(s.mesh.shape) == {"data": 4, "fsdp": 2}
  kernel = state.params["text"]["blocks"][0]["mlp"]["fc1"]["kernel"][...]
  assert kernel.sharding.spec == P(None, "fsdp") and kernel.addressable_shards[0].data.shape == (
      64, 128)
  for x, y in zip(jax.tree.leaves(want.params), jax.tree.leaves(state.params)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)

"""Distillation from a frozen pretrained teacher and LiT: losses against numpy, frozen and locked
networks bitwise unchanged without optimiser state, the shared pretrained loader, accuracy."""

import jax
import numpy as np
import pytest
from flax import nnx

from configs import distill_vits16, lit_b16, quickstart
from sslvl_jax import interop, optim, train
from sslvl_jax.data import device_ops
from sslvl_jax.errors import ConfigError
from sslvl_jax.interop.mapping import flat_arrays
from sslvl_jax.methods import distill, pretrained
from sslvl_jax.methods.base import StepContext


def _softmax(x, axis=-1):
  e = np.exp(x - x.max(axis, keepdims=True))
  return e / e.sum(axis, keepdims=True)


def _linear(params, name, x):
  return (x @ np.asarray(params[name]["kernel"][...], np.float64)
          + np.asarray(params[name]["bias"][...], np.float64))


def _cls_maps(vit, x):
  """(b, heads, patches) last-layer [CLS] -> patch attention, renormalised over patches."""
  a = np.asarray(vit.last_attention(x), np.float64)[:, :, 0, 1:]
  return a / a.sum(-1, keepdims=True)


def _sharpen(tree):
  """Query/key/value kernels x 4: peaked attention maps (at init they are near uniform)."""
  return jax.tree_util.tree_map_with_path(
      lambda p, v: v * 4.0 if "qkv/kernel" in optim.path_str(p) else v, tree)


def test_distill_loss_at_step_0_matches_numpy(tmp_path):
  c = distill_vits16.get_config("smoke")
  c.augment.views0 = ("clip",)  # normalisation only: the views are a formula of the batch
  c.teacher.kwargs = dict(num_heads=4)  # 4 teacher heads, 2 student heads: head-averaged maps
  c.loss.temperature = 2.0
  s = train.setup(c, str(tmp_path))
  batch = next(s.batches)
  p = _sharpen(s.state.params)
  model = s.method.merge(p, s.state.model_state)
  extras = {"teacher": _sharpen(s.state.extras["teacher"])}
  _, m, out = s.method.loss(model, extras, batch, StepContext(jax.random.key(1), 0))

  mean, std = device_ops.NORMALIZATIONS.get("clip")
  x = (np.asarray(batch["views0"][:, 0], np.float32) / 255.0 - mean) / std
  graphdef, state = nnx.split(pretrained.load(c.teacher, "teacher").module())  # from the source
  teacher = nnx.merge(graphdef, _sharpen(state))
  t_feat = np.asarray(teacher(x)["pooled"], np.float64)
  s_pool = np.asarray(model.backbone(x)["pooled"], np.float64)
  # Hinton: T^2 KL(softmax(t/T) || softmax(s/T)); the backbone teacher's logits are its features
  pt, ps = _softmax(t_feat / 2.0), _softmax(_linear(p, "logit_head", s_pool) / 2.0)
  want_kl = 4.0 * np.mean(np.sum(pt * (np.log(pt) - np.log(ps)), -1))
  proj = _linear(p, "projector", s_pool)
  cos = np.sum(proj * t_feat, -1) / np.linalg.norm(proj, axis=-1) / np.linalg.norm(t_feat, axis=-1)
  ta, sa = _cls_maps(teacher, x).mean(1), _cls_maps(model.backbone, x).mean(1)
  want_att = np.mean(np.sum(ta * (np.log(ta) - np.log(sa)), -1))
  np.testing.assert_allclose(float(m["logits_loss"]), want_kl, rtol=1e-4)
  np.testing.assert_allclose(float(m["features_loss"]), np.mean(1 - cos), rtol=1e-4)
  np.testing.assert_allclose(float(m["attention_loss"]), want_att, rtol=1e-3)
  assert want_kl > 1e-3 and np.mean(1 - cos) > 1e-2 and want_att > 1e-3  # none trivially 0
  assert out is extras  # the teacher is returned as it came


def test_per_head_attention_kl_and_mse_match_numpy():
  rng = np.random.default_rng(0)
  s, t = rng.uniform(0.1, 1, (3, 2, 4, 4)), rng.uniform(0.1, 1, (3, 2, 4, 4))
  ps, pt = (a.reshape(3, 2, 16) / a.reshape(3, 2, 16).sum(-1, keepdims=True) for a in (s, t))
  want = np.mean(np.sum(pt * (np.log(pt) - np.log(ps)), -1))  # per head, then averaged
  np.testing.assert_allclose(float(distill.attention_kl(s, t)), want, rtol=1e-5)
  a, b = rng.normal(size=(5, 7)), rng.normal(size=(5, 7))
  np.testing.assert_allclose(float(distill.FEATURE_LOSSES.get("mse")(a, b)),
                             np.mean((a - b) ** 2), rtol=1e-5)
  # another grid: the teacher's maps are resized; a uniform map stays uniform
  flat = distill.patch_distributions(np.ones((1, 1, 8, 8)), (4, 4), 1)
  np.testing.assert_allclose(np.asarray(flat), np.full((1, 1, 16), 1 / 16), rtol=1e-6)


def _restored(cfg, workdir):
  """The TrainState of the latest checkpoint of `workdir` (after train.run)."""
  s = train.setup(cfg, workdir)
  s.ckpt.close()
  return s


def test_distill_smoke_trains_and_teacher_never_changes(tmp_path):
  c = distill_vits16.get_config("smoke")
  out = train.run(c, str(tmp_path))
  assert np.isfinite(out["train/loss"]) and out["train/grad_norm"] > 0
  s = _restored(c, str(tmp_path))
  assert int(s.state.step) == 4
  want = flat_arrays(pretrained.load(c.teacher, "teacher").module())
  got = flat_arrays(nnx.merge(s.method.teacher_graphdef, s.state.extras["teacher"]))
  assert want.keys() == got.keys()
  for k in want:
    np.testing.assert_array_equal(got[k], want[k])  # bitwise, after 4 optimiser steps


def _locked(path):
  name = optim.path_str(path)
  return name.startswith("image/") or name.startswith("image_proj/")


def test_lit_smoke_locks_the_image_tower_without_optimizer_state(tmp_path):
  c = lit_b16.get_config("smoke")
  out = train.run(c, str(tmp_path))
  assert np.isfinite(out["train/loss"])
  s = _restored(c, str(tmp_path))
  want = flat_arrays(pretrained.load(c.model.image_init, "image_init").module())
  flat = {optim.path_str(p): np.asarray(v) for p, v in
          jax.tree_util.tree_leaves_with_path(s.state.params)}
  image = {k[len("image/"):].rsplit("/value", 1)[0]: v for k, v in flat.items()
           if k.startswith("image/")}
  assert len(image) == len(want) > 0
  for k, v in want.items():
    np.testing.assert_array_equal(image[k], v)
  # Adam moments exist for exactly the unlocked params: none for the tower or its projection
  params = jax.tree_util.tree_leaves_with_path(s.state.params)
  trainable = sum(np.size(v) for p, v in params if not _locked(p))
  locked = sum(np.size(v) for p, v in params if _locked(p))
  moments = sum(np.size(v) for v in jax.tree.leaves(s.state.opt_state)
                if np.issubdtype(np.asarray(v).dtype, np.floating))  # not the step counts
  assert locked > 0 and moments == 2 * trainable
  assert out["train/grad_norm"] > 0  # the text side did get gradients


@pytest.mark.parametrize("source,needle", [
    ("", "teacher.source='': set it to kind:path"),
    ("tarball:/x", "unknown kind 'tarball'"),
    ("export:/nonexistent", "no config.json in /nonexistent"),
    ("checkpoint:/nonexistent", "no config.json in /nonexistent"),
    ("dino:/nonexistent.pth", "no file /nonexistent.pth"),
])
def test_bad_teacher_source_is_a_one_line_config_error(source, needle):
  c = distill_vits16.get_config("smoke")
  c.teacher.source = source
  with pytest.raises(ConfigError, match=needle.replace("(", r"\(")) as e:
    pretrained.load(c.teacher, "teacher")
  assert "\n" not in str(e.value)


def test_lit_needs_the_lock_rules(tmp_path):
  c = lit_b16.get_config("smoke")
  c.optim.lock_rules = ("^image/",)
  with pytest.raises(ConfigError, match=r"optim.lock_rules=.*lacks \['\^image_proj/'\]"):
    train.setup(c, str(tmp_path))


def test_export_source_round_trips(tmp_path):
  module = pretrained.load(distill_vits16.get_config("smoke").teacher, "teacher").module()
  info = {"tower": "image", "role": "imported",
          "preprocessing": {"image_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3}}
  interop.save_encoder(str(tmp_path), module, {"name": "vit_micro",
                                               "kwargs": {"patch_size": 4, "num_heads": 4}}, info)
  cfg = distill_vits16.get_config("smoke").teacher
  cfg.source = f"export:{tmp_path}"
  loaded = pretrained.load(cfg, "teacher")
  assert loaded.preprocessing["image_size"] == 32 and loaded.tower == "image"
  for k, v in flat_arrays(module).items():
    np.testing.assert_array_equal(loaded.arrays[k], v)


# ---- accuracy: a trained teacher / tower on the digits (slow: minutes of CPU training) ----------
@pytest.fixture(scope="module")
def clip_teacher(tmp_path_factory):
  """The quickstart CLIP, trained: its workdir (a checkpoint: source)."""
  workdir = str(tmp_path_factory.mktemp("clip_teacher"))
  c = quickstart.get_config()
  c.evals = {}
  train.run(c, workdir)
  return workdir


def _knn(cfg, workdir, step=None):
  """k-NN top-1 of checkpoint `step` of `workdir` (latest; 0: the random initialisation)."""
  s = train.setup(cfg, workdir, step=step)
  s.ckpt.close()
  return s.evaluators["knn"].run(s.state.params, s.state.model_state, s.state.extras)["top1"]


@pytest.mark.slow
def test_distilled_student_nears_the_teacher_knn_and_beats_scratch(clip_teacher, tmp_path):
  c = distill_vits16.get_config("digits")
  c.teacher.source = f"checkpoint:{clip_teacher}"
  student = train.run(c, str(tmp_path / "student"))["knn/top1"]
  scratch = _knn(c, str(tmp_path / "scratch"), step=0)
  t = quickstart.get_config()
  t.evals = {"knn": c.evals.knn}
  teacher = _knn(t, clip_teacher)
  print(f"k-NN top-1: teacher {teacher:.3f}, distilled {student:.3f}, scratch {scratch:.3f}")
  assert student >= 0.9 * teacher and student > scratch + 0.05


@pytest.mark.slow
def test_lit_on_a_trained_tower_beats_a_random_locked_tower(clip_teacher, tmp_path):
  results = {}
  for name, source in (("trained", f"checkpoint:{clip_teacher}"), ("random", "init:vit_micro")):
    c = lit_b16.get_config("digits")
    c.model.image_init.source = source
    c.total_steps = 200
    results[name] = train.run(c, str(tmp_path / name))["zero_shot/top1"]
  print(f"LiT zero-shot top-1: trained tower {results['trained']:.3f}, "
        f"random tower {results['random']:.3f}")
  assert results["trained"] > results["random"] + 0.1

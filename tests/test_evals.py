"""Evaluation math: DINO k-NN (single device and sharded bank), top-k accuracy, linear probe,
zero-shot prompt ensembling and assets, image-text retrieval recalls; evaluators: checks when
built, unreadable records left out and counted."""

from __future__ import annotations

import csv
import logging
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import ConfigDict
from PIL import Image
from sklearn.linear_model import LogisticRegression

from configs import dino_vits16, quickstart
from sslvl_jax import durations, methods, parallel
from sslvl_jax.errors import ConfigError
from sslvl_jax.evals import (class_text_embeddings, knn_predict, load_classnames, load_templates,
                             retrieval_recalls, tasks, topk_accuracy, zero_shot_scores)
from sslvl_jax.evals import linear_probe as linear_probe_lib
from sslvl_jax.evals.linear_probe import linear_probe

SCHEDULE = durations.Schedule(total_steps=4, steps_per_epoch=1.0, global_batch_size=16)


# ---- k-NN -------------------------------------------------------------------------------------


def _knn_brute_force(train, train_labels, test, num_classes, k, temperature):
  """DINO eval_knn.py with loops: normalise, sort train rows by cosine, vote exp(sim / T)."""
  train = train / np.linalg.norm(train, axis=1, keepdims=True)
  scores = np.zeros((len(test), num_classes))
  for i, t in enumerate(test):
    t = t / np.linalg.norm(t)
    sims = [float(np.dot(t.astype(np.float64), row)) for row in train]
    for j in sorted(range(len(train)), key=lambda j: -sims[j])[:k]:
      scores[i, train_labels[j]] += np.exp(sims[j] / temperature)
  return scores


def _knn_data(n_train, n_test=13, dim=16, num_classes=5, seed=0):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(n_train, dim)).astype(np.float32) * rng.uniform(0.5, 3, (n_train, 1)),
          rng.integers(0, num_classes, n_train),
          rng.normal(size=(n_test, dim)).astype(np.float32))


@pytest.mark.parametrize("k,temperature,test_chunk", [(5, 0.07, 4), (1, 0.5, 256), (50, 0.07, 13)])
def test_knn_matches_brute_force(k, temperature, test_chunk):
  train, labels, test = _knn_data(50)
  got = knn_predict(train, labels, test, num_classes=5, k=k, temperature=temperature,
                    test_chunk=test_chunk)
  want = _knn_brute_force(train, labels, test, 5, k, temperature)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5)


@pytest.mark.parametrize("n_train,k", [(64, 5), (61, 20), (61, 61), (9, 3)])
def test_knn_sharded_bank_equals_unsharded(n_train, k):
  # 61 rows over 8 devices: 3 padding rows; k=20 > 8 rows per shard: every shard's whole bank is a
  # candidate; k=61 takes every real row and no padding row.
  train, labels, test = _knn_data(n_train, seed=n_train)
  mesh = parallel.make_mesh()
  single = np.asarray(knn_predict(train, labels, test, num_classes=5, k=k, test_chunk=4))
  sharded = np.asarray(knn_predict(train, labels, test, num_classes=5, k=k, mesh=mesh,
                                   test_chunk=4))
  np.testing.assert_allclose(sharded, single, rtol=1e-5)
  np.testing.assert_allclose(sharded, _knn_brute_force(train, labels, test, 5, k, 0.07), rtol=1e-5)


def test_knn_rejects_k_larger_than_bank():
  train, labels, test = _knn_data(4)
  with pytest.raises(ValueError, match="k=5"):
    knn_predict(train, labels, test, num_classes=5, k=5)


def test_topk_accuracy_hand_made():
  scores = np.array([[0.1, 0.9, 0.0, 0.2, 0.3, 0.4],   # label 1: top-1
                     [0.5, 0.1, 0.6, 0.0, 0.2, 0.3],   # label 0: second
                     [0.9, 0.8, 0.7, 0.6, 0.5, 0.4],   # label 4: fifth
                     [0.9, 0.8, 0.7, 0.6, 0.5, 0.4]])  # label 5: sixth
  labels = np.array([1, 0, 4, 5])
  assert topk_accuracy(scores, labels, ks=(1, 2, 5, 6)) == {
      "top1": 0.25, "top2": 0.5, "top5": 0.75, "top6": 1.0}
  assert topk_accuracy(scores[:, :3], np.array([1, 0, 2, 2]), ks=(1, 5)) == {"top1": 0.25,
                                                                            "top5": 1.0}


# ---- linear probe -----------------------------------------------------------------------------


def _blobs(n, num_classes, dim, seed, spread=1.0):
  rng = np.random.default_rng(seed)
  centers = np.random.default_rng(123).normal(size=(num_classes, dim)) * 3
  y = rng.integers(0, num_classes, n)
  return (centers[y] + spread * rng.normal(size=(n, dim)) + 5.0).astype(np.float32), y


def test_linear_probe_separable_reaches_100_percent():
  xtr, ytr = _blobs(400, 4, 8, seed=0, spread=0.3)
  xte, yte = _blobs(200, 4, 8, seed=1, spread=0.3)
  res = linear_probe(xtr, ytr, xte, yte, num_classes=4, lrs=(1e-2, 1e-1), wds=(0.0, 1e-3),
                     steps=200)
  assert res["top1"] == 1.0 and res["top5"] == 1.0 and res["val_top1"] == 1.0
  assert len(res["sweep"]) == 4 and res["lr"] in (1e-2, 1e-1) and res["weight_decay"] in (0, 1e-3)
  mini = linear_probe(xtr, ytr, xte, yte, num_classes=4, lrs=(1e-1,), wds=(0.0,), steps=200,
                      batch_size=32)
  assert mini["top1"] == 1.0


def test_linear_probe_random_labels_is_chance():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2000, 16)).astype(np.float32)
  y = rng.integers(0, 10, 2000)
  res = linear_probe(x[:1000], y[:1000], x[1000:], y[1000:], num_classes=10,
                     lrs=(1e-2, 1e-1), wds=(0.0, 1e-2), steps=200)
  assert abs(res["top1"] - 0.1) < 0.04 and abs(res["top5"] - 0.5) < 0.06


def test_linear_probe_selects_best_held_out_setting_deterministically():
  xtr, ytr = _blobs(300, 3, 6, seed=2, spread=3.0)
  xte, yte = _blobs(100, 3, 6, seed=3, spread=3.0)
  kw = dict(num_classes=3, lrs=(1e-4, 1e-1), wds=(0.0, 10.0), steps=100)
  res = linear_probe(xtr, ytr, xte, yte, **kw)
  assert res == linear_probe(xtr, ytr, xte, yte, **kw)
  best = max(res["sweep"], key=lambda r: r["val_top1"])
  assert (res["lr"], res["weight_decay"], res["val_top1"]) == (
      best["lr"], best["weight_decay"], best["val_top1"])
  assert [(r["lr"], r["weight_decay"]) for r in res["sweep"]] == [
      (1e-4, 0.0), (1e-4, 10.0), (1e-1, 0.0), (1e-1, 10.0)]


def test_linear_probe_optimum_matches_sklearn_logistic_regression():
  # mean CE + wd/2 |W|^2 on standardised features == sklearn's 0.5 |W|^2 + C sum CE, C = 1/(n wd).
  x, y = _blobs(300, 3, 5, seed=4, spread=3.0)
  xte, _ = _blobs(100, 3, 5, seed=5, spread=3.0)
  wd = 1e-2
  clf = linear_probe_lib._fit(x, y, 0.05, wd, jax.random.key(0), num_classes=3, steps=500,
                              batch_size=None)
  mean, std = x.mean(0), x.std(0) + 1e-6
  ref = LogisticRegression(C=1 / (len(x) * wd), tol=1e-10, max_iter=10_000).fit((x - mean) / std, y)
  logits = np.asarray(linear_probe_lib._logits(clf, xte))
  probs = np.exp(logits - logits.max(1, keepdims=True))
  probs /= probs.sum(1, keepdims=True)
  np.testing.assert_allclose(probs, ref.predict_proba((xte - mean) / std), atol=1e-3)


# ---- zero-shot --------------------------------------------------------------------------------

CLASSES = ("cat", "dog", "bird", "fish")
TEMPLATES = ("a photo of a {}.", "a drawing of the {}.", "itap of my {}.")


def _toy_text_tower(dim=6, seed=0):
  """Prompt -> one-hot(class) * template scale + template noise; tokens are (class, template)."""
  rng = np.random.default_rng(seed)
  noise = 0.3 * rng.normal(size=(len(TEMPLATES), dim))
  scale = np.array([1.0, 2.5, 0.7])
  ids = {t.format(c): (ci, ti) for ci, c in enumerate(CLASSES) for ti, t in enumerate(TEMPLATES)}
  tokenize = lambda texts: np.array([ids[t] for t in texts])
  encode = lambda tok: np.eye(dim)[tok[:, 0]] * scale[tok[:, 1], None] + noise[tok[:, 1]]
  return tokenize, encode


def test_prompt_ensemble_is_normalise_mean_renormalise():
  tokenize, encode = _toy_text_tower()
  got = np.asarray(class_text_embeddings(encode, tokenize, CLASSES, TEMPLATES))
  for ci, c in enumerate(CLASSES):
    e = encode(tokenize([t.format(c) for t in TEMPLATES]))
    m = (e / np.linalg.norm(e, axis=1, keepdims=True)).mean(0)
    np.testing.assert_allclose(got[ci], m / np.linalg.norm(m), rtol=1e-5, atol=1e-6)
    raw = e.mean(0) / np.linalg.norm(e.mean(0))  # mean before normalising: a different vector
    assert np.abs(got[ci] - raw).max() > 1e-2


def test_zero_shot_predictions_on_toy_problem():
  tokenize, encode = _toy_text_tower()
  class_emb = class_text_embeddings(encode, tokenize, CLASSES, TEMPLATES)
  rng = np.random.default_rng(1)
  labels = rng.integers(0, len(CLASSES), 40)
  images = (np.eye(6)[labels] + 0.1 * rng.normal(size=(40, 6))) * rng.uniform(0.5, 4, (40, 1))
  scores = np.asarray(zero_shot_scores(images, class_emb))
  unit = images / np.linalg.norm(images, axis=1, keepdims=True)
  np.testing.assert_allclose(scores, unit @ np.asarray(class_emb).T, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(scores.argmax(1), labels)
  assert topk_accuracy(scores, labels, ks=(1,)) == {"top1": 1.0}


def test_shipped_templates_and_classnames():
  templates = load_templates("imagenet")
  assert len(templates) == 80 == len(set(templates))
  assert all(t.count("{}") == 1 for t in templates)
  assert templates[0] == "a bad photo of a {}." and templates[-1] == "a tattoo of the {}."
  names = load_classnames("imagenet")
  assert len(names) == 1000 and names[:3] == ["tench", "goldfish", "great white shark"]
  assert names[-1] == "toilet paper"
  assert load_classnames("digits")[:2] == ["zero", "one"]
  with pytest.raises(ConfigError, match="known: digits_eval, digits_train, imagenet "):
    load_templates("no_such_set")


def test_classnames_from_a_text_file(tmp_path):
  (tmp_path / "names.txt").write_text("cat\n\ndog\n", encoding="utf-8")
  assert load_classnames(str(tmp_path / "names.txt")) == ["cat", "dog"]
  (tmp_path / "empty.txt").write_text("\n", encoding="utf-8")
  with pytest.raises(ConfigError, match="empty"):
    load_classnames(str(tmp_path / "empty.txt"))


# ---- retrieval --------------------------------------------------------------------------------


def test_retrieval_recalls_hand_built():
  # 3 images x 2 captions (text_to_image = 0,0,1,1,2,2). Texts are one-hot, so sim[i, j] is
  # S[i, j] / |S_i|; every row of S is a permutation of 1..6 (equal norms) with no column ties.
  s = np.array([[6, 1, 5, 2, 4, 3],    # own captions t0, t1: best t0 at rank 1
                [5, 4, 1, 3, 6, 2],    # own t2, t3: order t4 t0 t1 t3 -> rank 4
                [1, 6, 3, 5, 2, 4]],   # own t4, t5: order t1 t3 t5 -> rank 3
               np.float32)
  images = s * np.array([[1.0], [3.0], [0.5]], np.float32)  # norms must not matter
  texts = np.eye(6, dtype=np.float32)
  # Columns (caption -> image rank): t0 1, t1 3, t2 3, t3 2, t4 3, t5 1.
  got = retrieval_recalls(images, texts, np.array([0, 0, 1, 1, 2, 2]), ks=(1, 2, 3, 4))
  assert got == pytest.approx({
      "image_to_text_r1": 1 / 3, "image_to_text_r2": 1 / 3, "image_to_text_r3": 2 / 3,
      "image_to_text_r4": 1.0,
      "text_to_image_r1": 2 / 6, "text_to_image_r2": 3 / 6, "text_to_image_r3": 1.0,
      "text_to_image_r4": 1.0})


@pytest.fixture(scope="module")
def clip() -> tuple:
  """The quickstart smoke CLIP (micro towers, built-in digits), its mesh and its initial model."""
  c = quickstart.get_config("smoke")
  mesh = parallel.make_mesh()
  method = methods.get("clip")(c, mesh, SCHEDULE)
  params, model_state = method.init_model(jax.random.key(0))
  return method, mesh, (params, model_state, {})


def test_retrieval_evaluator_groups_repeated_images(tmp_path, clip):
  """COCO layout: 3 images x 2 captions; recall computed over unique images (end to end)."""
  method, mesh, state = clip
  model = method.merge(*state[:2])
  rows = []
  for i in range(3):
    Image.fromarray(np.full((32, 32, 3), 60 * i, np.uint8)).save(tmp_path / f"{i}.png")
    rows += [(f"{i}.png", f"a photo of the number {w}.") for w in ("one", "two")]
  with open(tmp_path / "coco.csv", "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["filepath", "title"])
    w.writerows(rows)
  ev = tasks.Retrieval(ConfigDict(dict(type="retrieval", split="test", batch_size=8, data=dict(
      name="csv", splits=dict(test=str(tmp_path / "coco.csv"))))), method.predict_fns(), mesh,
      method.config.data)
  res = ev.run(*state)
  # Recompute with the pure function on the same embeddings: 3 gallery images, 6 captions.
  imgs = np.stack([np.asarray(Image.open(tmp_path / f"{i}.png").convert("RGB")) for i in range(3)])
  tok = tasks.tokenizer(tasks.data.tokenizer_spec(method.config.data))
  img = np.asarray(method.image_features(model, {}, jnp.asarray(imgs)))
  txt = np.asarray(method.text_features(model, {}, jnp.asarray(tok.encode([r[1] for r in rows]))))
  want = retrieval_recalls(img, txt, np.repeat(np.arange(3), 2), ks=(1, 5, 10))
  for k, v in want.items():
    assert res[k] == pytest.approx(v, abs=1e-6)
  assert res["image_to_text_r5"] == 1.0 and res["text_to_image_r5"] == 1.0  # only 3 images
  assert res["skipped"] == 0


# ---- evaluators: checks when built, unreadable records ----------------------------------------


def _image_folder(root: pathlib.Path, seed: int, truncate: str | None = None,
                  leave_out: str | None = None) -> str:
  """root/<class>/<i>.png, 3 classes x 5 noisy 12x12 images around a class colour.

  The file `truncate` (class/name) is written with half its bytes; `leave_out` is not written.
  """
  rng = np.random.default_rng(seed)
  for c, colour in enumerate(((200, 40, 40), (40, 200, 40), (40, 40, 200))):
    os.makedirs(root / f"c{c}", exist_ok=True)
    for i in range(5):
      pixels = np.clip(np.array(colour) + rng.normal(0, 60, (12, 12, 3)), 0, 255).astype(np.uint8)
      rel = f"c{c}/{i}.png"
      if rel != leave_out:
        Image.fromarray(pixels).save(root / rel)
      if rel == truncate:
        blob = (root / rel).read_bytes()
        (root / rel).write_bytes(blob[:len(blob) // 2])
  return str(root)


def _knn(train: str, test: str, method, mesh) -> tasks.Evaluator:
  """A k-NN evaluator (k=5, batches of 8: two per split) over two image folders."""
  cfg = dict(knn=dict(type="knn", k=5, batch_size=8, data=dict(
      name="image_folder", splits=dict(train=train, test=test))))
  return tasks.build_all(ConfigDict(cfg), method, mesh)["knn"]


def test_knn_leaves_out_and_counts_an_unreadable_record(tmp_path, clip):
  """One truncated test image: the evaluation is that of the folder without it, skipped == 1."""
  method, mesh, state = clip
  train = _image_folder(tmp_path / "train", seed=0)
  bad = _image_folder(tmp_path / "bad", seed=1, truncate="c0/2.png")
  ref = _image_folder(tmp_path / "ref", seed=1, leave_out="c0/2.png")
  ev, ev_ref = _knn(train, bad, method, mesh), _knn(train, ref, method, mesh)
  got, want = ev.run(*state), ev_ref.run(*state)
  assert got.pop("skipped") == 1 and want.pop("skipped") == 0
  assert got == want
  # Left out, not replaced: the 14 readable rows in order, as read from the reference folder.
  feats, labels = ev.features(*state, "test_split")
  ref_feats, ref_labels = ev_ref.features(*state, "test_split")
  assert labels.tolist() == ref_labels.tolist() == [0] * 4 + [1] * 5 + [2] * 5
  np.testing.assert_allclose(feats, ref_feats, rtol=1e-6)


def test_all_records_unreadable_is_one_clear_error(tmp_path, clip):
  method, mesh, state = clip
  train = _image_folder(tmp_path / "train", seed=0)
  (tmp_path / "bad" / "c0").mkdir(parents=True)
  (tmp_path / "bad" / "c0" / "0.png").write_bytes(b"not a png")
  with pytest.raises(RuntimeError, match=r"^evals.knn.test_split='test': all 1 records are "
                                         r"unreadable"):
    _knn(train, str(tmp_path / "bad"), method, mesh).run(*state)


ZERO_SHOT = dict(type="zero_shot", split="test", classnames="digits", templates="digits_eval")


@pytest.mark.parametrize("evals,message", [
    (dict(zs={**ZERO_SHOT, "classnames": "imagenett"}),
     "evals.zs.classnames='imagenett': no such class-name set; known: digits, imagenet (or a path "
     "to a text file with one name per line)"),
    (dict(zs={**ZERO_SHOT, "templates": "/no/templates.txt"}),
     "evals.zs.templates='/no/templates.txt': no such template set; known: digits_eval, "
     "digits_train, imagenet (or a path to a text file with one prompt per line, {} marking the "
     "class name)"),
    (dict(zs={k: v for k, v in ZERO_SHOT.items() if k != "classnames"}),
     "evals.zs.classnames is not set; a zero_shot evaluator needs classnames, templates"),
    (dict(zs={**ZERO_SHOT, "split": "val"}),
     "evals.zs.split='val': ValueError: unknown split 'val' for the built-in digits; use 'train' "
     "or 'test'"),
    (dict(zs={**ZERO_SHOT, "data": dict(tokenizer="/no/tok.model")}),
     "evals.zs.data.tokenizer='/no/tok.model': FileNotFoundError: tokenizer model '/no/tok.model' "
     "not found; "),
    (dict(zs={**ZERO_SHOT, "test_split": "test"}),
     "evals.zs.test_split: not a setting of a zero_shot evaluator; known: batch_size, "
     "class_subset, classnames, data, every_epochs, every_examples, every_percent, every_steps, "
     "split, templates, type"),
    (dict(nn=dict(type="knnn")),
     "evals.nn.type='knnn': unknown evaluator 'knnn'; known: classifier, few_shot, knn, "
     "linear_probe, retrieval, zero_shot"),
    (dict(nn=dict(type="knn", k=1501)),
     "evals.nn.k=1501: more neighbours than the 1500 records of train_split='train'"),
])
def test_build_all_rejects_bad_settings_in_one_line(evals, message, clip):
  method, mesh, _ = clip
  with pytest.raises(ConfigError) as e:
    tasks.build_all(ConfigDict(evals), method, mesh)
  assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_build_all_names_a_test_split_that_does_not_open(tmp_path, clip):
  method, mesh, _ = clip
  with pytest.raises(ConfigError) as e:
    _knn(_image_folder(tmp_path / "train", seed=0), str(tmp_path / "nope"), method, mesh)
  assert str(e.value) == (f"evals.knn.test_split='test': image folder '{tmp_path / 'nope'}' "
                          "does not exist; check data.splits")


# ---- evaluators: jitted once, the state passed in ---------------------------------------------


class _Compiles(logging.Handler):
  """The 'Compiling ...' records jax logs with jax_log_compiles."""

  def __init__(self):
    super().__init__(logging.DEBUG)
    self.names: list[str] = []

  def emit(self, record: logging.LogRecord) -> None:
    message = record.getMessage()
    if message.startswith("Compiling "):
      self.names.append(message.split(" with ")[0][len("Compiling "):])


def test_evaluators_compile_once_and_read_the_state_they_are_given(clip):
  """A zero-shot and a k-NN evaluator run on two states: the second run compiles nothing (each
  prediction function is jitted once, with the params as arguments), yet its results differ."""
  method, mesh, (params, model_state, extras) = clip
  evs = tasks.build_all(ConfigDict(dict(zs={**ZERO_SHOT, "batch_size": 128},
                                        knn=dict(type="knn", k=5, batch_size=128))), method, mesh)
  leaves, treedef = jax.tree.flatten(params)
  perturbed = jax.tree.unflatten(treedef, [
      x + 0.5 * x.std() * jax.random.normal(jax.random.key(i), x.shape, x.dtype)
      for i, x in enumerate(leaves)])
  handler = _Compiles()
  logger = logging.getLogger("jax")
  logger.addHandler(handler)
  try:
    with jax.log_compiles(True):
      first = {n: ev.run(params, model_state, extras) for n, ev in evs.items()}
      compiled_first = list(handler.names)
      feats = evs["knn"].features(params, model_state, extras, "test_split")[0]
      handler.names.clear()
      second = {n: ev.run(perturbed, model_state, extras) for n, ev in evs.items()}
      new_feats = evs["knn"].features(perturbed, model_state, extras, "test_split")[0]
      compiled_second = list(handler.names)
  finally:
    logger.removeHandler(handler)
  print(f"compiled in the first run: {len(compiled_first)} {compiled_first}; "
        f"in the second: {compiled_second}")
  assert compiled_second == []
  sizes = {f"{n}.{k}": fn._cache_size() for n, ev in evs.items() for k, fn in ev.predict.items()}
  assert sizes == {"zs.image_embed": 1, "zs.text_embed": 1, "knn.image_features": 1}
  assert np.abs(feats - new_feats).max() > 1e-3  # the params are read, not baked in
  assert first["zs"] != second["zs"] and first["knn"] != second["knn"]


def _perturbed(tree, scale=0.5):
  """Every floating leaf of `tree` plus `scale` x its std of Gaussian noise."""
  leaves, treedef = jax.tree.flatten(tree)
  return jax.tree.unflatten(treedef, [
      x + scale * x.std() * jax.random.normal(jax.random.key(i), x.shape, x.dtype)
      if jnp.issubdtype(x.dtype, jnp.floating) and x.size > 1 else x
      for i, x in enumerate(leaves)])


def test_ssl_evaluator_reads_the_teacher_from_extras_without_init_model():
  """DINO evaluates its EMA teacher: a k-NN evaluator built from a method that never ran
  init_model gives the teacher's features of the extras it is passed, one compilation for all."""
  c = dino_vits16.get_config("smoke")
  mesh = parallel.make_mesh()
  trained = methods.get("dino")(c, mesh, SCHEDULE)
  params, model_state = trained.init_model(jax.random.key(0))
  extras = trained.init_extras(params, model_state, jax.random.key(1))
  fresh = methods.get("dino")(c, mesh, SCHEDULE)
  assert fresh.graphdef is None and sorted(fresh.predict_fns()) == ["image_features"]
  ev = tasks.build_all(ConfigDict(dict(knn=dict(type="knn", k=5, batch_size=128))), fresh,
                       mesh)["knn"]
  feats = ev.features(params, model_state, extras, "test_split")[0]
  source, rng = ev.sources["test_split"], np.random.default_rng(0)
  images = jnp.asarray(np.stack([ev.transform(source[i], rng)["image"] for i in range(4)]))
  teacher_net = trained.network(trained.merge(params, model_state), extras, "teacher")
  want = trained.image_features(teacher_net, extras, images)
  np.testing.assert_allclose(feats[:4], np.asarray(want), rtol=1e-5, atol=1e-6)
  student_moved = ev.features(_perturbed(params), model_state, extras, "test_split")[0]
  np.testing.assert_allclose(student_moved, feats, rtol=1e-6)  # the student is not evaluated
  teacher = {**extras["teacher"], "ema": _perturbed(extras["teacher"]["ema"])}
  teacher_moved = ev.features(params, model_state, {**extras, "teacher": teacher}, "test_split")[0]
  assert np.abs(teacher_moved - feats).max() > 1e-3
  assert ev.predict["image_features"]._cache_size() == 1

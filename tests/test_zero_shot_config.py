"""Zero-shot and retrieval on the user's own data from config: class names / templates / class
subsets as a list, a file or a shipped set, the label -> name mapping checked against the split,
CSV/TSV delimiters, train_tokenizer's errors, result files never replaced, and the zero-shot suite
(class-subset masking, CLIP_benchmark records)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from ml_collections import ConfigDict
from PIL import Image

from configs import quickstart
from sslvl_jax import data, durations, methods, parallel
from sslvl_jax.data import builtin, sources, train_tokenizer
from sslvl_jax.data.tokenizer import Tokenizer
from sslvl_jax.errors import ConfigError
from sslvl_jax.evals import tasks, zero_shot

SCHEDULE = durations.Schedule(total_steps=4, steps_per_epoch=1.0, global_batch_size=16)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ZS = dict(type="zero_shot", split="test", templates="digits_eval", batch_size=16)


@pytest.fixture(scope="module")
def clip() -> tuple:
  """The quickstart smoke CLIP, its mesh and its initial (params, model_state, extras)."""
  mesh = parallel.make_mesh()
  method = methods.get("clip")(quickstart.get_config("smoke"), mesh, SCHEDULE)
  params, model_state = method.init_model(jax.random.key(0))
  return method, mesh, (params, model_state, {})


def _digit_folder(root, folders: dict[str, int], per_class: int = 6) -> str:
  """root/<folder>/<i>.png: `per_class` held-out built-in digits of class `folders[folder]`."""
  images, labels = builtin.digits("test")
  for folder, digit in folders.items():
    os.makedirs(root / folder, exist_ok=True)
    for i, index in enumerate(np.flatnonzero(labels == digit)[:per_class]):
      Image.fromarray(builtin.upsample(images[index], 32)).save(root / folder / f"{i}.png")
  return str(root)


def _build(evals: dict, method, mesh) -> dict:
  return tasks.build_all(ConfigDict(evals), method, mesh)


def _folder_eval(root: str, **settings) -> dict:
  return dict(zs={**ZS, "data": dict(name="image_folder", splits=dict(test=root)), **settings})


# ---- class names, templates, subsets: list / file / shipped -----------------------------------


def test_classnames_templates_and_subsets_as_list_file_or_shipped(tmp_path):
  assert zero_shot.load_classnames(["cat", "dog"]) == ["cat", "dog"]
  (tmp_path / "names.txt").write_text(" cat \n\ndog\n", encoding="utf-8")
  assert zero_shot.load_classnames(str(tmp_path / "names.txt")) == ["cat", "dog"]
  assert zero_shot.load_templates(["a {}.", "the {}"]) == ["a {}.", "the {}"]
  with pytest.raises(ConfigError, match=r"^template 'no slot' needs exactly one \{\}"):
    zero_shot.load_templates(["a {}.", "no slot"])
  with pytest.raises(ConfigError, match="^the list is empty"):
    zero_shot.load_classnames([])
  imagenet = zero_shot.load_classnames("imagenet")
  for name, first in (("imagenet_r", ["goldfish", "great white shark", "hammerhead shark"]),
                      ("imagenet_a", ["stingray", "goldfinch", "junco"])):
    subset = zero_shot.load_class_subset(name, 1000)
    assert len(subset) == len(set(subset.tolist())) == 200
    assert 0 <= subset.min() < subset.max() < 1000
    assert np.all(np.diff(subset) > 0)  # sorted wnids are sorted indices: folder order
    assert [imagenet[i] for i in subset[:3]] == first
  assert "imagenet_r" in zero_shot.known("class_subset")
  with pytest.raises(ConfigError, match="^class index 10 is outside the 10 class names"):
    zero_shot.load_class_subset([1, 10], 10)
  with pytest.raises(ConfigError, match="^1 class indices repeat"):
    zero_shot.load_class_subset([1, 1], 10)


def test_folder_names_are_the_readable_class_names_in_label_order(tmp_path, clip):
  method, mesh, _ = clip
  root = _digit_folder(tmp_path / "fm", {"ankle_boot": 0, "T-shirt_top": 1, "bag": 2}, 1)
  ev = _build(_folder_eval(root), method, mesh)["zs"]
  # Python's sorted order: upper case before lower case.
  assert ev.label_names() == ["T-shirt top", "ankle boot", "bag"]
  src = ev.sources["split"]
  assert [(src[i]["key"].split("/")[0], src[i]["label"]) for i in range(len(src))] == [
      ("T-shirt_top", 0), ("ankle_boot", 1), ("bag", 2)]
  assert ev.settings()["label_names"] == ev.label_names()
  names = tmp_path / "names.txt"
  names.write_text("shirt\nboot\nbag\n")
  assert _build(_folder_eval(root, classnames=str(names)), method, mesh)["zs"].classnames == [
      "shirt", "boot", "bag"]


@pytest.mark.parametrize("settings,message", [
    (dict(classnames=["a", "b"]),
     "evals.zs.classnames: 2 names for the 3 classes of split 'test'; give one per class, in "
     "label order"),
    (dict(classnames="digits", class_subset=[0, 1, 2, 3]),
     "evals.zs.class_subset: 4 indices for the 3 classes of split 'test'; give one per class, "
     "in label order"),
    (dict(classnames="fmnist"),
     "evals.zs.classnames='fmnist': no such class-name set; known: digits, imagenet (or a path"),
])
def test_bad_class_names_are_one_line_when_built(tmp_path, clip, settings, message):
  method, mesh, _ = clip
  root = _digit_folder(tmp_path / "f", {"a": 0, "b": 1, "c": 2}, 1)
  with pytest.raises(ConfigError) as e:
    _build(_folder_eval(root, **settings), method, mesh)
  assert str(e.value).startswith(message) and "\n" not in str(e.value)


def _caption_table(tmp_path, sep: str, name: str, label: bool) -> str:
  _digit_folder(tmp_path / "img", {"one": 1}, 2)
  head = ["filepath", "title"] + (["y"] if label else [])
  rows = [sep.join(head)] + [sep.join([f"img/one/{i}.png", "a photo of the number one."]
                                      + (["1"] if label else [])) for i in range(2)]
  (tmp_path / name).write_text("\n".join(rows) + "\n")
  return str(tmp_path / name)


def test_a_split_without_labels_is_refused_for_zero_shot(tmp_path, clip):
  method, mesh, _ = clip
  table = _caption_table(tmp_path, "\t", "caps.csv", label=False)
  with pytest.raises(ConfigError) as e:
    _build(dict(zs={**ZS, "classnames": "digits",
                    "data": dict(name="csv", splits=dict(test=table))}), method, mesh)
  assert str(e.value) == ("evals.zs.split='test': its records have no labels, which zero-shot "
                          "classification scores against (a CSV names its label column in "
                          "data.label_column)")


def test_class_name_count_mismatch_stops_the_run_before_step_one(tmp_path):
  (tmp_path / "nine.txt").write_text("\n".join(builtin.CLASSNAMES[:9]))
  work = tmp_path / "w"
  r = subprocess.run([sys.executable, "-m", "sslvl_jax.main",
                      "--config=configs/quickstart.py:smoke", f"--workdir={work}",
                      f"--config.evals.zero_shot.classnames={tmp_path}/nine.txt"],
                     cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
  assert r.returncode == 2, r.stderr[-2000:]
  assert r.stderr.strip().splitlines()[-1] == (
      "error: evals.zero_shot.classnames: 9 names for the 10 classes of split 'test'; give one "
      "per class, in label order")
  assert not os.path.exists(work / "checkpoints") and not os.path.exists(work / "metrics.jsonl")


# ---- CSV / TSV delimiters and train_tokenizer ---------------------------------------------------


def test_tab_separated_csv_is_sniffed_and_delimiter_can_be_set(tmp_path):
  tsv_in_csv = _caption_table(tmp_path, "\t", "caps.csv", label=True)
  cfg = ConfigDict(dict(name="csv", splits=dict(train=tsv_in_csv), image_size=32,
                        label_column="y"))
  src = data.source(cfg, "train")
  assert len(src) == 2 and src[0]["text"] == "a photo of the number one." and src[0]["label"] == 1
  semi = _caption_table(tmp_path, ";", "semi.txt", label=False)
  assert sources.CaptionTable(semi).captions == ["a photo of the number one."] * 2  # sniffed
  assert sources.CaptionTable(semi, delimiter=";").paths == ["img/one/0.png", "img/one/1.png"]
  assert sources.CaptionTable(tsv_in_csv, delimiter="tab", label_column="y").labels == ["1", "1"]
  with pytest.raises(ConfigError, match=r"^\S+caps.csv has no column 'filepath' \(columns: "
                                        r"\['filepath\\ttitle\\ty'\]\); set data.image_column"):
    sources.CaptionTable(tsv_in_csv, delimiter=",")
  with pytest.raises(ConfigError, match="^data.delimiter='ab': give one character"):
    sources.CaptionTable(tsv_in_csv, delimiter="ab")
  assert sources.table_delimiter("x.tsv", "a,b") == "\t"
  assert sources.table_delimiter("x.csv", "filepath") == ","


def test_train_tokenizer_reads_tables_and_fails_in_one_line(tmp_path):
  tsv_in_csv = _caption_table(tmp_path, "\t", "caps.csv", label=False)
  assert train_tokenizer.read_captions(f"{tsv_in_csv}:title") == ["a photo of the number one."] * 2
  with pytest.raises(ConfigError, match=r"^--captions=\S+caps.csv: name the caption column"):
    train_tokenizer.read_captions(tsv_in_csv)
  with pytest.raises(ConfigError, match=r"^--captions=\S+/nope.txt: cannot read \S+/nope.txt: "):
    train_tokenizer.read_captions(str(tmp_path / "nope.txt"))
  for spec, line in ((f"{tsv_in_csv}:caption",
                      f"error: {tsv_in_csv} has no column 'caption' (columns: ['filepath', "
                      f"'title']); give --captions={tsv_in_csv}:COLUMN with one of them, or "
                      "--delimiter if the columns ran together"),
                     (f"{tmp_path}/gone.tsv:title", f"error: cannot read table {tmp_path}/gone.tsv:"
                      " No such file or directory")):
    r = subprocess.run([sys.executable, "-m", "sslvl_jax.data.train_tokenizer",
                        f"--captions={spec}", f"--out={tmp_path}/tok"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [line], r.stderr[-2000:]


# ---- result files are never replaced ------------------------------------------------------------


def test_result_files_are_named_by_settings_and_never_replaced(tmp_path):
  settings = {"type": "knn", "k": 20}
  first = tasks.save_result(str(tmp_path), "knn", 3, {"knn/top1": 0.5}, settings)
  assert first.name == tasks.result_name("knn", 3, settings) + ".json"
  assert first.name.startswith("knn_3_") and len(first.name) == len("knn_3_abcdef.json")
  other = tasks.save_result(str(tmp_path), "knn", 3, {"knn/top1": 0.5}, {**settings, "k": 10})
  assert other != first
  before = first.read_bytes()
  again = tasks.save_result(str(tmp_path), "knn", 3, {"knn/top1": 0.25}, settings)  # a rerun
  assert first.read_bytes() == before and again.name == first.name[:-len("json")] + "1.json"
  assert tasks.save_result(str(tmp_path), "knn", 3, {"knn/top1": 0.5}, settings) == first
  assert json.loads(again.read_text())["results"] == {"knn/top1": 0.25}
  assert not (tmp_path / "evals" / "clip_benchmark").exists()  # only zero-shot results


@pytest.mark.slow
def test_standalone_evaluation_never_replaces_the_training_result(tmp_path):
  from sslvl_jax import evaluate, train  # pylint: disable=g-import-not-at-top
  work = str(tmp_path / "run")
  c = quickstart.get_config("smoke")  # zero-shot at the last step, 4
  train.run(c, work)
  evals = tmp_path / "run" / "evals"
  (trained,) = [p for p in os.listdir(evals) if p.endswith(".json")]
  assert trained.startswith("zero_shot_4_") and len(trained) == len("zero_shot_4_abcdef.json")
  before = (evals / trained).read_bytes()
  record = json.loads((evals / "clip_benchmark" / f"zero_shot_{trained}").read_text())
  assert record["task"] == "zeroshot_classification" and record["dataset"] == "zero_shot"
  assert record["metrics"]["acc1"] == json.loads(before)["results"]["zero_shot/top1"]
  c.evals.zero_shot.templates = "digits_train"  # other settings, same step
  res = evaluate.evaluate(c, work)
  assert (evals / trained).read_bytes() == before
  (standalone,) = {p for p in os.listdir(evals) if p.endswith(".json")} - {trained}
  assert standalone.startswith("zero_shot_4_")
  saved = json.loads((evals / standalone).read_text())
  assert saved["settings"]["templates"] == "digits_train"
  assert saved["results"]["zero_shot/top1"] == pytest.approx(res["zero_shot/top1"])


# ---- the zero-shot suite: class-subset masks and CLIP_benchmark records -------------------------


def test_suite_masks_logits_to_each_class_subset(tmp_path, clip):
  method, mesh, state = clip
  folders = {"all": {f"d{d}": d for d in range(10)}, "odd": {f"d{d}": d for d in (1, 3, 5, 7)},
             "few": {"d0": 0, "d2": 2, "d9": 9}}
  subsets = {"all": None, "odd": [1, 3, 5, 7], "few": [0, 2, 9]}
  datasets = {}
  for name, f in folders.items():
    datasets[name] = dict(data=dict(splits=dict(test=_digit_folder(tmp_path / name, f, 3))))
    if subsets[name]:
      datasets[name]["class_subset"] = subsets[name]
  suite = _build(dict(robustness=dict(
      type="zero_shot", classnames="digits", templates="digits_eval", batch_size=16,
      data=dict(name="image_folder"), datasets=datasets)), method, mesh)["robustness"]
  res = suite.run(*state)
  # Reference: numpy cosine scores, argmax restricted to the subset's columns.
  tok = Tokenizer(data.tokenizer_spec(method.config.data))
  fns = method.predict_fns()
  text = np.stack([np.asarray(fns["text_embed"](*state, tok.encode([t.format(c) for t in
                                                                      builtin.EVAL_TEMPLATES])))
                   for c in builtin.CLASSNAMES])
  text /= np.linalg.norm(text, axis=-1, keepdims=True)
  classes = text.mean(1) / np.linalg.norm(text.mean(1), axis=-1, keepdims=True)
  read = {name: sources.ImageFolder(str(tmp_path / name)) for name in folders}
  images = np.stack([np.asarray(Image.open(os.path.join(src.root, src.key(i))).convert("RGB"))
                     for src in read.values() for i in range(len(src))])
  emb = np.asarray(fns["image_embed"](*state, images), np.float64)  # one call: one compilation
  emb /= np.linalg.norm(emb, axis=-1, keepdims=True)
  masked_out = 0  # predictions the subset mask changed: the mask must matter here
  start = np.cumsum([0] + [len(src) for src in read.values()])
  for (name, f), src, lo, hi in zip(folders.items(), read.values(), start[:-1], start[1:]):
    labels = np.asarray([src.items[i][1] for i in range(len(src))])
    scores = emb[lo:hi] @ classes.T
    cols = subsets[name] or list(range(10))
    restricted = scores[:, cols]
    top = np.sort(restricted, axis=1)
    assert np.min(top[:, -1] - top[:, -2]) > 1e-5  # no near-tie the float32 path could flip
    pred = restricted.argmax(1)
    masked_out += int(np.sum(np.asarray(cols)[pred] != scores.argmax(1)))
    top5 = np.argsort(-restricted, axis=1)[:, :5]
    assert res[f"{name}/top1"] == pytest.approx(np.mean(pred == labels), abs=1e-9)
    assert res[f"{name}/top5"] == pytest.approx(np.mean((top5 == labels[:, None]).any(1)), abs=1e-9)
    recall = np.mean([np.mean(pred[labels == c] == c) for c in range(len(f))])
    assert res[f"{name}/mean_per_class_recall"] == pytest.approx(recall, abs=1e-9)
  assert masked_out > 0 and res["skipped"] == 0
  out = tasks.save_result(str(tmp_path / "w"), "robustness", 7,
                          {f"robustness/{k}": v for k, v in res.items()}, suite.settings())
  assert out.name.startswith("robustness_7_")
  for name in folders:
    record = json.loads((out.parent / "clip_benchmark" / f"{name}_{out.name}").read_text())
    assert record == {"dataset": name, "model": "w", "pretrained": "step_7",
                      "task": "zeroshot_classification", "language": "en",
                      "metrics": {"acc1": res[f"{name}/top1"], "acc5": res[f"{name}/top5"],
                                  "mean_per_class_recall": res[f"{name}/mean_per_class_recall"]}}

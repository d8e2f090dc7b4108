"""In-loop and standalone evaluators: feature extraction over the mesh + the eval math.

Each evaluator is configured by a dict in `config.evals` (name -> {type, every_steps, ...}) and
runs on its own schedule, like big_vision's evaluators. Every setting it uses is logged with it.
Building one checks all it can without weights (settings, splits, class names, templates,
tokenizer), so a bad value fails before training starts; at evaluation an unreadable record is
logged, left out and counted in the result's `skipped`.

An evaluator knows nothing of the method: it gets the method's prediction functions
(`Method.predict_fns`: fn(params, model_state, extras, batch)), jits the ones it needs once when
built, and calls them with the state of each evaluation, so no evaluation compiles the encoders
again. Its data config is the eval's `data` over the training data config it is given.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Callable, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from ml_collections import ConfigDict

from sslvl_jax import data, parallel
from sslvl_jax.data.examples import tokenizer
from sslvl_jax.errors import ConfigError, RunError
from sslvl_jax.evals import EVALUATORS, knn, linear_probe, retrieval_recalls, zero_shot

T = TypeVar("T")
# settings of every evaluator; the interval every_<unit> is resolved by the run's Schedule
COMMON = ("type", "every_steps", "every_epochs", "every_examples", "every_percent", "batch_size",
          "data")
TRAIN_TEST = {"train_split": "train", "test_split": "test"}


def checked(name: str, key: str, value: Any, fn: Callable[[], T]) -> T:
  """fn(), any failure raised as a one-line ConfigError naming `evals.<name>.<key>=value`."""
  try:
    return fn()
  except Exception as e:  # pylint: disable=broad-except  # whatever failed, name the setting
    reason = str(e) if isinstance(e, ConfigError) else f"{type(e).__name__}: {e}"
    raise ConfigError(f"evals.{name}.{key}={value!r}: {(reason.splitlines() or [''])[0]}") from e


def _open(cfg: ConfigDict, split: str) -> Any:
  """The source of `split`; one without records is a configuration error."""
  source = data.source(cfg, split)
  if not len(source):
    raise ConfigError("the split has no records")
  return source


class Evaluator:
  """Base: settings checked and splits opened up front, sharded feature extraction of a split."""

  SPLITS: dict[str, str] = {}  # split setting -> its default
  REQUIRED: tuple[str, ...] = ()
  OPTIONS: tuple[str, ...] = ()  # the other settings it reads
  EXAMPLE = "image_label"  # host transform of its records
  TEXT = False  # needs the tokenizer
  PREDICT: tuple[str, ...] = ("image_features",)  # the prediction functions it calls
  IMAGES = "image_features"  # the one `features` extracts

  def __init__(self, cfg: ConfigDict, predict_fns: dict[str, Callable], mesh: Any,
               train_data: ConfigDict, name: str | None = None):
    """`predict_fns`: Method.predict_fns(); `train_data`: the training data config, under the
    eval's own `data` (the eval reads its splits from it where it has no `data`)."""
    self.cfg, self.mesh = cfg, mesh
    self.name = name or cfg.type
    self._check_settings()
    missing = [k for k in self.PREDICT if k not in predict_fns]
    if missing:
      raise ConfigError(f"evals.{self.name}.type={cfg.type!r}: the method has no {missing[0]} "
                        f"(it predicts {', '.join(sorted(predict_fns)) or 'nothing'})")
    # Jitted once: params and state are arguments, so every evaluation reuses the executables.
    self.predict = {k: jax.jit(predict_fns[k]) for k in self.PREDICT}
    self.data_cfg = ConfigDict(train_data.to_dict())
    self.data_cfg.update(cfg.get("data", {}))
    self.batch_size = cfg.get("batch_size", 256)
    n = mesh.devices.size
    self.batch_size = -(-self.batch_size // n) * n
    self.splits = {key: cfg.get(key, default) for key, default in self.SPLITS.items()}
    self.sources = {key: checked(self.name, key, split, lambda s=split: _open(self.data_cfg, s))
                    for key, split in self.splits.items()}
    if self.TEXT:
      self.tokenizer = checked(self.name, "data.tokenizer", self.data_cfg.get("tokenizer"),
                               lambda: tokenizer(data.tokenizer_spec(self.data_cfg)))
    self.transform = data.example_transform(self.data_cfg, self.EXAMPLE, train=False)
    self.skipped = 0  # records left out as unreadable in the current run, all processes

  def _check_settings(self) -> None:
    """Every setting is one this evaluator reads, and the required ones are set."""
    known = sorted({*COMMON, *self.SPLITS, *self.REQUIRED, *self.OPTIONS})
    for key in self.cfg.keys():
      if key not in known:
        raise ConfigError(f"evals.{self.name}.{key}: not a setting of a {self.cfg.type} "
                          f"evaluator; known: {', '.join(known)}")
    for key in self.REQUIRED:
      if self.cfg.get(key) is None:
        raise ConfigError(f"evals.{self.name}.{key} is not set; a {self.cfg.type} evaluator "
                          f"needs {', '.join(self.REQUIRED)}")

  def run(self, params: Any, model_state: Any, extras: Any) -> dict[str, float]:
    """The metrics of `evaluate` on this state and `skipped`, the records left out as unreadable."""
    self.skipped = 0
    return {**self.evaluate(params, model_state, extras), "skipped": self.skipped}

  def evaluate(self, params: Any, model_state: Any, extras: Any) -> dict[str, float]:
    """The metrics of this evaluator (each subclass)."""
    raise NotImplementedError

  def _count(self, key: str, rows: int) -> None:
    """Add the records of split setting `key` missing from the `rows` read to `skipped`.

    `rows` counts what every process read, so this is the sum over processes of the records a
    process should have read minus the rows it got. No row at all is an error.
    """
    if not rows:
      raise RunError(f"evals.{self.name}.{key}={self.splits[key]!r}: all "
                         f"{len(self.sources[key])} records are unreadable (each is logged above)")
    self.skipped += len(self.sources[key]) - rows

  def features(self, params: Any, model_state: Any, extras: Any, key: str
               ) -> tuple[np.ndarray, np.ndarray]:
    """(features, labels) of the readable examples of split setting `key`, sharded over the mesh.

    The features are `IMAGES` of the predictions (image_features, or image_embed for zero-shot).

    Every process runs the same number of batches (zero-padded, with a validity mask), so the
    collectives line up on multi-host; rows come back grouped by process. A process whose
    records were left out as unreadable just has fewer valid rows.
    """
    source = self.sources[key]
    nproc = jax.process_count()
    local_bs = self.batch_size // nproc
    n_batches = -(-(-(-len(source) // nproc)) // local_bs)
    it = iter(data.make_dataset(source, self.transform, local_batch_size=local_bs, seed=0,
                                train=False))
    size = self.data_cfg.image_size
    predict = self.predict[self.IMAGES]
    feats, labels = [], []
    for _ in range(n_batches):
      local = next(it, None)
      n = 0 if local is None else len(local["label"])
      images = np.zeros((local_bs, size, size, 3), np.uint8)
      lab = np.full((local_bs,), -1, np.int64)
      if n:
        images[:n], lab[:n] = local["image"], local["label"]
      g = parallel.host_to_global(self.mesh, {"image": images})
      f = gather(predict(params, model_state, extras, g["image"]))
      valid = gather(np.arange(local_bs) < n)
      feats.append(f[valid])
      labels.append(gather(lab)[valid])
    self._count(key, sum(map(len, labels)))
    return np.concatenate(feats), np.concatenate(labels)

  def train_test(self, params: Any, model_state: Any, extras: Any) -> tuple:
    """(train feats, train labels, test feats, test labels, number of classes) for probes."""
    train_f, train_l = self.features(params, model_state, extras, "train_split")
    test_f, test_l = self.features(params, model_state, extras, "test_split")
    return train_f, train_l, test_f, test_l, int(self.cfg.get("num_classes", int(train_l.max()) + 1))

  def settings(self) -> dict:
    """Every setting of this evaluator, logged with its results."""
    return {"type": self.cfg.type, **{k: v for k, v in self.cfg.items() if k != "data"},
            "data": self.data_cfg.to_dict()}


def gather(x: Any) -> np.ndarray:
  """A global jax.Array, or each process's numpy array concatenated in process order, on every host."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  if isinstance(x, jax.Array) or jax.process_count() == 1:
    return np.asarray(jax.device_get(x))
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


class ZeroShot(Evaluator):
  """Zero-shot classification on one split: prompt-ensembled class embeddings vs image embeddings.

  Label i of the split is class name i. `classnames` and `templates` are each a list, a file
  (one per line) or a shipped set; left unset, the classes of an image folder are its folder
  names made readable ('ankle_boot' -> 'ankle boot') in its label order (sorted folder names).
  With `class_subset` (indices into `classnames`), label j is class `class_subset[j]` and only the
  subset's classes are scored. A split without labels, or with another number of classes than
  given, is refused when the evaluator is built.
  """

  SPLITS = {"split": "test"}
  REQUIRED = ("templates",)
  OPTIONS = ("classnames", "class_subset")
  TEXT = True
  PREDICT = ("image_embed", "text_embed")
  IMAGES = "image_embed"

  def __init__(self, cfg: ConfigDict, predict_fns: dict[str, Callable], mesh: Any,
               train_data: ConfigDict, name: str | None = None):
    super().__init__(cfg, predict_fns, mesh, train_data, name)
    self.templates = checked(self.name, "templates", cfg.templates,
                             lambda: zero_shot.load_templates(cfg.templates))
    source, split = self.sources["split"], self.splits["split"]
    if not getattr(source, "labelled", True):
      raise ConfigError(f"evals.{self.name}.split={split!r}: its records have no labels, which "
                        "zero-shot classification scores against (a CSV names its label column "
                        "in data.label_column)")
    self.classnames = self._classnames(source)
    subset = cfg.get("class_subset")
    self.subset = None if subset is None else checked(
        self.name, "class_subset", subset,
        lambda: zero_shot.load_class_subset(subset, len(self.classnames)))
    self.num_classes = len(self.classnames if self.subset is None else self.subset)
    expected = getattr(source, "num_classes", None)
    if expected is not None and expected != self.num_classes:
      key, what = ("classnames", "names") if self.subset is None else ("class_subset", "indices")
      raise ConfigError(f"evals.{self.name}.{key}: {self.num_classes} {what} for the {expected} "
                        f"classes of split {split!r}; give one per class, in label order")

  def _classnames(self, source: Any) -> list[str]:
    """`cfg.classnames` loaded, or unset the readable class-folder names of an image folder."""
    value = self.cfg.get("classnames")
    if value is not None:
      return checked(self.name, "classnames", value, lambda: zero_shot.load_classnames(value))
    folders = getattr(source, "classes", None)
    if not folders:
      raise ConfigError(f"evals.{self.name}.classnames is not set; a zero_shot evaluator needs "
                        "classnames, templates (a list, a file or a shipped set; only an image "
                        "folder names its classes itself)")
    return [zero_shot.readable(c) for c in folders]

  def label_names(self) -> list[str]:
    """The class name of each label of the split, in label order."""
    return (self.classnames if self.subset is None
            else [self.classnames[i] for i in self.subset])

  def class_embeddings(self, params: Any, model_state: Any, extras: Any) -> jax.Array:
    """(len(classnames), d) prompt-ensembled text embeddings of every class name."""
    encode = self.predict["text_embed"]
    return zero_shot.class_text_embeddings(
        lambda t: np.asarray(encode(params, model_state, extras, jnp.asarray(t))),
        self.tokenizer.encode, self.classnames, self.templates)

  def scored(self, class_emb: jax.Array, params: Any, model_state: Any, extras: Any
             ) -> dict[str, float]:
    """Top-1/top-5 and mean per-class recall of the split against `class_emb`, restricted to the
    subset's classes if any."""
    feats, labels = self.features(params, model_state, extras, "split")
    if labels.max() >= self.num_classes:
      raise RunError(f"evals.{self.name}.split={self.splits['split']!r}: label {labels.max()} "
                     f"but only {self.num_classes} classes are named")
    scores = np.asarray(zero_shot.zero_shot_scores(feats, class_emb))
    if self.subset is not None:
      scores = scores[:, self.subset]
    return {**knn.topk_accuracy(scores, labels, ks=(1, 5)),
            "mean_per_class_recall": zero_shot.mean_per_class_recall(scores, labels)}

  def evaluate(self, params: Any, model_state: Any, extras: Any) -> dict[str, float]:
    """Top-1/top-5 and mean per-class recall on `cfg.split`."""
    return self.scored(self.class_embeddings(params, model_state, extras),
                       params, model_state, extras)

  def settings(self) -> dict:
    """Every setting, with the class name of each label as scored."""
    return {**super().settings(), "label_names": self.label_names()}


class ZeroShotSuite(Evaluator):
  """Zero-shot classification over several datasets (e.g. ImageNet-V2, -R, -A, -Sketch).

  `datasets` maps a dataset name to its settings (data, split, classnames, templates,
  class_subset) over the suite's own; each is a ZeroShot evaluator and reports
  '<dataset>/<metric>'. Class embeddings are computed once per distinct set of class names,
  templates and tokenizer.
  """

  REQUIRED = ("datasets", "templates")
  OPTIONS = ("split", "classnames", "class_subset")
  PREDICT = ()  # each dataset's evaluator checks and jits its own

  def __init__(self, cfg: ConfigDict, predict_fns: dict[str, Callable], mesh: Any,
               train_data: ConfigDict, name: str | None = None):
    super().__init__(cfg, predict_fns, mesh, train_data, name)
    if not isinstance(cfg.datasets, (dict, ConfigDict)) or not cfg.datasets:
      raise ConfigError(f"evals.{self.name}.datasets: give a dict of dataset name -> its "
                        "settings (data, split, classnames, class_subset)")
    shared = {k: cfg[k] for k in ("templates", *self.OPTIONS, "batch_size") if k in cfg}
    self.evaluators = {}
    for dataset, entry in cfg.datasets.items():
      entry = dict(entry)
      sub = ConfigDict({"type": "zero_shot", **shared, **entry,
                        "data": {**dict(cfg.get("data", {})), **dict(entry.get("data", {}))}})
      self.evaluators[dataset] = ZeroShot(sub, predict_fns, mesh, train_data,
                                          f"{self.name}.datasets.{dataset}")

  def evaluate(self, params: Any, model_state: Any, extras: Any) -> dict[str, float]:
    """'<dataset>/<metric>' of every dataset."""
    embeddings, out = {}, {}
    for dataset, ev in self.evaluators.items():
      key = (tuple(ev.classnames), tuple(ev.templates), str(data.tokenizer_spec(ev.data_cfg)))
      if key not in embeddings:
        embeddings[key] = ev.class_embeddings(params, model_state, extras)
      ev.skipped = 0
      res = ev.scored(embeddings[key], params, model_state, extras)
      out.update({f"{dataset}/{k}": v for k, v in res.items()})
      self.skipped += ev.skipped
    return out

  def settings(self) -> dict:
    """The suite's settings, each dataset's in full under `datasets`."""
    return {**super().settings(),
            "datasets": {d: ev.settings() for d, ev in self.evaluators.items()}}


@EVALUATORS.register("zero_shot")
def _zero_shot(cfg: ConfigDict, predict_fns: dict[str, Callable], mesh: Any,
               train_data: ConfigDict, name: str | None = None) -> Evaluator:
  """A zero-shot evaluator: of one split, or a suite with `datasets`."""
  kind = ZeroShot if cfg.get("datasets") is None else ZeroShotSuite
  return kind(cfg, predict_fns, mesh, train_data, name)


@EVALUATORS.register("knn")
class Knn(Evaluator):
  """DINO k-NN: cosine similarity, top-k, votes weighted by exp(sim / T)."""

  SPLITS = TRAIN_TEST
  OPTIONS = ("k", "temperature", "num_classes")

  def __init__(self, cfg: ConfigDict, predict_fns: dict[str, Callable], mesh: Any,
               train_data: ConfigDict, name: str | None = None):
    super().__init__(cfg, predict_fns, mesh, train_data, name)
    self.k, bank = cfg.get("k", 20), len(self.sources["train_split"])
    if self.k > bank:
      raise ConfigError(f"evals.{self.name}.k={self.k}: more neighbours than the {bank} records "
                        f"of train_split={self.splits['train_split']!r}")

  def evaluate(self, params: Any, model_state: Any, extras: Any) -> dict[str, float]:
    """Top-1/top-5 of `cfg.test_split` against the `cfg.train_split` feature bank."""
    train_f, train_l, test_f, test_l, num_classes = self.train_test(params, model_state, extras)
    scores = knn.knn_predict(train_f, train_l, test_f, num_classes=num_classes,
                             k=self.k, temperature=self.cfg.get("temperature", 0.07),
                             mesh=self.mesh)
    return knn.topk_accuracy(scores, test_l, ks=(1, 5))


@EVALUATORS.register("linear_probe")
class LinearProbe(Evaluator):
  """Linear classifier on frozen features with a small lr/wd sweep on a held-out split."""

  SPLITS = TRAIN_TEST
  OPTIONS = ("probe", "num_classes")

  def evaluate(self, params: Any, model_state: Any, extras: Any) -> dict[str, float]:
    """Top-1/top-5 on `cfg.test_split` after training on `cfg.train_split`."""
    train_f, train_l, test_f, test_l, num_classes = self.train_test(params, model_state, extras)
    res = linear_probe.linear_probe(train_f, train_l, test_f, test_l, num_classes=num_classes,
                                    **self.cfg.get("probe", {}))
    return {k: float(v) for k, v in res.items() if np.ndim(v) == 0 and not isinstance(v, str)}


def build_all(cfg: ConfigDict, method: Any, mesh: Any, *,
              predict_fns: dict[str, Callable] | None = None,
              train_data: ConfigDict | None = None) -> dict[str, Evaluator]:
  """Evaluators of `config.evals` by name, each checked against its data and assets.

  They get `predict_fns` (default `method.predict_fns()`) and the training data config
  `train_data` (default `method.config.data`, the config the method trains on); nothing else of
  the method.
  """
  predict_fns = method.predict_fns() if predict_fns is None else predict_fns
  train_data = method.config.data if train_data is None else train_data
  out = {}
  for name, c in cfg.items():
    kind = c.get("type")
    out[name] = checked(name, "type", kind, lambda k=kind: EVALUATORS.get(k))(
        c, predict_fns, mesh, train_data, name)
  return out


def result_name(name: str, step: int, settings: dict) -> str:
  """'<name>_<step>_<hash>': the evaluator, the step and 6 hex digits of its settings' hash."""
  text = json.dumps(settings, sort_keys=True, default=str)
  return f"{name}_{step}_{hashlib.sha256(text.encode()).hexdigest()[:6]}"


def write_new(path: epath.Path, text: str) -> epath.Path:
  """Write `text` at `path` and return it; a file there already is never replaced: unless it
  holds `text`, the first free `<stem>.1.json`, `<stem>.2.json`... is written instead."""
  stem, k, p = path.name[:-len(".json")], 0, path
  while p.exists() and p.read_text() != text:
    k += 1
    p = path.with_name(f"{stem}.{k}.json")
  if not p.exists():
    p.write_text(text)
  return p


def clip_benchmark_records(name: str, step: int, result: dict, settings: dict, model: str
                           ) -> dict[str, dict]:
  """{dataset: CLIP_benchmark result record} of a zero_shot result ({} for other evaluators).

  A suite's results are '<name>/<dataset>/<metric>', one split's '<name>/<metric>' (the dataset
  is then named by the evaluator); `model` and 'pretrained': 'step_<step>' name the weights.
  """
  if settings.get("type") != "zero_shot":
    return {}
  prefixes = ({d: f"{name}/{d}/" for d in settings["datasets"]} if "datasets" in settings
              else {name: f"{name}/"})
  return {d: {"dataset": d, "model": model, "pretrained": f"step_{step}",
              "task": "zeroshot_classification", "language": "en",
              "metrics": {"acc1": float(result[p + "top1"]), "acc5": float(result[p + "top5"]),
                          "mean_per_class_recall": float(result[p + "mean_per_class_recall"])}}
          for d, p in prefixes.items()}


def save_result(workdir: str, name: str, step: int, result: dict, settings: dict
                ) -> epath.Path | None:
  """WORKDIR/evals/<result_name>.json with the results and every setting used (process 0);
  returns its path. No result file is ever replaced (`write_new`), so a standalone evaluation
  with other settings keeps the training run's. Zero-shot results are also written as
  CLIP_benchmark records, WORKDIR/evals/clip_benchmark/<dataset>_<result_name>.json."""
  if jax.process_index() != 0:
    return None
  folder, stem = epath.Path(workdir) / "evals", result_name(name, step, settings)
  folder.mkdir(parents=True, exist_ok=True)
  model = os.path.basename(os.path.normpath(os.fspath(workdir)))
  for dataset, record in clip_benchmark_records(name, step, result, settings, model).items():
    (folder / "clip_benchmark").mkdir(exist_ok=True)
    write_new(folder / "clip_benchmark" / f"{dataset}_{stem}.json", json.dumps(record, indent=1))
  return write_new(folder / f"{stem}.json", json.dumps(
      {"step": step, "results": {k: float(v) for k, v in result.items()}, "settings": settings},
      indent=1, default=str))


@EVALUATORS.register("retrieval")
class Retrieval(Evaluator):
  """Image-text retrieval R@1/5/10 on `cfg.split` of an image-text source.

  Rows may repeat an image with another caption (COCO/Flickr30k layout: one row per caption);
  identical decoded images are one gallery entry, so an image counts as found when any of its
  captions is retrieved.
  """

  SPLITS = {"split": "test"}
  OPTIONS = ("ks",)
  EXAMPLE = "image_text"
  TEXT = True
  PREDICT = ("image_embed", "text_embed")
  IMAGES = "image_embed"

  def evaluate(self, params: Any, model_state: Any, extras: Any) -> dict[str, float]:
    """Image->text and text->image recall at `cfg.ks` (default 1, 5, 10)."""
    # Every process reads the whole split and computes the recalls itself.
    batches = list(data.make_dataset(self.sources["split"], self.transform,
                                     local_batch_size=self.batch_size, seed=0, train=False,
                                     process_index=0, process_count=1))
    self._count("split", sum(len(b["tokens"]) for b in batches))
    rows = np.concatenate([b["image"] for b in batches])
    tokens = np.concatenate([b["tokens"] for b in batches])
    index: dict[bytes, int] = {}
    text_to_image = np.asarray([index.setdefault(im.tobytes(), len(index)) for im in rows])
    images = rows[np.unique(text_to_image, return_index=True)[1]]
    image_fn, text_fn = self.predict["image_embed"], self.predict["text_embed"]
    img = np.concatenate([np.asarray(image_fn(params, model_state, extras,
                                              jnp.asarray(images[i:i + self.batch_size])))
                          for i in range(0, len(images), self.batch_size)])
    txt = np.concatenate([np.asarray(text_fn(params, model_state, extras,
                                             jnp.asarray(tokens[i:i + self.batch_size])))
                          for i in range(0, len(tokens), self.batch_size)])
    return retrieval_recalls(img, txt, text_to_image, ks=tuple(self.cfg.get("ks", (1, 5, 10))))

"""gs:// workdirs and data against a real GCS JSON API server on 127.0.0.1 (gcp-storage-emulator).

Every client is pointed at the emulator: google-cloud-storage (tensorboardX's gs:// writer) and
gcsfs (etils.epath's gs:// backend without TensorFlow, used for metrics, configs, orbax
metadata and data) read STORAGE_EMULATOR_HOST; TensorStore (orbax's arrays) reads
TENSORSTORE_GCS_HTTP_URL and, instead of Google credentials, GOOGLE_AUTH_TOKEN_FOR_TESTING.
TensorStore also needs the x-goog-generation header that real GCS sends with every media
download and the emulator leaves out, so the fixture adds it.
"""

import io
import json
import logging
import os
import re
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from etils import epath
from PIL import Image

from sslvl_jax.data import builtin
from tests.shards import write_tar

pytest.importorskip("gcp_storage_emulator")
pytest.importorskip("gcsfs")
from gcp_storage_emulator.exceptions import NotFound  # noqa: E402
from gcp_storage_emulator.handlers import objects  # noqa: E402
from gcp_storage_emulator.server import create_server  # noqa: E402
from google.cloud import storage  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = "bucket"
ARGS = ["--config=configs/quickstart.py:smoke", "--config.num_devices=1",
        "--config.log_every_steps=1"]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _with_generation(download):
  """The emulator's media download, plus the x-goog-generation header of real GCS."""
  def handler(request, response, storage_, *args, **kwargs):
    download(request, response, storage_, *args, **kwargs)
    try:
      obj = storage_.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    except NotFound:
      return
    response["x-goog-generation"] = obj["generation"]
  return handler


@pytest.fixture(scope="module")
def gcs_env():
  """An in-memory emulator with BUCKET; the environment that sends every client to it."""
  logging.getLogger("gcp_storage_emulator").setLevel(logging.CRITICAL)
  download, objects.download = objects.download, _with_generation(objects.download)
  port = _free_port()
  server = create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET)
  server.start()
  url = f"http://127.0.0.1:{port}"
  env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
         "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator", "NO_GCE_CHECK": "true",
         "GOOGLE_CLOUD_PROJECT": "test"}
  old = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  yield {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO}
  for k, v in old.items():
    if v is None:
      os.environ.pop(k)
    else:
      os.environ[k] = v
  server.stop()
  objects.download = download


def _cli(module: str, args: list[str], env: dict) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)


def _blob_text(name: str) -> str:
  return storage.Client().bucket(BUCKET).blob(name).download_as_text()


def _names(prefix: str) -> list[str]:
  return [b.name for b in storage.Client().list_blobs(BUCKET, prefix=prefix)]


@pytest.mark.slow
def test_gs_workdir_killed_resumes_bitwise_and_exports(gcs_env, tmp_path):
  """kill -9 after the first checkpoint reached the bucket; the rerun resumes from the bucket and
  ends with the parameters of the same run on a local disk, bit for bit; then export to gs://."""
  steps = 30  # long enough that the kill lands mid-run
  workdir, run = f"gs://{BUCKET}/run", [*ARGS, f"--config.total_steps={steps}",
                                        "--config.checkpoint_every_steps=2"]
  r = _cli("sslvl_jax.main", [*run, f"--workdir={tmp_path / 'local'}"], gcs_env)
  assert r.returncode == 0, r.stderr[-3000:]
  p = subprocess.Popen([sys.executable, "-m", "sslvl_jax.main", *run, f"--workdir={workdir}"],
                       cwd=REPO, env=gcs_env, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  committed = re.compile(r"run/checkpoints/\d+/commit_success\.txt")  # a finished step
  while time.time() < deadline and p.poll() is None and not any(
      committed.fullmatch(n) for n in _names("run/checkpoints/")):
    time.sleep(0.1)
  p.kill()
  assert p.wait() == -9, "the run ended before the kill"
  r = _cli("sslvl_jax.main", [*run, f"--workdir={workdir}"], gcs_env)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "resumed from step " in r.stdout and f" in {workdir}/checkpoints" in r.stdout
  rows = [json.loads(line) for line in _blob_text("run/metrics.jsonl").splitlines()]
  assert [row["step"] for row in rows if "train/loss" in row] == list(range(1, steps + 1))
  names = _names("run/")
  assert "run/config.json" in names
  assert any(n.startswith("run/tensorboard/events.out.tfevents") for n in names)
  assert not any(n.startswith("gs:") for n in os.listdir(REPO))  # no local 'gs:' directory
  local, remote = _params(str(tmp_path / "local"), steps), _params(workdir, steps)
  for x, y in zip(local, remote):
    np.testing.assert_array_equal(x, y)
  r = _cli("sslvl_jax.export", [*ARGS, f"--workdir={workdir}"], gcs_env)
  assert r.returncode == 0, r.stderr[-3000:]
  info = json.loads(_blob_text("run/export/config.json"))
  assert "run/export/model.safetensors" in _names("run/export/")
  assert info["step"] == steps


def _params(workdir: str, step: int) -> list[np.ndarray]:
  """The saved student params of `step` (a local path or gs://), in a subprocess-free read."""
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  mgr = ocp.CheckpointManager(epath.Path(workdir) / "checkpoints")
  out = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  return [np.asarray(x) for x in jax.tree.leaves(out["state"]["params"])]


@pytest.mark.slow
def test_gs_webdataset_shards_stream_and_train(gcs_env, tmp_path):
  """Shards in the bucket: training streams them (data.streaming), zero-shot reads them indexed."""
  bucket = storage.Client().bucket(BUCKET)
  digits = builtin.DigitsSource("train")
  for s in range(2):
    members = []
    for i in range(16 * s, 16 * s + 16):
      png = io.BytesIO()
      Image.fromarray(digits[i]["image"]).save(png, format="PNG")
      members += [(f"{i:05d}.png", png.getvalue()), (f"{i:05d}.txt", digits[i]["text"].encode()),
                  (f"{i:05d}.cls", str(digits[i]["label"]).encode())]
    shard = write_tar(tmp_path / f"s-{s:02d}.tar", members)
    bucket.blob(f"wds/s-{s:02d}.tar").upload_from_filename(shard)
  r = _cli("sslvl_jax.main", [*ARGS, f"--workdir=gs://{BUCKET}/wds_run",
                              "--config.data.name=webdataset", "--config.data.streaming=True",
                              "--config.data.num_examples=32",
                              f"--config.data.splits.train=gs://{BUCKET}/wds/s-{{00..01}}.tar",
                              f"--config.data.splits.test=gs://{BUCKET}/wds/s-01.tar",
                              "--config.total_steps=3"], gcs_env)
  assert r.returncode == 0, r.stderr[-3000:]
  rows = [json.loads(line) for line in _blob_text("wds_run/metrics.jsonl").splitlines()]
  train_rows = [row for row in rows if "train/loss" in row]
  assert [row["step"] for row in train_rows] == [1, 2, 3]
  assert train_rows[-1]["data/skipped"] == 0
  zero_shot = [row for row in rows if "zero_shot/top1" in row]  # the indexed reader, on gs://
  assert zero_shot and zero_shot[-1]["zero_shot/skipped"] == 0


@pytest.mark.slow
def test_gs_caption_table_trains(gcs_env):
  bucket = storage.Client().bucket(BUCKET)
  digits = builtin.DigitsSource("train")
  lines = ["filepath,title,label"]  # labels: the quickstart's zero-shot evaluator scores them
  for i in range(32):
    buf = io.BytesIO()
    Image.fromarray(digits[i]["image"]).save(buf, format="PNG")
    bucket.blob(f"csv/images/{i}.png").upload_from_string(buf.getvalue())
    lines.append(f"images/{i}.png,{digits[i]['text']},{digits[i]['label']}")
  bucket.blob("csv/train.csv").upload_from_string("\n".join(lines) + "\n")
  table = f"gs://{BUCKET}/csv/train.csv"
  r = _cli("sslvl_jax.main", [*ARGS, f"--workdir=gs://{BUCKET}/csv_run", "--config.data.name=csv",
                              f"--config.data.splits.train={table}",
                              f"--config.data.splits.test={table}", "--config.total_steps=2",
                              "--config.data.label_column=label"],
           gcs_env)
  assert r.returncode == 0, r.stderr[-3000:]
  rows = [json.loads(line) for line in _blob_text("csv_run/metrics.jsonl").splitlines()]
  train_rows = [row for row in rows if "train/loss" in row]
  assert [row["step"] for row in train_rows] == [1, 2]
  assert train_rows[-1]["data/skipped"] == 0

"""The run directory: checked before anything is built, and locked against a second run."""

from __future__ import annotations

import json
import os
import socket
import threading
import time

from etils import epath

from sslvl_jax.errors import ConfigError

LOCK = "LOCK"
STALE_SECONDS = 15 * 60  # a lock of another host not refreshed for this long is from a dead run


def is_url(path: str | os.PathLike) -> bool:
  """True for an object-store URL (gs://bucket/...), False for a local path."""
  return "://" in os.fspath(path)


def absolute(path: str | os.PathLike) -> epath.Path:
  """`path` as an epath.Path: URLs as they are, local paths made absolute."""
  return epath.Path(path if is_url(path) else os.path.abspath(os.fspath(path)))


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


class Lock:
  """WORKDIR/LOCK holding {host, pid}; a stale lock (dead process) is taken over with a warning.

  The holder refreshes the lock's mtime every minute from a daemon thread; another host's lock
  counts as stale when not refreshed for STALE_SECONDS, so a job requeued on a new node resumes
  instead of waiting forever.

  An object-store workdir (gs://) is not locked: epath opens files only in modes r/w/a, with no
  create-if-absent, so two runs cannot exclude each other there; the scheduler must not start a
  second run on the same gs:// workdir.
  """

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, LOCK)
    self.me = {"host": socket.gethostname(), "pid": os.getpid()}
    self._held = threading.Event()
    if is_url(workdir):
      return
    while True:
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        self._take_over_if_stale()
        continue
      with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(self.me, f)
      threading.Thread(target=self._refresh, daemon=True).start()
      return

  def _refresh(self) -> None:
    while not self._held.wait(60):
      try:
        os.utime(self.path)
      except OSError:
        return

  def _take_over_if_stale(self) -> None:
    try:
      with open(self.path, encoding="utf-8") as f:
        owner = json.load(f)
      age = time.time() - os.path.getmtime(self.path)
    except (OSError, ValueError):  # gone meanwhile, or torn by a kill: stale
      owner, age = {}, float("inf")
    same_host = owner.get("host") == self.me["host"]
    if (same_host and _alive(int(owner.get("pid", -1)))) or (not same_host and
                                                              age < STALE_SECONDS):
      raise ConfigError(f"{os.path.dirname(self.path)} is in use by the run of pid "
                        f"{owner.get('pid')} on {owner.get('host')}; wait for it, use another "
                        f"--workdir, or delete {self.path} if that run is dead")
    print(f"warning: taking over the stale lock {self.path} of pid {owner.get('pid')} on "
          f"{owner.get('host')}", flush=True)
    try:
      os.remove(self.path)
    except FileNotFoundError:
      pass

  def release(self) -> None:
    """Stop refreshing and remove the lock."""
    self._held.set()
    if is_url(self.path):
      return
    try:
      os.remove(self.path)
    except FileNotFoundError:
      pass


def prepare(workdir: str) -> None:
  """Create `workdir`, or say in one line why it cannot be used (a file, not writable)."""
  if is_url(workdir):  # object stores have no directories; the bucket must exist
    try:
      import gcsfs, google.cloud.storage  # noqa: F401,E401  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ConfigError(f"--workdir={workdir} needs the gcs extra: pip install "
                        f"'sslvl_jax[gcs]' ({e})") from e
    bucket = epath.Path("/".join(workdir.split("/")[:3]))
    if not bucket.exists():
      raise ConfigError(f"--workdir={workdir}: bucket {bucket} does not exist or is not readable")
    return
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ConfigError(f"--workdir={workdir} is a file; give a directory")
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise ConfigError(f"--workdir={workdir} cannot be created: {e.strerror}") from e
  if not os.access(workdir, os.W_OK | os.X_OK):
    raise ConfigError(f"--workdir={workdir} is not writable; give a directory you can write to")

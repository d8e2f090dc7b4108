"""Test helper: webdataset tar shards written from (member name, bytes) pairs."""

from __future__ import annotations

import io
import os
import tarfile
from typing import Iterable


def write_tar(path: str | os.PathLike, members: Iterable[tuple[str, bytes]]) -> str:
  """Writes an uncompressed tar of `members` ("{key}.{ext}", data), in order, to path; the path."""
  with tarfile.open(path, "w") as tar:
    for name, blob in members:
      info = tarfile.TarInfo(name)
      info.size = len(blob)
      tar.addfile(info, io.BytesIO(blob))
  return str(path)

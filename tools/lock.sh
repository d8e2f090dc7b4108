#!/usr/bin/env bash
# Regenerate the pinned stacks requirements/py<VERSION>.txt from pyproject.toml (with the test
# extra) and requirements/build.in, one per supported Python, with a pinned uv.
#   bash tools/lock.sh                 # 3.12 and 3.11, newest releases that fit pyproject.toml
#   bash tools/lock.sh --upgrade-package jax    # extra arguments go to `uv pip compile`
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
UV_VERSION=0.13.9
TOOLS="$ROOT/.venv-lock"
if [ ! -x "$TOOLS/bin/uv" ] || [ "$("$TOOLS/bin/uv" --version | cut -d' ' -f2)" != "$UV_VERSION" ]; then
  python3 -m venv "$TOOLS"
  "$TOOLS/bin/python" -m pip install -q "uv==$UV_VERSION"
fi
cd "$ROOT"
for v in 3.12 3.11; do
  "$TOOLS/bin/uv" pip compile --quiet pyproject.toml requirements/build.in --extra test \
    --python-version "$v" --python-platform linux --custom-compile-command "bash tools/lock.sh" \
    -o "requirements/py$v.txt" "$@"
done

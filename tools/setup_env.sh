#!/usr/bin/env bash
# Create (or reuse) a virtual environment with the pinned stack requirements/py<VERSION>.txt
# (every package, pip and setuptools included) and sslvl_jax installed from this checkout.
#   usage: source tools/setup_env.sh [PYTHON_VERSION]   -> sets $PY to the venv's python
set -euo pipefail
PYVER="${1:-3.12}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LOCK="$ROOT/requirements/py$PYVER.txt"
VENV="${VENV:-$ROOT/.venv-py$PYVER}"
[ -f "$LOCK" ] || { echo "no pinned stack for Python $PYVER ($LOCK); supported: 3.11, 3.12" >&2; exit 2; }
find_python() {
  for cand in "python$PYVER" "$HOME/.pyenv/versions/$PYVER"*/bin/"python$PYVER" \
              /root/.pyenv/versions/"$PYVER"*/bin/"python$PYVER"; do
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys' >/dev/null 2>&1; then
      command -v "$cand"; return 0
    fi
  done
  if [ "$PYVER" = "$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')" ]; then
    command -v python3; return 0
  fi
  echo "no python$PYVER found (install it, e.g. with pyenv)" >&2; return 1
}
if [ ! -x "$VENV/bin/python" ]; then
  PYENV_VERSION="$(ls "$HOME/.pyenv/versions" 2>/dev/null | grep "^$PYVER" | head -1 || true)" \
    "$(find_python)" -m venv "$VENV"
fi
pipi() { "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$@" 2>&1 \
           | { grep -v "^WARNING: Location .* is ignored" || true; }; }
pipi "$(grep '^pip==' "$LOCK")"
# Exactly the lock: no dependency resolution, so nothing unpinned can slip in...
pipi --no-deps -r "$LOCK"
# ...and the project itself built with the locked setuptools, not a fresh one.
pipi --no-deps --no-build-isolation -e "$ROOT"
"$VENV/bin/python" -m pip check >/dev/null
PY="$VENV/bin/python"
export PY

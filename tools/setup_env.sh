#!/usr/bin/env bash
# Create (or reuse) a virtual environment and install sslvl_jax with the given extras.
#   usage: source tools/setup_env.sh [PYTHON_VERSION] [EXTRAS]   -> sets $PY to the venv's python
set -euo pipefail
PYVER="${1:-3.12}"
EXTRAS="${2:-test}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv-py$PYVER}"
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
"$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
"$VENV/bin/python" -m pip install -q -e "$ROOT[$EXTRAS]"
PY="$VENV/bin/python"
export PY

#!/usr/bin/env bash
# Install the pinned stack requirements/py<VERSION>.txt into .venv-py<VERSION> and run the tests.
#   bash tools/run_tests.sh            # Python 3.12, whole suite
#   bash tools/run_tests.sh 3.11 -m "not slow"    # other Python, extra pytest arguments
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYVER="${1:-3.12}"
shift || true
source "$ROOT/tools/setup_env.sh" "$PYVER"
cd "$ROOT"
"$PY" -c 'import jax, flax, sys; print(f"python {sys.version.split()[0]} jax {jax.__version__} flax {flax.__version__}")'
"$PY" -m pytest -q -n 2 --durations=15 "$@"

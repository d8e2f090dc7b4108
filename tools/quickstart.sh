#!/usr/bin/env bash
# Install sslvl_jax and train the quickstart CLIP on the built-in digits (CPU, a few minutes).
#   bash tools/quickstart.sh [WORKDIR]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORKDIR="${1:-$ROOT/workdirs/quickstart}"
source "$ROOT/tools/setup_env.sh" 3.12
cd "$ROOT"
"$PY" -m sslvl_jax.main --config=configs/quickstart.py --workdir="$WORKDIR"

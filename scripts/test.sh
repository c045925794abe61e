#!/usr/bin/env bash
# Set everything up in .venv, lint, and run the test suite (CPU; GPU tests skip themselves without CUDA).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/bootstrap.sh"
venv="${RWKV_MUSIC_VENV:-$root/.venv}"
cd "$root"
"$venv/bin/ruff" check .
"$venv/bin/python" -m pytest "$@"

#!/usr/bin/env bash
# Create .venv (if missing) and install rwkv-music with its test extras into it.
# Torch comes first, pinned to 2.13.0 only when no torch is present: on these machines that wheel is a small
# CPU build on local disk, while an unpinned `torch` could pull a multi-GB CUDA build. Users keep torch>=2.5.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${RWKV_MUSIC_VENV:-$root/.venv}"
python="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
    echo "[setup] creating virtual environment in $venv"
    "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
if ! "$venv/bin/python" -c "import torch" >/dev/null 2>&1; then
    echo "[setup] installing torch==2.13.0"
    "${pip[@]}" install "torch==2.13.0"
fi
echo "[setup] installing rwkv-music and its test dependencies"
"${pip[@]}" install -e "$root[test]"

#!/usr/bin/env bash
# Download into .whl/ the wheels a GPU machine without package access needs to run the benches and the
# end-to-end proof: the project's runtime dependencies its image may lack (miditok, symusic, dask,
# distributed, webdataset, bokeh and what they pull in), at the versions installed in this checkout's .venv,
# plus the comparison packages of the benches (BlinkDL's `rwkv`, FLA) with WITH_BENCH_REFS=1.
#
#   bash bench/device_wheels.sh                 # then carry .whl/ and, on the machine:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=$PWD:/tmp/site
#
# The wheels are for CPython 3.12 on x86_64 Linux (PY_VERSION overrides). Without bokeh, `build-shards` skips
# its Dask performance report; without the others nothing runs, so check the list when dependencies change.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv_py="${VENV_PY:-$root/.venv/bin/python}"
dest="$root/.whl"
py_version="${PY_VERSION:-3.12}"
pkgs=(miditok symusic pySmartDL platformdirs dask distributed partd locket tblib zict tornado webdataset braceexpand
      bokeh xyzservices)
if [[ "${WITH_BENCH_REFS:-0}" == 1 ]]; then
    pkgs+=(rwkv flash-linear-attention fla-core)
fi
declare -A fallback=([flash-linear-attention]=0.6.0 [fla-core]=0.6.0)  # the FLA release the issues compare with
specs=()
for p in "${pkgs[@]}"; do
    v="$("$venv_py" -m pip show "$p" 2>/dev/null | awk '/^Version:/{print $2}' || true)"
    v="${v:-${fallback[$p]:-}}"
    specs+=("$p${v:+==$v}")
done
mkdir -p "$dest"
echo "[wheels] ${specs[*]} -> $dest"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$py_version" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$dest" "${specs[@]}"
ls "$dest"

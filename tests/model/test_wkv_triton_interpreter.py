"""The chunked Triton WKV (model/wkv_triton.py) on the CPU under TRITON_INTERPRET=1: outputs, final state and
every gradient against the float64 reference (with a state, resets, extreme decays, T not a multiple of the
chunk; fp32 products, and the default's operands rounded to tf32), and a small model on it against the same model
on the PyTorch WKV. The GPU runs of the same kernels, on tensor cores and at T up to 4096, are
tests/gpu/test_wkv_triton.py."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="triton is not installed (pip install triton runs it in the interpreter)")

HERE = Path(__file__).resolve().parent


def _run_cases(precision: str, *names: str) -> dict:
    # RWKV_MUSIC_WKV_CHECK_ROUNDED: an operand the kernels take as rounded to tf32 but is not becomes NaN (on the GPU
    # it would be truncated, which fp32 products here could not show)
    env = {**os.environ, "TRITON_INTERPRET": "1", "RWKV_MUSIC_WKV_CHECK_ROUNDED": "1",
           "PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parents[1])])}
    proc = subprocess.run([sys.executable, str(HERE / "wkv_triton_cases.py"), precision, *names], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def results() -> dict:
    return _run_cases("ieee")


@pytest.mark.parametrize("case", ["T1", "T16 state B1 H3", "T21 state resets B3 H1", "T37 no state bv64",
                                  "T37 state resets bv32", "T33 extreme decays", "T37 state resets recompute"])
def test_outputs_and_gradients_match_float64(results: dict, case: str) -> None:
    errs = results[case]
    assert "r" in errs and "b" in errs
    assert ("s0" in errs) == (case != "T37 no state bv64")  # the initial state's gradient where there is one
    worst = max(errs.values())
    assert worst < 1e-5, errs  # fp32 arithmetic ("ieee" products) against float64


@pytest.fixture(scope="module")
def rounded() -> dict:
    return _run_cases("tf32rn", "rounding", "T37 state resets bv32", "T33 extreme decays")


def test_tf32_rounding_is_to_nearest_and_keeps_inf_and_nan(rounded: dict) -> None:
    """The kernels' operand rounding, bit for bit against float64 arithmetic over 20,000 fp32 patterns (both signs,
    subnormals, ties, overflow to inf), with every NaN kept a NaN: the GPU's 0x7FFFFFFF would otherwise carry into
    the sign bit and become -0."""
    r = rounded["rounding"]
    assert r["mismatches"] == 0 and r["nans"] > 0 and r["nans_kept"], r


@pytest.mark.parametrize("case", ["T37 state resets bv32", "T33 extreme decays"])
def test_tf32_rounded_to_nearest_stays_within_issue_12s_bound(results: dict, rounded: dict, case: str) -> None:
    """The default products ("tf32rn") round both operands of every product to tf32 in the kernels. The interpreter
    multiplies in fp32, so what it shows is that rounding alone: it must be there (every error at least ten times
    the same case's with fp32 products) and keep every output and gradient within issue 12's 2e-3 of float64,
    decays at both ends included. It lands where the CPU emulation of rounded tf32 products does
    (bench/wkv_chunked_reference.py --products tf32: 3-8e-4)."""
    e, fp32 = rounded[case], results[case]
    assert all(math.isfinite(v) for v in e.values()), e  # NaN: an operand taken as rounded was not
    assert min(e.values()) > 10 * max(fp32.values()) and max(e.values()) < 2e-3, (e, fp32)


@pytest.mark.parametrize("how", ["triton", "triton compiled"])
def test_model_on_triton_matches_torch_wkv(results: dict, how: str) -> None:
    assert results["model"][how]["logits"] < 1e-5, results["model"]
    assert results["model"][how]["worst_grad"] < 1e-4, results["model"]


def test_compile_keeps_the_triton_op_in_the_graph(results: dict) -> None:
    """Dynamo splits the model only where it resolves the backend (one break at the top), not at each layer's
    WKV, as it must for the PyTorch WKV (which runs outside the compiled graph)."""
    assert results["model"]["graphs triton"] <= 2, results["model"]
    assert results["model"]["graphs torch"] > results["model"]["graphs triton"], results["model"]


def test_row_tile_is_checked() -> None:
    """A row tile that does not divide the state would leave outputs unwritten: refused instead."""
    code = ("import torch\nfrom rwkv_music.model.wkv_triton import wkv_triton\nx = torch.zeros(1, 4, 1, 64)\n"
            "try:\n    wkv_triton(x, x, x, x, x, x, bv=128)\nexcept ValueError as e:\n    print(e)\n")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "must be one of (16, 32, 64), got 128" in out.stdout


def test_triton_backend_refused_without_gpu_or_interpreter() -> None:
    """Asked for explicitly on the CPU without the interpreter, the backend says why instead of falling back."""
    code = ("import torch\nfrom rwkv_music.model.wkv import resolve_backend\n"
            "try:\n    resolve_backend('triton', torch.device('cpu'))\nexcept RuntimeError as e:\n    print(e)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "triton asked for but it cannot run" in out.stdout and "TRITON_INTERPRET=1" in out.stdout

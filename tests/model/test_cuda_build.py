"""CPU CI: the CUDA sources (WKV kernels, fused decode step and prefill) compile with nvcc for Hopper (PTX only; nothing
runs). Skips without nvcc."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

CUDA_DIR = Path(__file__).resolve().parents[2] / "rwkv_music" / "model" / "cuda"


KERNELS = {
    "wkv7_kernels.cu": ("fwd_kernel", "bwd1_kernel", "bwd2_kernel", "step_kernel"),
    "rnn_step_kernels.cu": ("embed_ln0", "ln_mix", "4gemvI", "8gemv_mmaILi", "wkv_head"),
    "prefill_kernels.cu": ("ln_mix_k", "gates_k", "out_norm_k", "relu_sq_k", "last_ln_k"),
}


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
@pytest.mark.parametrize("source", sorted(KERNELS))
def test_kernels_compile_to_ptx(tmp_path: Path, source: str) -> None:
    out = tmp_path / "kernels.ptx"
    cmd = ["nvcc", "-arch=sm_90", "-std=c++17", "-O3", "--use_fast_math", "--ptx",
           str(CUDA_DIR / source), "-o", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ptx = out.read_text()
    for kernel in KERNELS[source]:
        assert f"{kernel}" in ptx, f"{kernel} missing from the PTX"
    assert ".target sm_90" in ptx
    assert "warning" not in proc.stderr.lower(), proc.stderr[-4000:]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
def test_the_fused_step_compiles_for_gpus_without_bf16_tensor_core_products(tmp_path: Path) -> None:
    """The bf16 mma instruction needs sm_80; the extension is one build, so on a Turing GPU (sm_75) the decode step's
    tensor-core products must compile away (to a trap the host never launches) rather than fail the whole build."""
    out = tmp_path / "kernels.ptx"
    cmd = ["nvcc", "-arch=sm_75", "-std=c++17", "-O3", "--ptx", str(CUDA_DIR / "rnn_step_kernels.cu"), "-o", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ptx = out.read_text()
    assert ".target sm_75" in ptx and "8gemv_mmaILi" in ptx
    assert "mma.sync" not in ptx


def test_sources_are_packaged_next_to_loader() -> None:
    """The loader resolves its sources from its own file; they must exist there."""
    from rwkv_music.model import wkv_cuda

    for name in wkv_cuda._SOURCES:
        assert (wkv_cuda._SRC_DIR / name).is_file()
    assert (wkv_cuda._SRC_DIR / "wkv7.h").is_file()
    for header in ("rnn_step.h", "prefill.h", "fused_util.cuh"):
        assert (wkv_cuda._SRC_DIR / header).is_file()


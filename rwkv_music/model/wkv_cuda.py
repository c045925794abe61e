"""CUDA implementation of the RWKV-7 WKV operator (head size 64), built on first use.

API (see `rwkv_music.model.wkv` for the math and the shapes):
    is_available() -> bool                          CUDA present and the extension builds/loads (cached)
    load_error() -> str | None                      why it is not available, in one line
    wkv_cuda(r, w, k, v, a, b, state=None)          -> (y, final_state), differentiable in all seven inputs
    wkv_cuda_step(r, w, k, v, a, b, state, out=None) -> (y, new_state), one token, no autograd

The extension (sources in `model/cuda/`) is compiled with `torch.utils.cpp_extension.load` for the
current device's architecture into a cache directory keyed by torch version, CUDA version and
architecture (``$RWKV_MUSIC_BUILD_DIR`` or ``$XDG_CACHE_HOME/rwkv_music``, default ``~/.cache``).
Kernels compute in fp32 with an fp32 state; bf16 and fp32 inputs are read as they are, other dtypes
are cast to fp32.  Training stores fp32 checkpoints of the state every 16 steps
(B*H*ceil(T/16)*16 KiB) and two fp32 tensors the size of the inputs.
"""

from __future__ import annotations

import functools
import os
import shutil
import threading
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

HEAD_SIZE = 64
_SRC_DIR = Path(__file__).resolve().parent / "cuda"
_SOURCES = ("wkv7_op.cpp", "wkv7_kernels.cu")
_LOCK = threading.Lock()
_ERRORS: dict[tuple[int, int], str] = {}

# Launch configurations, indices into the switches in wkv7_kernels.cu (U = steps unrolled; D = row/column
# sums left as per-thread partials in shared memory and added once per chunk):
#   rows (forward, backward pass 1), (rows/block, rows/thread, threads/row, U, D):
#     0: 16,1,4,16,D  1: 32,2,4,4,D  2: 64,4,4,2,D  3: 16,1,8,16,D  4: 16,1,4,2  5: 32,2,4,2  6: 64,4,4,2
#     7: 32,2,4,16,D
#   columns (backward pass 2), (cols/block, cols/thread, threads/col, U, D):
#     0: 16,1,4,1  1: 32,1,4,1  2: 16,1,8,1  3: 32,1,2,1  4: 16,1,4,2,D  5: 16,1,4,4,D  6: 32,1,2,2,D
#     7: 16,1,4,8,D
N_CONFIGS = 8
Config = tuple[int, int, int]  # (forward, backward pass 1, backward pass 2)


def _build_dir(cap: tuple[int, int]) -> Path:
    root = os.environ.get("RWKV_MUSIC_BUILD_DIR")
    if root is None:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "rwkv_music")
    cuda = (torch.version.cuda or "none").replace(".", "")
    tv = torch.__version__.split("+")[0].replace(".", "_")
    d = Path(root) / f"wkv7_torch{tv}_cu{cuda}_sm{cap[0]}{cap[1]}"
    d.mkdir(parents=True, exist_ok=True)
    return d


def nvcc_path() -> str | None:
    """The nvcc that torch's extension builder would use, or None."""
    from torch.utils import cpp_extension

    home = cpp_extension.CUDA_HOME
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


def _compile(cap: tuple[int, int]) -> ModuleType:
    from torch.utils import cpp_extension

    if nvcc_path() is None:
        raise RuntimeError("nvcc not found (set CUDA_HOME or put the CUDA toolkit's bin on PATH)")
    arch = f"{cap[0]}{cap[1]}"
    flags = ["-O3", "-std=c++17", "--use_fast_math", "-Xptxas=-O3", f"-gencode=arch=compute_{arch},code=sm_{arch}"]
    old = os.environ.get("TORCH_CUDA_ARCH_LIST")
    os.environ["TORCH_CUDA_ARCH_LIST"] = f"{cap[0]}.{cap[1]}"  # torch adds its arch flags from this
    try:
        return cpp_extension.load(
            name=f"rwkv_music_wkv7_sm{arch}",
            sources=[str(_SRC_DIR / s) for s in _SOURCES],
            extra_include_paths=[str(_SRC_DIR)],
            extra_cflags=["-O3", "-std=c++17"],
            extra_cuda_cflags=flags,
            build_directory=str(_build_dir(cap)),
            verbose=os.environ.get("RWKV_MUSIC_BUILD_VERBOSE", "") == "1",
        )
    finally:
        if old is None:
            os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = old


@functools.cache
def _ext_for(cap: tuple[int, int]) -> ModuleType:
    with _LOCK:
        return _compile(cap)


def _ext(device: torch.device | None = None) -> ModuleType:
    return _ext_for(torch.cuda.get_device_capability(device))


def is_available() -> bool:
    """True when CUDA is present and the extension builds and loads for the current device. Never raises."""
    try:
        if not torch.cuda.is_available():
            _ERRORS[(0, 0)] = "no CUDA device"
            return False
        cap = torch.cuda.get_device_capability()
        if cap in _ERRORS:
            return False
        _ext_for(cap)
        return True
    except Exception as e:  # build or load failure: report, let the caller fall back
        msg = " ".join(str(e).split())
        _ERRORS[torch.cuda.get_device_capability()] = f"{type(e).__name__}: {msg[:300]}"
        return False


def load_error() -> str | None:
    """One line saying why `is_available()` was False, or None."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    return _ERRORS.get(torch.cuda.get_device_capability())


def default_config(batch: int, heads: int, device: torch.device | None = None) -> Config:
    """(forward, backward pass 1, backward pass 2) configs for B*H heads, picked from per-kernel H100 profiles
    (bench/NOTES-wkv.md): few heads want small blocks (more warps per head), many heads want more state per
    thread (fewer shared-memory loads per flop)."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    n = batch * heads
    if 2 * n <= sms:
        return 0, 0, 4
    if n <= 2 * sms:
        return 1, 1, 6
    return 2, 2, 6


def _prep(r: Tensor, *xs: Tensor) -> tuple[Tensor, ...]:
    dt = r.dtype if r.dtype in (torch.bfloat16, torch.float32) else torch.float32
    return tuple(x.to(dt).contiguous() for x in (r, *xs))


def _check(r: Tensor) -> None:
    if r.dim() != 4 or r.shape[-1] != HEAD_SIZE:
        raise ValueError(f"wkv_cuda expects [B, T, H, {HEAD_SIZE}] inputs, got {tuple(r.shape)}")


class _WKV7(torch.autograd.Function):
    @staticmethod
    def forward(ctx, r, w, k, v, a, b, s0, cfg):  # type: ignore[override]
        fcfg, b1cfg, b2cfg = cfg
        dtypes = tuple(x.dtype for x in (r, w, k, v, a, b))
        r_, w_, k_, v_, a_, b_ = _prep(r, w, k, v, a, b)
        s0_ = None if s0 is None else s0.float().contiguous()
        y, sT, sa, ck = _ext(r.device).forward(r_, w_, k_, v_, a_, b_, s0_, True, fcfg)
        ctx.save_for_backward(r_, w_, k_, v_, a_, b_, sT, sa, ck)
        ctx.dtypes = dtypes
        ctx.bcfg = (b1cfg, b2cfg)
        ctx.has_s0 = s0 is not None
        ctx.set_materialize_grads(False)
        return y.to(r.dtype), sT

    @staticmethod
    def backward(ctx, dy, dsT):  # type: ignore[override]
        r_, w_, k_, v_, a_, b_, sT, sa, ck = ctx.saved_tensors
        dy = torch.zeros_like(r_) if dy is None else dy.to(r_.dtype).contiguous()
        dsT = None if dsT is None else dsT.float().contiguous()
        grads = _ext(r_.device).backward(r_, w_, k_, v_, a_, b_, sT, sa, ck, dy, dsT, *ctx.bcfg)
        needs = ctx.needs_input_grad[:6]
        out = [g.to(dt) if need else None for g, dt, need in zip(grads[:6], ctx.dtypes, needs, strict=True)]
        ds0 = grads[6] if ctx.has_s0 and ctx.needs_input_grad[6] else None
        return (*out, ds0, None)


def wkv_cuda(
    r: Tensor,
    w: Tensor,
    k: Tensor,
    v: Tensor,
    a: Tensor,
    b: Tensor,
    state: Tensor | None = None,
    cfg: Config | None = None,
) -> tuple[Tensor, Tensor]:
    """WKV over a sequence on CUDA. r, w, k, v, a, b: [B, T, H, 64] (w = raw decay logit); state [B, H, 64, 64]
    fp32 or None. Returns (y in r.dtype, final state fp32); differentiable w.r.t. all inputs and the state.
    `cfg` (forward, pass 1, pass 2 launch configs) is for benchmarks; the default depends on B*H."""
    _check(r)
    if cfg is None:
        cfg = default_config(r.shape[0], r.shape[2], r.device)
    tensors = (r, w, k, v, a, b) + (() if state is None else (state,))
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return _WKV7.apply(r, w, k, v, a, b, state, cfg)
    r_, w_, k_, v_, a_, b_ = _prep(r, w, k, v, a, b)
    s0 = None if state is None else state.float().contiguous()
    y, sT, _, _ = _ext(r.device).forward(r_, w_, k_, v_, a_, b_, s0, False, cfg[0])
    return y.to(r.dtype), sT


def wkv_cuda_step(
    r: Tensor,
    w: Tensor,
    k: Tensor,
    v: Tensor,
    a: Tensor,
    b: Tensor,
    state: Tensor | None,
    out: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """One token for B sequences: inputs [B, H, 64], state [B, H, 64, 64] fp32 or None (zeros).
    Returns (y [B, H, 64] in r.dtype, new state). `out` (may be `state` itself) receives the new state
    in place, which keeps buffers fixed for CUDA-graph capture. Not differentiable."""
    if r.dim() != 3 or r.shape[-1] != HEAD_SIZE:
        raise ValueError(f"wkv_cuda_step expects [B, H, {HEAD_SIZE}] inputs, got {tuple(r.shape)}")
    r_, w_, k_, v_, a_, b_ = _prep(r, w, k, v, a, b)
    s0 = None if state is None else state.float().contiguous()
    if out is not None and (out.dtype != torch.float32 or not out.is_contiguous()):
        raise ValueError("out must be a contiguous float32 tensor")
    y, s = _ext(r.device).step(r_, w_, k_, v_, a_, b_, s0, out)
    return y.to(r.dtype), s

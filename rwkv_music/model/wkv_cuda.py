"""CUDA implementation of the RWKV-7 WKV operator (head size 64), built on first use.

API (see `rwkv_music.model.wkv` for the math and the shapes):
    is_available() -> bool                          CUDA present and the extension builds/loads (cached)
    load_error() -> str | None                      why it is not available, in one line
    wkv_cuda(r, w, k, v, a, b, state=None, starts=None) -> (y, final_state), differentiable in all seven
    wkv_cuda_step(r, w, k, v, a, b, state, out=None)     -> (y, new_state), one token, no autograd

The sequence kernels are torch custom ops (``torch.ops.rwkv_music.wkv7_fwd`` / ``wkv7_bwd``) with a fake
(shape-only) implementation and a registered backward, so torch.compile traces the model through them
without a graph break and fuses the element-wise work on either side.

The extension (sources in `model/cuda/`; it also holds the fused decode step and prefill of `model/fast_step.py`) is
compiled with `torch.utils.cpp_extension.load` for the current device's architecture into a cache directory
keyed by torch version, CUDA version and architecture (``$RWKV_MUSIC_BUILD_DIR`` or
``$XDG_CACHE_HOME/rwkv_music``, default ``~/.cache``). Only the launch configurations `default_config` uses
are compiled; ``RWKV_MUSIC_WKV_ALL_CONFIGS=1`` builds every one (for `bench/wkv.py --configs` sweeps). Kernels
compute in fp32 with an fp32 state; bf16 and fp32 inputs are read as they are, other dtypes are cast to fp32.
Training stores fp32 checkpoints of the state every 16 steps (B*H*ceil(T/16)*16 KiB) and two fp32 tensors the
size of the inputs.
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
_SOURCES = ("wkv7_op.cpp", "wkv7_kernels.cu", "rnn_step_op.cpp", "rnn_step_kernels.cu", "prefill_kernels.cu")
_LOCK = threading.Lock()
_ERRORS: dict[tuple[int, int], str] = {}

# Launch configurations are indices into the switch statements of wkv7_kernels.cu, where each is described
# (rows or columns per block and thread, steps unrolled, deferred sums). DEFAULT_CONFIGS are always built.
DEFAULT_CONFIGS = {"fwd": (0, 1, 2), "bwd1": (0, 1, 2), "bwd2": (4, 6)}
N_CONFIGS = 8
Config = tuple[int, int, int]  # (forward, backward pass 1, backward pass 2)


def _build_dir(cap: tuple[int, int], suffix: str = "") -> Path:
    root = os.environ.get("RWKV_MUSIC_BUILD_DIR")
    if root is None:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "rwkv_music")
    cuda = (torch.version.cuda or "none").replace(".", "")
    tv = torch.__version__.split("+")[0].replace(".", "_")
    d = Path(root) / f"wkv7_torch{tv}_cu{cuda}_sm{cap[0]}{cap[1]}{suffix}"
    d.mkdir(parents=True, exist_ok=True)
    return d


def nvcc_path() -> str | None:
    """The nvcc that torch's extension builder would use, or None."""
    from torch.utils import cpp_extension

    home = cpp_extension.CUDA_HOME
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


def _all_configs() -> bool:
    return os.environ.get("RWKV_MUSIC_WKV_ALL_CONFIGS", "") == "1"


def _compile(cap: tuple[int, int]) -> ModuleType:
    from torch.utils import cpp_extension

    if nvcc_path() is None:
        raise RuntimeError("nvcc not found (set CUDA_HOME or put the CUDA toolkit's bin on PATH)")
    arch = f"{cap[0]}{cap[1]}"
    flags = ["-O3", "-std=c++17", "--use_fast_math", "-Xptxas=-O3", f"-gencode=arch=compute_{arch},code=sm_{arch}"]
    suffix = ""
    if _all_configs():
        flags.append("-DWKV7_ALL_CONFIGS")
        suffix = "_all"
    old = os.environ.get("TORCH_CUDA_ARCH_LIST")
    os.environ["TORCH_CUDA_ARCH_LIST"] = f"{cap[0]}.{cap[1]}"  # torch adds its arch flags from this
    try:
        return cpp_extension.load(
            name=f"rwkv_music_wkv7_sm{arch}{suffix}",
            sources=[str(_SRC_DIR / s) for s in _SOURCES],
            extra_include_paths=[str(_SRC_DIR)],
            extra_cflags=["-O3", "-std=c++17"],
            extra_cuda_cflags=flags,
            build_directory=str(_build_dir(cap, suffix)),
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


@torch.compiler.assume_constant_result
def _sm_count(index: int) -> int:
    """Multiprocessors of GPU `index` (a constant to torch.compile, so choosing a config breaks no graph)."""
    return torch.cuda.get_device_properties(index).multi_processor_count


def default_config(batch: int, heads: int, device: torch.device | None = None) -> Config:
    """(forward, backward pass 1, backward pass 2) configs for B*H heads, picked from per-kernel H100 profiles
    (bench/NOTES-wkv.md): few heads want small blocks (more warps per head), many heads want more state per
    thread (fewer shared-memory loads per flop)."""
    index = device.index if device is not None and device.index is not None else torch.cuda.current_device()
    sms = _sm_count(index)
    n = batch * heads
    if 2 * n <= sms:
        return 0, 0, 4
    if n <= 2 * sms:
        return 1, 1, 6
    return 2, 2, 6


def kernel_inputs(r: Tensor, *xs: Tensor) -> tuple[Tensor, ...]:
    """r and xs contiguous in r's dtype where the kernels read it (bf16, fp32), else fp32 (also the Triton WKV's)."""
    dt = r.dtype if r.dtype in (torch.bfloat16, torch.float32) else torch.float32
    return tuple(x.to(dt).contiguous() for x in (r, *xs))


def _check(r: Tensor) -> None:
    if r.dim() != 4 or r.shape[-1] != HEAD_SIZE:
        raise ValueError(f"wkv_cuda expects [B, T, H, {HEAD_SIZE}] inputs, got {tuple(r.shape)}")


def _save_shapes(r: Tensor) -> tuple[list[int], list[int]]:
    B, T, H, N = r.shape
    nc = -(-T // 16)  # the kernels' checkpoint interval (wkv7::chunk_len)
    return [B, T, H, N], [B, H, nc, N, N]


@torch.library.custom_op("rwkv_music::wkv7_fwd", mutates_args=())
def _wkv7_fwd(r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, s0: Tensor | None,
              starts: Tensor | None, save: bool, cfg: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y, final state, sa, state checkpoints); the last two are empty unless `save` (training)."""
    return tuple(_ext(r.device).forward(r, w, k, v, a, b, s0, starts, save, _cfg_field(cfg)))


@_wkv7_fwd.register_fake
def _(r, w, k, v, a, b, s0, starts, save, cfg):
    B, _, H, N = r.shape
    sa_shape, ck_shape = _save_shapes(r)
    sa = r.new_empty(sa_shape if save else [0], dtype=torch.float32)
    ck = r.new_empty(ck_shape if save else [0], dtype=torch.float32)
    return torch.empty_like(r), r.new_empty([B, H, N, N], dtype=torch.float32), sa, ck


@torch.library.custom_op("rwkv_music::wkv7_bwd", mutates_args=())
def _wkv7_bwd(r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, sT: Tensor, sa: Tensor,
              ck: Tensor, dy: Tensor, dsT: Tensor | None, s0: Tensor | None, starts: Tensor | None,
              cfg1: int, cfg2: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of r, w, k, v, a, b (input dtype) and of the initial state (fp32)."""
    return tuple(_ext(r.device).backward(r, w, k, v, a, b, sT, sa, ck, dy, dsT, s0, starts, cfg1, cfg2))


@_wkv7_bwd.register_fake
def _(r, w, k, v, a, b, sT, sa, ck, dy, dsT, s0, starts, cfg1, cfg2):
    return (*(torch.empty_like(r) for _ in range(6)), torch.empty_like(sT))


def _fwd_setup(ctx, inputs, output) -> None:
    r, w, k, v, a, b, s0, starts, _save, cfg = inputs
    _, sT, sa, ck = output
    ctx.save_for_backward(r, w, k, v, a, b, sT, sa, ck, s0, starts)
    ctx.bcfg = _backward_configs(cfg)


def _fwd_backward(ctx, dy, dsT, _dsa, _dck):
    r, w, k, v, a, b, sT, sa, ck, s0, starts = ctx.saved_tensors
    dy = torch.zeros_like(r) if dy is None else dy.to(r.dtype).contiguous()
    dsT = None if dsT is None else dsT.float().contiguous()
    grads = _wkv7_bwd(r, w, k, v, a, b, sT, sa, ck, dy, dsT, s0, starts, *ctx.bcfg)
    ds0 = grads[6] if s0 is not None else None
    return (*grads[:6], ds0, None, None, None)


_wkv7_fwd.register_autograd(_fwd_backward, setup_context=_fwd_setup)

# The forward config is an op argument; the two backward configs travel with it, packed into one integer
# (fwd + 16 * bwd1 + 256 * bwd2), so that a custom op signature needs no tuple.


def _pack(cfg: Config) -> int:
    return cfg[0] + 16 * cfg[1] + 256 * cfg[2]


def _backward_configs(packed: int) -> tuple[int, int]:
    return (packed // 16) % 16, packed // 256


def wkv_cuda(
    r: Tensor,
    w: Tensor,
    k: Tensor,
    v: Tensor,
    a: Tensor,
    b: Tensor,
    state: Tensor | None = None,
    starts: Tensor | None = None,
    cfg: Config | None = None,
) -> tuple[Tensor, Tensor]:
    """WKV over a sequence on CUDA. r, w, k, v, a, b: [B, T, H, 64] (w = raw decay logit); state [B, H, 64, 64]
    fp32 or None; starts bool [B, T] or None (state reset before marked steps). Returns (y in r.dtype, final
    state fp32); differentiable w.r.t. all inputs and the state. `cfg` (forward, pass 1, pass 2 launch
    configs) is for benchmarks; the default depends on B*H."""
    _check(r)
    if cfg is None:
        cfg = default_config(r.shape[0], r.shape[2], r.device)
    out_dtype = r.dtype
    r_, w_, k_, v_, a_, b_ = kernel_inputs(r, w, k, v, a, b)
    s0 = None if state is None else state.float().contiguous()
    st = None if starts is None else starts.to(torch.bool).contiguous()
    tensors = (r, w, k, v, a, b) + (() if state is None else (state,))
    save = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    y, sT, _, _ = _wkv7_fwd(r_, w_, k_, v_, a_, b_, s0, st, save, _pack(cfg))
    return y.to(out_dtype), sT


def _cfg_field(packed: int) -> int:
    return packed % 16


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
    r_, w_, k_, v_, a_, b_ = kernel_inputs(r, w, k, v, a, b)
    s0 = None if state is None else state.float().contiguous()
    if out is not None and (out.dtype != torch.float32 or not out.is_contiguous()):
        raise ValueError("out must be a contiguous float32 tensor")
    y, s = _ext(r.device).step(r_, w_, k_, v_, a_, b_, s0, out)
    return y.to(r.dtype), s


@torch.library.custom_op("rwkv_music::wkv7_step", mutates_args=())
def _wkv7_step(r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor,
               s0: Tensor | None) -> tuple[Tensor, Tensor]:
    return tuple(_ext(r.device).step(r, w, k, v, a, b, s0, None))


@_wkv7_step.register_fake
def _(r, w, k, v, a, b, s0):
    B, H, N = r.shape
    return torch.empty_like(r), r.new_empty([B, H, N, N], dtype=torch.float32)


def wkv_cuda_step_fn(r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor,
                     state: Tensor | None) -> tuple[Tensor, Tensor]:
    """The backend's one-token step (a custom op, so a compiled decode step keeps it in its graph): the fast
    step kernel, or the sequence op at T = 1 when a gradient is needed (the step kernel has no backward)."""
    tensors = (r, w, k, v, a, b) + (() if state is None else (state,))
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        y, s = wkv_cuda(*(x[:, None] for x in (r, w, k, v, a, b)), state)
        return y[:, 0], s
    if r.dim() != 3 or r.shape[-1] != HEAD_SIZE:
        raise ValueError(f"wkv step expects [B, H, {HEAD_SIZE}] inputs, got {tuple(r.shape)}")
    out_dtype = r.dtype
    r_, w_, k_, v_, a_, b_ = kernel_inputs(r, w, k, v, a, b)
    s0 = None if state is None else state.float().contiguous()
    y, s = _wkv7_step(r_, w_, k_, v_, a_, b_, s0)
    return y.to(out_dtype), s

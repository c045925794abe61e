"""Chunked WKV7 on tensor cores (Triton): the sequence in chunks of L tokens, a chunk's work as small matrix
products instead of L dependent steps.

Per head, for a chunk with the state S_0 at its start (rows: value index, columns: key index), the cumulative
log decay G_t (inclusive) and G_{t-1} (exclusive), and the decay-scaled keys

    a^_t = a_t e^{G_{t-1}},   r^_t = r_t e^{G_t},   b~_s = b_s e^{-G_s},   k~_s = k_s e^{-G_s},

the vectors u_t = S_{t-1} a_t solve a unit lower-triangular system, so that

    U     = (I - M_ab)^{-1} (A^ S_0^T + M_ak V)      M_ab[t,s] = a^_t . b~_s,  M_ak[t,s] = a^_t . k~_s   (s < t)
    Y     = R^ S_0^T + Q_rb U + Q_rk V               Q_rb[t,s] = r^_t . b~_s,  Q_rk[t,s] = r^_t . k~_s   (s <= t)
    S_L^T = e^{G_L} (S_0^T + B~^T U + K~^T V)

with (I - M)^{-1} = (I + M)(I + M^2)(I + M^4)... (M is nilpotent). Resets (packed rows) only mask these
products: a step sees the steps of its own segment, S_0 reaches the steps before the chunk's first reset, and
S_L keeps S_0 only if the chunk has no reset.

Forward: one program per (head, tile of BV state rows) walks the chunks with the state in registers, writing
y and, for training, the state at each chunk's start (fp32, 16 KiB per chunk and head). Backward: a reverse walk
carries dS the same way (its chunk algebra made again in registers), then one program per (head, chunk) gives
the chunk's input gradients by the chain rule. The derivation, in plain PyTorch and checked against autograd in
float64, is `bench/wkv_chunked_reference.py`.

API: `wkv_triton(r, w, k, v, a, b, state=None, starts=None)` as `wkv_cuda.wkv_cuda`, differentiable in all
seven inputs; the kernels are torch custom ops (``rwkv_music::wkv7c_fwd`` / ``wkv7c_bwd``) so torch.compile
keeps the model in one graph. Products run in tf32 on tensor cores; all other arithmetic and the state are fp32.
``RWKV_MUSIC_WKV_PRECISION`` picks the products: ``tf32rn`` (the default: each operand rounded to the nearest tf32
value first), ``tf32`` (fp32 operands handed to the tensor cores, which drop their low 13 mantissa bits: on an
H200, 2026-12-06, outputs and gradients within 3.4e-3 of float64, the in-context-rate gradients da and db the
worst), ``tf32x3`` (three tf32 products each, within 1e-4 for fp32 inputs at T = 257, about 2.7x slower) or
``ieee`` (fp32 on the FMA units, for tests). With ``tf32rn`` on an H100 (2026-12-07, T = 1 .. 4096, with and
without a state and resets, decays at both ends) every output and gradient stays within 1.2e-3 of float64 for fp32
inputs (y 4.8e-4, da and db 7.2e-4, dw the worst), and within 2.0e-3 for bf16 inputs, where the bf16 outputs'
rounding dominates; it costs 21-31% more time than ``tf32`` (32 state rows per program). ``RWKV_MUSIC_WKV_RECOMPUTE=1``
trades the saved chunk states for a second forward walk in backward.

Speed beside the CUDA scan (`wkv_cuda`; one H100, 2026-12-07, tf32rn, the command in docs/benchmarks.md): faster
at one sequence (fwd+bwd 0.67 against 0.81 ms at B1 T1024 H12), slower from B4 T2048 H12 on (1.92 against 1.82 ms;
5.94 against 3.26 ms at B16 T2048 H12), where the per-chunk backward alone takes 3.3 ms at about 13 TFLOP/s. So it
is an opt-in backend, not the default.
"""

from __future__ import annotations

import functools
import math
import os

import torch
from torch import Tensor

from rwkv_music.model.wkv_cuda import kernel_inputs

HEAD_SIZE = 64
CHUNK = 16  # tokens per chunk: L = 32 spills registers (bench/NOTES-wkv.md)
PRECISIONS = ("tf32rn", "tf32", "ieee", "tf32x3")
ROW_TILES = (16, 32, 64)  # tl.dot needs 16 or more; 64 rows is the whole state
# State rows per walking program: 32 was the fastest of the three at every shape timed (B x T x H of 1x1024x12 to
# 8x4096x64, one H200, 2026-12-06, docs/benchmarks.md): 16 repeats each chunk's algebra four times per head, 64
# leaves too few programs and spills in the reverse walk.
ROW_TILE = 32


@functools.cache
def _kernels():
    from rwkv_music.model import wkv_chunk_kernels

    return wkv_chunk_kernels


def load_error() -> str | None:
    """Why the Triton WKV cannot run here, in one line, or None."""
    try:
        _kernels()
    except Exception as e:  # triton missing or broken
        return f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
    return None


def is_available(device: torch.device | None = None) -> bool:
    """True when triton imports and the device can run its kernels (CUDA, or the CPU under TRITON_INTERPRET=1)."""
    interpret = os.environ.get("TRITON_INTERPRET", "") == "1"
    on_gpu = torch.cuda.is_available() and (device is None or device.type == "cuda")
    return (on_gpu or interpret) and load_error() is None


def precision() -> str:
    """The products' precision: ``RWKV_MUSIC_WKV_PRECISION`` (tf32rn unless set)."""
    p = os.environ.get("RWKV_MUSIC_WKV_PRECISION", "tf32rn").strip().lower() or "tf32rn"
    if p not in PRECISIONS:
        raise ValueError(f"RWKV_MUSIC_WKV_PRECISION must be one of {PRECISIONS}, got {p!r}")
    return p


def recompute() -> bool:
    """``RWKV_MUSIC_WKV_RECOMPUTE=1``: training keeps no chunk states (16 KiB per chunk and head, fp32: 400 MB a
    layer at B16 T2048 H12) but walks the forward again in backward, one layer at a time."""
    return os.environ.get("RWKV_MUSIC_WKV_RECOMPUTE", "").strip() == "1"


def walk_warps(bv: int) -> int:
    """Warps of a walking program: 8 for the whole state (64 rows in 4 warps spill registers), else 4."""
    return 8 if bv >= 64 else 4


def starts_u8(starts: Tensor | None, placeholder: Tensor) -> Tensor:
    """The resets as the kernels read them (uint8 [B, T]), or a placeholder pointer that is never read."""
    return placeholder if starts is None else starts.to(torch.uint8).contiguous()


def walk_forward(r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, s0: Tensor | None,
                 starts: Tensor | None, save: bool, bv: int, prec: str,
                 chunk: int = CHUNK) -> tuple[Tensor, Tensor, Tensor]:
    """Launch the forward walk on contiguous inputs [B, T, H, 64] (s0: fp32 or None): (y, final state, the state
    at each chunk's start [B*H, NC, 64, 64] fp32, empty unless `save`). `chunk` other than CHUNK: benchmarks."""
    B, T, H, N = r.shape
    nc = -(-T // chunk)
    y = torch.empty_like(r)
    sT = torch.empty(B, H, N, N, device=r.device, dtype=torch.float32)
    S = torch.empty((B * H, nc, N, N) if save else (0,), device=r.device, dtype=torch.float32)
    _kernels()._fwd_walk[(B * H, N // bv)](
        r, w, k, v, a, b, starts_u8(starts, sT), sT if s0 is None else s0, y, sT, S if save else sT, T, nc, H,
        N=N, L=chunk, BV=bv, LOG2L=int(math.log2(chunk)), HAS_S0=s0 is not None, HAS_ST=starts is not None,
        SAVE=save, PREC=prec, num_warps=walk_warps(bv))
    return y, sT, S


def walk_backward(r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, S: Tensor, dy: Tensor,
                  dsT: Tensor | None, starts: Tensor | None, bv: int, prec: str,
                  chunk: int = CHUNK, chunk_warps: int = 8) -> tuple[Tensor, ...]:
    """Launch the reverse walk, then the per-chunk gradients, for `walk_forward(..., save=True)`'s S: the gradients
    of r, w, k, v, a, b (input dtype) and of the initial state (fp32). dy contiguous; dsT fp32 or None. Benchmarks
    set the rest: `chunk` and `chunk_warps` (the per-chunk kernel's warps)."""
    B, T, H, N = r.shape
    nc = S.shape[1]
    kern = _kernels()
    dSn = torch.empty_like(S)
    ds0 = torch.empty(B, H, N, N, device=r.device, dtype=torch.float32)
    st = starts_u8(starts, ds0)
    log2l = int(math.log2(chunk))
    kern._bwd_walk[(B * H, N // bv)](
        r, w, k, a, b, st, dy, ds0 if dsT is None else dsT, dSn, ds0, T, nc, H, N=N, L=chunk, BV=bv, LOG2L=log2l,
        HAS_DST=dsT is not None, HAS_ST=starts is not None, PREC=prec, num_warps=walk_warps(bv))
    grads = chunk_gradients(r, w, k, v, a, b, starts, st, S, dSn, dy, chunk, prec, chunk_warps)
    return (*grads, ds0)


def chunk_gradients(r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, starts: Tensor | None,
                    st: Tensor, S: Tensor, dSn: Tensor, dy: Tensor, chunk: int, prec: str,
                    chunk_warps: int = 8) -> list[Tensor]:
    """Launch the per-chunk backward (one program per chunk and head) given each chunk's initial state S and its
    end state's gradient dSn [B*H, NC, 64, 64]: the gradients of r, w, k, v, a, b (input dtype). `st`: the resets as
    `starts_u8` gave them. `chunk_warps` as in `walk_backward`."""
    B, T, H, N = r.shape
    nc = S.shape[1]
    kern = _kernels()
    grads = [torch.empty_like(x) for x in (r, w, k, v, a, b)]
    common = dict(N=N, L=chunk, LOG2L=int(math.log2(chunk)), HAS_ST=starts is not None, PREC=prec,
                  num_warps=chunk_warps)
    kern._bwd_chunk[(B * H * nc,)](r, w, k, v, a, b, st, S, dSn, dy, *grads, T, nc, H, **common)
    return grads


@torch.library.custom_op("rwkv_music::wkv7c_fwd", mutates_args=())
def _wkv7c_fwd(r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, s0: Tensor | None,
               starts: Tensor | None, save: bool, bv: int, prec: str) -> tuple[Tensor, Tensor, Tensor]:
    """(y, final state, the state at each chunk's start [B*H, NC, 64, 64] fp32, empty unless `save`)."""
    return walk_forward(r, w, k, v, a, b, s0, starts, save, bv, prec)


@_wkv7c_fwd.register_fake
def _(r, w, k, v, a, b, s0, starts, save, bv, prec):
    B, T, H, N = r.shape
    nc = -(-T // CHUNK)
    S = r.new_empty((B * H, nc, N, N) if save else (0,), dtype=torch.float32)
    return torch.empty_like(r), r.new_empty([B, H, N, N], dtype=torch.float32), S


@torch.library.custom_op("rwkv_music::wkv7c_bwd", mutates_args=())
def _wkv7c_bwd(r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, S: Tensor, dy: Tensor,
               dsT: Tensor | None, starts: Tensor | None, bv: int,
               prec: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of r, w, k, v, a, b (input dtype) and of the initial state (fp32)."""
    return walk_backward(r, w, k, v, a, b, S, dy, dsT, starts, bv, prec)


@_wkv7c_bwd.register_fake
def _(r, w, k, v, a, b, S, dy, dsT, starts, bv, prec):
    B, _, H, N = r.shape
    return (*(torch.empty_like(r) for _ in range(6)), r.new_empty([B, H, N, N], dtype=torch.float32))


def _setup(ctx, inputs, output) -> None:
    r, w, k, v, a, b, s0, starts, _save, bv, prec = inputs
    ctx.save_for_backward(r, w, k, v, a, b, output[2], starts, s0)
    ctx.has_s0 = s0 is not None
    ctx.tile = (bv, prec)


def _backward(ctx, dy, dsT, _dS):
    r, w, k, v, a, b, S, starts, s0 = ctx.saved_tensors
    if S.numel() == 0:  # the forward saved no states (recompute mode): walk it again now
        _, _, S = _wkv7c_fwd(r, w, k, v, a, b, s0, starts, True, *ctx.tile)
    dy = torch.zeros_like(r) if dy is None else dy.to(r.dtype).contiguous()
    dsT = None if dsT is None else dsT.float().contiguous()
    grads = _wkv7c_bwd(r, w, k, v, a, b, S, dy, dsT, starts, *ctx.tile)
    return (*grads[:6], grads[6] if ctx.has_s0 else None, None, None, None, None)


_wkv7c_fwd.register_autograd(_backward, setup_context=_setup)


def wkv_triton(r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, state: Tensor | None = None,
               starts: Tensor | None = None, bv: int | None = None) -> tuple[Tensor, Tensor]:
    """WKV over a sequence with the chunked Triton kernels. r, w, k, v, a, b: [B, T, H, 64] (w = raw decay logit);
    state [B, H, 64, 64] or None; starts bool [B, T] or None (state reset before marked steps). Returns (y in
    r.dtype, final state fp32); differentiable w.r.t. all inputs and the state. `bv` (state rows per program) is
    for benchmarks (default ROW_TILE)."""
    if r.dim() != 4 or r.shape[-1] != HEAD_SIZE:
        raise ValueError(f"wkv_triton expects [B, T, H, {HEAD_SIZE}] inputs, got {tuple(r.shape)}")
    bv = ROW_TILE if bv is None else bv
    if bv not in ROW_TILES:
        raise ValueError(f"bv (state rows per program) must be one of {ROW_TILES}, got {bv}")
    xs = kernel_inputs(r, w, k, v, a, b)
    s0 = None if state is None else state.float().contiguous()
    st = None if starts is None else starts.to(torch.bool).contiguous()
    tensors = (r, w, k, v, a, b) + (() if state is None else (state,))
    save = torch.is_grad_enabled() and any(t.requires_grad for t in tensors) and not recompute()
    y, sT, _ = _wkv7c_fwd(*xs, s0, st, save, bv, precision())
    return y.to(r.dtype), sT

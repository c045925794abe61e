"""The chunked WKV7 in Triton, checked and timed: the one-pass walk (`1pass`, the kernels of the package's
`RWKV_MUSIC_WKV=triton` backend, `model/wkv_chunk_kernels.py`, whose docstring and `model/wkv_triton.py`'s give
the math) and a three-pass form kept here as a prototype (`3pass`: every chunk's state-free terms at once, a scan
of one 64 x 64 product per chunk, every chunk's output at once; with a backward, `wkv_bwd_3pass`: a reverse scan
over chunks, then every chunk's input gradients by the chain rule through the same algebra). Both take
packed-row resets. docs/benchmarks.md has the first GPU figures (2026-12-06); bench/NOTES-wkv.md the reasoning.

    TRITON_INTERPRET=1 python bench/wkv_chunked_triton.py --check          # on the CPU, against float64
    python bench/wkv_chunked_triton.py --check --bench                     # on a GPU, beside our CUDA kernels
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rwkv_music.model.wkv import wkv_reference
from rwkv_music.model.wkv_chunk_kernels import (
    _chunk_masks,
    _chunk_products,
    _chunk_terms,
    _dot,
    _walk_start,
)
from rwkv_music.model.wkv_triton import chunk_gradients, starts_u8, walk_backward, walk_forward

DECAY_SCALE = math.exp(-0.5)


def wkv_fwd_1pass(r, w, k, v, a, b, state=None, chunk: int = 16, bv: int = 16, precision: str = "ieee",
                  starts=None, save: bool = False):
    """y (input dtype) and the final state (fp32) for inputs [B, T, H, 64] and a state [B, H, 64, 64] or None, one
    program per head and row tile walking the chunks (the package's launch, any chunk length). `starts` and `save`
    as in `wkv_fwd_3pass`."""
    xs = [x.contiguous() for x in (r, w, k, v, a, b)]
    s0 = None if state is None else state.float().contiguous()
    y, sT, S = walk_forward(*xs, s0, starts, save, bv, precision, chunk=chunk)
    return (y, sT, S) if save else (y, sT)


@triton.jit(do_not_specialize=["T", "NC", "H"])
def _prep(r_ptr, w_ptr, k_ptr, v_ptr, a_ptr, b_ptr, st_ptr, y0_ptr, rp_ptr, A_ptr, D_ptr, T, NC, H,
          N: tl.constexpr, L: tl.constexpr, BV: tl.constexpr, LOG2L: tl.constexpr, HAS_ST: tl.constexpr,
          PREC: tl.constexpr):
    """Pass 1, every chunk at once: what does not depend on the state at the chunk's start S_c. With U = W_a S_c^T
    + Z:  Y = R' S_c^T + Y0  and  S_{c+1}^T = A S_c^T + D. With resets (HAS_ST) a step sees only the steps of its
    own segment of the chunk, S_c only the steps before the chunk's first reset, and S_{c+1} only the last
    segment."""
    bh = tl.program_id(0)
    c = tl.program_id(1)
    iv = tl.program_id(2)
    b = bh // H
    h = bh % H
    tt = tl.arange(0, L)
    j = tl.arange(0, N)
    i = iv * BV + tl.arange(0, BV)
    t = c * L + tt
    valid = t < T
    off = ((b.to(tl.int64) * T + t) * H + h) * N
    ahat, rhat, btil, ktil, bl, kl, g_last, _g, _logd = _chunk_terms(r_ptr, w_ptr, k_ptr, a_ptr, b_ptr, off, j,
                                                                     valid)
    vv = tl.load(v_ptr + off[:, None] + i[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
    strict, incl, first, last, keep_end = _chunk_masks(st_ptr, b, T, t, valid, tt, HAS_ST)
    ahat0 = tl.where(first, ahat, 0.0)
    rhat0 = tl.where(first, rhat, 0.0)
    bl = tl.where(last, bl, 0.0)
    kl = tl.where(last, kl, 0.0)
    _m_ab, m_ak, q_rb, q_rk, inv = _chunk_products(ahat, rhat, btil, ktil, strict, incl, LOG2L, PREC)
    wa = _dot(inv, ahat0, PREC)  # [L, N]
    z = _dot(inv, _dot(m_ak, vv, PREC), PREC)  # [L, BV]
    y0 = _dot(q_rb, z, PREC) + _dot(q_rk, vv, PREC)
    cb = (bh.to(tl.int64) * NC + c) * L * N  # chunk c of head bh in the [BH, NC, L, N] buffers
    tl.store(y0_ptr + cb + tt[:, None] * N + i[None, :], y0)
    blt = tl.trans(bl)
    mb = (bh.to(tl.int64) * NC + c) * N * N  # ... and in the [BH, NC, N, N] ones
    d = _dot(blt, z, PREC) + _dot(tl.trans(kl), vv, PREC)  # [N, BV]
    tl.store(D_ptr + mb + j[:, None] * N + i[None, :], d)
    if iv == 0:
        rp = rhat0 + _dot(q_rb, wa, PREC)
        tl.store(rp_ptr + cb + tt[:, None] * N + j[None, :], rp)
        A = _dot(blt, wa, PREC) + tl.where(j[:, None] == j[None, :], keep_end * tl.exp(g_last)[:, None], 0.0)
        tl.store(A_ptr + mb + j[:, None] * N + j[None, :], A)


@triton.jit(do_not_specialize=["NC"])
def _scan(A_ptr, D_ptr, s0_ptr, S_ptr, sT_ptr, NC, N: tl.constexpr, BV: tl.constexpr, HAS_S0: tl.constexpr,
          PREC: tl.constexpr):
    """Pass 2, chunk after chunk: S_{c+1}^T = A_c S_c^T + D_c for one head and tile of state rows; keeps each S_c."""
    bh = tl.program_id(0)
    iv = tl.program_id(1)
    j = tl.arange(0, N)
    i = iv * BV + tl.arange(0, BV)
    s_base = bh.to(tl.int64) * N * N
    if HAS_S0:
        ST = tl.load(s0_ptr + s_base + i[None, :] * N + j[:, None]).to(tl.float32)
    else:
        ST = tl.zeros((N, BV), dtype=tl.float32)
    for c in range(0, NC):
        mb = (bh.to(tl.int64) * NC + c) * N * N
        tl.store(S_ptr + mb + j[:, None] * N + i[None, :], ST)
        A = tl.load(A_ptr + mb + j[:, None] * N + j[None, :])
        ST = _dot(A, ST, PREC) + tl.load(D_ptr + mb + j[:, None] * N + i[None, :])
    tl.store(sT_ptr + s_base + i[None, :] * N + j[:, None], ST)


@triton.jit(do_not_specialize=["T", "NC", "H"])
def _out(y_ptr, y0_ptr, rp_ptr, S_ptr, T, NC, H, N: tl.constexpr, L: tl.constexpr,
         BV: tl.constexpr, PREC: tl.constexpr):
    """Pass 3, every chunk at once: Y = R' S_c^T + Y0."""
    bh = tl.program_id(0)
    c = tl.program_id(1)
    iv = tl.program_id(2)
    b = bh // H
    h = bh % H
    tt = tl.arange(0, L)
    j = tl.arange(0, N)
    i = iv * BV + tl.arange(0, BV)
    t = c * L + tt
    cb = (bh.to(tl.int64) * NC + c) * L * N
    mb = (bh.to(tl.int64) * NC + c) * N * N
    ST = tl.load(S_ptr + mb + j[:, None] * N + i[None, :])
    rp = tl.load(rp_ptr + cb + tt[:, None] * N + j[None, :])
    y = _dot(rp, ST, PREC) + tl.load(y0_ptr + cb + tt[:, None] * N + i[None, :])
    off = ((b.to(tl.int64) * T + t) * H + h) * N
    tl.store(y_ptr + off[:, None] + i[None, :], y.to(y_ptr.dtype.element_ty), mask=(t < T)[:, None])


def _run_prep(xs: list, starts, chunk: int, bv: int, precision: str):
    """Pass 1 for contiguous inputs xs [B, T, H, 64]: Y0, R', A and D ([B*H, NC, ...] fp32 buffers) and the resets
    as the kernels read them (a placeholder pointer without resets)."""
    B, T, H, N = xs[0].shape
    NC = -(-T // chunk)
    y0 = torch.empty(B * H, NC, chunk, N, device=xs[0].device, dtype=torch.float32)
    rp = torch.empty_like(y0)
    A = torch.empty(B * H, NC, N, N, device=xs[0].device, dtype=torch.float32)
    D = torch.empty_like(A)
    st = starts_u8(starts, y0)
    _prep[(B * H, NC, N // bv)](*xs, st, y0, rp, A, D, T, NC, H=H, N=N, L=chunk, BV=bv, LOG2L=int(math.log2(chunk)),
                                HAS_ST=starts is not None, PREC=precision, num_warps=8)  # 4 warps spill at L >= 32
    return y0, rp, A, D, st


def wkv_fwd_3pass(r, w, k, v, a, b, state=None, chunk: int = 16, bv: int = 16, precision: str = "ieee",
                  starts=None, save: bool = False):
    """The same forward in three passes: every chunk's state-free terms at once, a scan over chunks that is one
    64 x 64 product per chunk, every chunk's output at once. Buffers: about 3 x 16 KiB per chunk and head.
    `starts` (bool [B, T]): the state restarts from zero before each marked step (packed rows). `save`: also return
    the state at each chunk's start, [B*H, NC, 64 (key), 64 (value)] fp32, for `wkv_bwd_3pass`."""
    B, T, H, N = r.shape
    xs = [x.contiguous() for x in (r, w, k, v, a, b)]
    y0, rp, A, D, _ = _run_prep(xs, starts, chunk, bv, precision)
    NC = A.shape[1]
    S = torch.empty_like(A)
    y = torch.empty_like(xs[0])
    sT = torch.empty(B, H, N, N, device=r.device, dtype=torch.float32)
    s0 = sT if state is None else state.float().contiguous()
    _scan[(B * H, N // bv)](A, D, s0, S, sT, NC, N=N, BV=bv, HAS_S0=state is not None, PREC=precision)
    _out[(B * H, NC, N // bv)](y, y0, rp, S, T, NC, H=H, N=N, L=chunk, BV=bv, PREC=precision)
    return (y, sT, S) if save else (y, sT)


@triton.jit(do_not_specialize=["T", "NC", "H"])
def _bwd_scan(rp_ptr, A_ptr, dy_ptr, dsT_ptr, dSn_ptr, ds0_ptr, T, NC, H, N: tl.constexpr,
              L: tl.constexpr, BV: tl.constexpr, HAS_DST: tl.constexpr, PREC: tl.constexpr):
    """Backward pass 2, chunk after chunk from the end: dS_c^T = R'_c^T dY_c + A_c^T dS_{c+1}^T; keeps each dS_{c+1}."""
    bh, b, h, tt, j, i, s_base, dST = _walk_start(dsT_ptr, H, N, L, BV, HAS_DST)
    for cc in range(0, NC):
        c = NC - 1 - cc
        mb = (bh.to(tl.int64) * NC + c) * N * N
        cb = (bh.to(tl.int64) * NC + c) * L * N
        tl.store(dSn_ptr + mb + j[:, None] * N + i[None, :], dST)
        t = c * L + tt
        off = ((b.to(tl.int64) * T + t) * H + h) * N
        dyc = tl.load(dy_ptr + off[:, None] + i[None, :], mask=(t < T)[:, None], other=0.0).to(tl.float32)
        rp = tl.load(rp_ptr + cb + tt[:, None] * N + j[None, :])
        A = tl.load(A_ptr + mb + j[:, None] * N + j[None, :])
        dST = _dot(tl.trans(rp), dyc, PREC) + _dot(tl.trans(A), dST, PREC)
    tl.store(ds0_ptr + s_base + i[None, :] * N + j[:, None], dST)


def wkv_bwd_3pass(r, w, k, v, a, b, S, dy, dsT=None, state=None, chunk: int = 16, bv: int = 16,
                  precision: str = "ieee", starts=None, chunk_warps: int = 8):
    """Gradients (dr, dw, dk, dv, da, db, ds0) of the forward `wkv_fwd_3pass(..., save=True)` given dy and the final
    state's gradient dsT (None: zero). S: the forward's saved chunk states. Its R' and A are made again (pass 1)."""
    B, T, H, N = r.shape
    xs = [x.contiguous() for x in (r, w, k, v, a, b)]
    _, rp, A, _, st = _run_prep(xs, starts, chunk, bv, precision)  # R' and A again (Y0 and D unused)
    NC = A.shape[1]
    dSn = torch.empty_like(A)
    ds0 = torch.empty(B, H, N, N, device=r.device, dtype=torch.float32)
    dy = dy.contiguous()
    dst = ds0 if dsT is None else dsT.float().contiguous()
    _bwd_scan[(B * H, N // bv)](rp, A, dy, dst, dSn, ds0, T, NC, H=H, N=N, L=chunk, BV=bv, HAS_DST=dsT is not None,
                                PREC=precision)
    return (*chunk_gradients(*xs, starts, st, S, dSn, dy, chunk, precision, chunk_warps), ds0)


def wkv_bwd_1pass(r, w, k, v, a, b, S, dy, dsT=None, state=None, chunk: int = 16, bv: int = 16,
                  precision: str = "ieee", starts=None, chunk_warps: int = 8):
    """Gradients as in `wkv_bwd_3pass`, for `wkv_fwd_1pass(..., save=True)`: the reverse walk (the chunk algebra made
    again in registers, no R' or A buffers), then the per-chunk gradients; the package's launch."""
    xs = [x.contiguous() for x in (r, w, k, v, a, b)]
    return walk_backward(*xs, S, dy.contiguous(), None if dsT is None else dsT.float().contiguous(), starts, bv,
                         precision, chunk=chunk, chunk_warps=chunk_warps)


IMPLS = {"1pass": wkv_fwd_1pass, "3pass": wkv_fwd_3pass}
BWD = {"1pass": wkv_bwd_1pass, "3pass": wkv_bwd_3pass}


def _inputs(B, T, H, dtype, device, seed, w_scale=3.0):
    g = torch.Generator().manual_seed(seed)
    r, k, v = (torch.randn(B, T, H, 64, generator=g) for _ in range(3))
    w = torch.randn(B, T, H, 64, generator=g) * w_scale  # decays over the model's whole range, 0.545 .. 1
    kk = torch.nn.functional.normalize(torch.randn(B, T, H, 64, generator=g), dim=-1)
    rate = torch.sigmoid(torch.randn(B, T, H, 64, generator=g))
    xs = [r, w, k * 0.5, v, -kk, kk * rate]
    s0 = torch.randn(B, H, 64, 64, generator=g) * 0.3
    return [x.to(device=device, dtype=dtype) for x in xs], s0.to(device)


def _rel(x, ref):
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


def _tol(dtype: torch.dtype, precision: str) -> float:
    """Issue 12's bound (2e-3, relative L2 against float64) for tf32 products or bf16 inputs and outputs; fp32
    arithmetic (ieee, tf32x3) must land far under it."""
    return 2e-3 if dtype == torch.bfloat16 or precision in ("tf32", "tf32rn") else 1e-4


def _resets(B: int, T: int, chunk: int, seed: int) -> torch.Tensor:
    """About one reset every 7 steps; row 0 also at every chunk start, row 1 none in its first steps (so the
    initial state reaches into the row)."""
    starts = torch.rand(B, T, generator=torch.Generator().manual_seed(seed)) < 0.15
    starts[0, ::chunk] = True
    starts[1, :3] = False
    return starts


def check(device: str, dtype: torch.dtype, chunks: list[int], lengths: list[int], impls: list[str],
          precision: str) -> bool:
    """Outputs and final state against the float64 recurrence (run on the same device), with and without a state,
    with resets, at extreme decays too."""
    ok = True
    for T in lengths:
        for with_state in (False, True):
            for w_scale, resets in ((3.0, False), (30.0, False), (3.0, True)):
                xs, s0 = _inputs(2, T, 2, dtype, device, seed=T + int(w_scale), w_scale=w_scale)
                state = s0 if with_state else None
                for chunk in chunks:
                    starts = _resets(2, T, chunk, T).to(device) if resets else None
                    y_ref, s_ref = wkv_reference(*xs, state=state, starts=starts)
                    for impl in impls:
                        y, sT = IMPLS[impl](*xs, state=state, chunk=chunk, precision=precision, starts=starts)
                        ey, es = _rel(y, y_ref), _rel(sT, s_ref)
                        good = max(ey, es) < _tol(dtype, precision) and bool(torch.isfinite(y).all()
                                                                             and torch.isfinite(sT).all())
                        ok &= good
                        print(f"{impl} L{chunk} {precision} {str(dtype)[6:]} T {T:4d} state {int(with_state)} "
                              f"|w| x{w_scale:2.0f} resets {int(resets)}: rel y {ey:.2e} state {es:.2e} "
                              f"{'ok' if good else 'FAIL'}", flush=True)
    return ok


SHAPES = ((1, 1024, 12), (4, 2048, 12), (16, 2048, 12), (8, 4096, 12), (8, 4096, 64))
NAMES = ["r", "w", "k", "v", "a", "b", "s0"]


def check_grads(device: str, dtype: torch.dtype, chunks: list[int], lengths: list[int], impls: list[str],
                precision: str) -> bool:
    """The backward of each form against autograd through the float64 recurrence: every input's gradient and the
    initial state's, with and without an initial state, with a final-state gradient, with resets, at extreme
    decays."""
    ok = True
    for T in lengths:
        for with_state, with_starts, w_scale in ((False, False, 3.0), (True, False, 3.0), (True, True, 3.0),
                                                 (True, False, 30.0)):
            xs, s0 = _inputs(2, T, 2, dtype, device, seed=T + 7, w_scale=w_scale)
            state = s0 if with_state else None
            g = torch.Generator().manual_seed(T + 1)
            dy = torch.randn(xs[0].shape, generator=g).to(device=device, dtype=dtype)
            dsT = torch.randn(2, 2, 64, 64, generator=g).to(device)
            for chunk in chunks:
                starts = _resets(2, T, chunk, T).to(device) if with_starts else None
                ins = [x.detach().double().requires_grad_() for x in xs]
                s_in = s0.double().requires_grad_()
                y_ref, s_ref = wkv_reference(*ins, state=s_in if with_state else None, starts=starts)
                want = torch.autograd.grad((y_ref * dy.double()).sum() + (s_ref * dsT.double()).sum(),
                                           ins + ([s_in] if with_state else []))
                for impl in impls:
                    *_, S = IMPLS[impl](*xs, state=state, chunk=chunk, precision=precision, starts=starts,
                                        save=True)
                    got = BWD[impl](*xs, S, dy, dsT, state=state, chunk=chunk, precision=precision, starts=starts)
                    errs = [_rel(gg, ww) for gg, ww in zip(got, want, strict=False)]
                    good = max(errs) < _tol(dtype, precision) and all(bool(torch.isfinite(x).all()) for x in got)
                    ok &= good
                    print(f"{impl} grads L{chunk} {precision} {str(dtype)[6:]} T {T:4d} state {int(with_state)} "
                          f"resets {int(with_starts)} |w| x{w_scale:2.0f}: "
                          + " ".join(f"{n} {e:.1e}" for n, e in zip(NAMES, errs, strict=False))
                          + f" {'ok' if good else 'FAIL'}", flush=True)
    return ok


def _train_fn(impl: str, xs, dy, chunk: int, bv: int, prec: str, chunk_warps: int = 8):
    def run():
        y, _, S = IMPLS[impl](*xs, chunk=chunk, bv=bv, precision=prec, save=True)
        return y, BWD[impl](*xs, S, dy, chunk=chunk, bv=bv, precision=prec, chunk_warps=chunk_warps)
    return run


def profile(fn, steps: int = 3) -> str:
    """Mean CUDA time per call of each kernel that `fn` launches, over `steps` calls."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    fn()
    torch.cuda.synchronize()
    with prof(activities=[ProfilerActivity.CUDA]) as p:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    rows = []
    for e in p.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t > 0 and e.count >= steps:
            rows.append((t / steps, e.key))
    return ", ".join(f"{name[:28]} {us / 1e3:.3f} ms" for us, name in sorted(rows, reverse=True)[:8])


def bench(chunks: list[int], bvs: list[int], shapes, impls: list[str], precisions: list[str],
          with_cuda: bool = True, do_profile: bool = False, chunk_warps: tuple[int, ...] = (8,)) -> list[dict]:
    """bf16 inputs, triton do_bench medians. Forward (no saves) beside our CUDA forward kernel; then forward with
    saves + backward beside our CUDA kernels' training forward + backward, with each form's rel L2 error of y and
    of dw against our CUDA kernels (fp32 math both). Returns the rows."""
    from triton.testing import do_bench

    from rwkv_music.model import wkv_cuda

    ext = wkv_cuda._ext() if with_cuda else None
    results = []
    for B, T, H in shapes:
        xs, _ = _inputs(B, T, H, torch.bfloat16, "cuda", seed=0)
        dy = torch.randn_like(xs[0])
        row = f"B{B} T{T} H{H} fwd:"
        res = {"shape": [B, T, H], "fwd": {}, "train": {}}
        ref = None
        if ext is not None:
            cfg = wkv_cuda.default_config(B, H)
            ms = do_bench(lambda xs=xs, cfg=cfg: ext.forward(*xs, None, None, False, cfg[0]), return_mode="median")
            res["fwd"]["cuda"] = ms
            row += f" CUDA {ms:.3f} ms"

            def cuda_train(xs=xs, dy=dy, cfg=cfg):
                y, sT, sa, ck = ext.forward(*xs, None, None, True, cfg[0])
                return y, ext.backward(*xs, sT, sa, ck, dy, None, None, None, cfg[1], cfg[2])
            ref = cuda_train()
        configs = [(m, c, v, p) for m in impls for c in chunks for v in bvs for p in precisions]
        for impl, chunk, bv, prec in configs:
            fn = IMPLS[impl]
            ms = do_bench(lambda xs=xs, f=fn, c=chunk, v=bv, p=prec: f(*xs, chunk=c, bv=v, precision=p),
                          return_mode="median")
            res["fwd"][f"{impl} L{chunk} BV{bv} {prec}"] = ms
            row += f" | {impl} L{chunk} BV{bv} {prec} {ms:.3f}"
        print(row, flush=True)
        row = f"B{B} T{T} H{H} fwd+bwd:"
        if ext is not None:
            ms = do_bench(cuda_train, return_mode="median")
            res["train"]["cuda"] = ms
            row += f" CUDA {ms:.3f} ms"
        for (impl, chunk, bv, prec), cw in [(c, w) for c in configs for w in chunk_warps]:
            fn = _train_fn(impl, xs, dy, chunk, bv, prec, cw)
            ms = do_bench(fn, return_mode="median")
            key = f"{impl} L{chunk} BV{bv} {prec}" + (f" W{cw}" if len(chunk_warps) > 1 else "")
            res["train"][key] = ms
            row += f" | {key} {ms:.3f}"
            if ref is not None:
                y, grads = fn()
                errs = {"y": _rel(y, ref[0]), "dw": _rel(grads[1], ref[1][1]), "dk": _rel(grads[2], ref[1][2])}
                res["train"][key + " err"] = errs
                row += " (" + ", ".join(f"{n} {e:.1e}" for n, e in errs.items()) + ")"
        print(row, flush=True)
        if do_profile:
            if ext is not None:
                print(f"  profile CUDA fwd+bwd: {profile(cuda_train)}", flush=True)
            for impl in impls:
                fn = _train_fn(impl, xs, dy, chunks[0], bvs[0], precisions[0])
                print(f"  profile {impl} L{chunks[0]} BV{bvs[0]} {precisions[0]} fwd+bwd: {profile(fn)}", flush=True)
        results.append(res)
        del xs, dy, ref
        torch.cuda.empty_cache()
    return results


def _warm_task(task: tuple) -> str:
    """Compile one group of kernel variants by running it once at a small size (Triton caches the binaries on disk,
    so the checks and timings that follow start compiled)."""
    import contextlib
    import io
    import time

    t0 = time.time()
    kind, impl, chunk, bv, prec, dtype = task
    dtype = getattr(torch, dtype)
    with contextlib.redirect_stdout(io.StringIO()):
        if kind == "check":
            check("cuda", dtype, [chunk], [17], [impl], prec)
            check_grads("cuda", dtype, [chunk], [17], [impl], prec)
        else:
            xs, _ = _inputs(1, 40, 1, dtype, "cuda", seed=0)
            IMPLS[impl](*xs, chunk=chunk, bv=bv, precision=prec)
            _train_fn(impl, xs, torch.randn_like(xs[0]), chunk, bv, prec)()
        torch.cuda.synchronize()
    return f"{kind} {impl} L{chunk} BV{bv} {prec} {str(dtype)[6:]}: {time.time() - t0:.0f} s"


def warm(args, procs: int) -> None:
    """Compile every variant that --check and --bench will use, in `procs` processes at once."""
    import concurrent.futures as cf
    import multiprocessing as mp

    tasks = []
    if args.check:
        tasks += [("check", m, c, 16, args.precisions[0], d) for m in args.impls for c in args.chunks
                  for d in ("float32", "bfloat16")]
    if args.bench:
        tasks += [("bench", m, c, v, p, "bfloat16") for m in args.impls for c in args.chunks for v in args.bvs
                  for p in args.precisions]
    with cf.ProcessPoolExecutor(min(procs, len(tasks) or 1), mp_context=mp.get_context("spawn")) as pool:
        for line in pool.map(_warm_task, tasks):
            print(f"# compiled {line}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="Compare with the float64 recurrence.")
    ap.add_argument("--bench", action="store_true", help="Time it beside our CUDA kernels (needs a GPU).")
    ap.add_argument("--profile", action="store_true", help="Bench: also each kernel's time (torch.profiler).")
    ap.add_argument("--json", type=Path, default=None, help="Bench: write the timings here.")
    ap.add_argument("--chunks", type=int, nargs="+", default=[16, 32])
    ap.add_argument("--bvs", type=int, nargs="+", default=[16, 32, 64])
    ap.add_argument("--lengths", type=int, nargs="+", default=[1, 15, 16, 17, 100, 257])
    ap.add_argument("--shapes", nargs="+", default=None, metavar="BxTxH",
                    help="Bench shapes [" + " ".join(f"{b}x{t}x{h}" for b, t, h in SHAPES) + "].")
    ap.add_argument("--precisions", nargs="+", default=["tf32rn"], choices=["tf32rn", "tf32", "tf32x3", "ieee"],
                    help="tl.dot input precisions (tf32rn: operands rounded to tf32, then tensor cores; tf32: "
                         "operands truncated by the hardware; ieee: fp32 FMA, which ptxas shows spilling heavily; "
                         "tf32x3: three tf32 products, near fp32). --check uses the first.")
    ap.add_argument("--chunk-warps", type=int, nargs="+", default=[8],
                    help="Bench: warps of the backward's per-chunk kernel (the package launches 8), each timed.")
    ap.add_argument("--no-cuda", action="store_true", help="Bench without our CUDA kernels (no extension build).")
    ap.add_argument("--warm", type=int, default=0, metavar="PROCS",
                    help="First compile every kernel variant the run will use, in PROCS processes at once.")
    ap.add_argument("--warm-only", action="store_true", help="With --warm: compile, then stop.")
    ap.add_argument("--impls", nargs="+", default=["1pass", "3pass"], choices=list(IMPLS),
                    help="1pass: one program per head and row tile walks the chunks (forward and the backward's "
                         "scan); 3pass: the state-free terms of all chunks at once, a scan of one product per chunk, "
                         "all outputs at once.")
    args = ap.parse_args()
    device = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available() else "cuda"
    ok = True
    if args.warm and device == "cuda":
        warm(args, args.warm)
        if args.warm_only:
            return
    if args.check:
        prec = args.precisions[0]
        for dtype in (torch.float32,) + ((torch.bfloat16,) if device == "cuda" else ()):
            print(f"# check on {device}, {dtype}, {prec} products", flush=True)
            ok &= check(device, dtype, args.chunks, args.lengths, args.impls, prec)
            ok &= check_grads(device, dtype, args.chunks, [x for x in args.lengths if x > 1] or args.lengths,
                              args.impls, prec)
        print(f"# check {'passed' if ok else 'FAILED'}", flush=True)
    if args.bench:
        shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes] if args.shapes else SHAPES
        rows = bench(args.chunks, args.bvs, shapes, args.impls, args.precisions, with_cuda=not args.no_cuda,
                     do_profile=args.profile, chunk_warps=tuple(args.chunk_warps))
        if args.json:
            import json

            args.json.write_text(json.dumps(rows, indent=1))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()

"""The WKV operator of RWKV-7: one interface, implementations chosen by device.

Per head, with state S [N, N] (rows: value index i, columns: key index j) and t = 1..T:

    S_t = S_{t-1} diag(d_t) + (S_{t-1} a_t) b_t^T + v_t k_t^T,     y_t = S_t r_t
    d_t = exp(-exp(-0.5) * sigmoid(w_t))                          (w is the raw decay logit)

Implementations
  - `wkv_reference`: per-step loop in float64; the ground truth for tests.
  - `wkv_chunked`:   pure PyTorch with autograd, chunks of L steps solved with matmuls and one unit
                     lower-triangular solve per chunk (a WY-style form); any T; CPU and GPU fallback.
  - CUDA:            `rwkv_music.model.wkv_cuda` (separate module), used by `wkv` when the tensors are on
                     a GPU and the extension loads. ``RWKV_MUSIC_WKV=torch|cuda|auto`` overrides the choice.
"""

from __future__ import annotations

import functools
import math
import os
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

DECAY_SCALE = math.exp(-0.5)  # decay = exp(-DECAY_SCALE * sigmoid(w)) lies in [0.545, 1)
DEFAULT_CHUNK = 32  # fastest on CPU in bench; fp32 error stays ~3e-7 even at the strongest decay

WkvFn = Callable[..., tuple[Tensor, Tensor]]


def log_decay(w: Tensor) -> Tensor:
    """log of the per-channel decay from the raw logit w: -exp(-0.5) * sigmoid(w), in (-0.607, 0)."""
    return -DECAY_SCALE * torch.sigmoid(w)


def _no_autocast(x: Tensor) -> torch.autocast:
    """The torch WKV paths run in fp32 even inside a bf16 autocast region (its matmuls carry the state)."""
    return torch.autocast(device_type=x.device.type, enabled=False)


def _state_dtype(x: Tensor) -> torch.dtype:
    """float32 state, except float64 when the inputs are float64 (tests compare in float64)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def wkv_reference(
    r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, state: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Naive per-step recurrence in float64 (slow; for tests). Shapes as in `wkv`; returns float64."""
    B, T, H, N = r.shape
    r, w, k, v, a, b = (x.to(torch.float64) for x in (r, w, k, v, a, b))
    decay = torch.exp(log_decay(w))
    S = r.new_zeros(B, H, N, N) if state is None else state.to(torch.float64)
    ys = []
    for t in range(T):
        S = (
            S * decay[:, t, :, None, :]
            + (S @ a[:, t, :, :, None]) @ b[:, t, :, None, :]
            + v[:, t, :, :, None] @ k[:, t, :, None, :]
        )
        ys.append((S @ r[:, t, :, :, None]).squeeze(-1))
    y = torch.stack(ys, dim=1)
    return y, S


def wkv_step_torch(
    r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, state: Tensor | None
) -> tuple[Tensor, Tensor]:
    """One step of the recurrence in PyTorch. Inputs [B, H, N]; state [B, H, N, N] (None = zeros)."""
    with _no_autocast(r):
        return _wkv_step_fp32(r, w, k, v, a, b, state)


def _wkv_step_fp32(
    r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, state: Tensor | None
) -> tuple[Tensor, Tensor]:
    out_dtype = r.dtype
    sdt = _state_dtype(r)
    r, w, k, v, a, b = (x.to(sdt) for x in (r, w, k, v, a, b))
    B, H, N = r.shape
    S = r.new_zeros(B, H, N, N) if state is None else state.to(sdt)
    decay = torch.exp(log_decay(w))
    S = S * decay[:, :, None, :] + (S @ a[..., None]) @ b[:, :, None, :] + v[..., None] @ k[:, :, None, :]
    y = (S @ r[..., None]).squeeze(-1)
    return y.to(out_dtype), S


def wkv_chunked(
    r: Tensor,
    w: Tensor,
    k: Tensor,
    v: Tensor,
    a: Tensor,
    b: Tensor,
    state: Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK,
    recompute: bool = True,
) -> tuple[Tensor, Tensor]:
    """Chunked WKV in PyTorch (differentiable by autograd). Shapes and semantics as in `wkv`.

    With ``recompute`` (default) autograd keeps only the inputs and re-runs the chunk algebra in
    backward: the intermediates would otherwise be ~5x the size of the inputs.
    """
    tensors = (r, w, k, v, a, b) + (() if state is None else (state,))
    if recompute and torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return checkpoint(_wkv_chunked, r, w, k, v, a, b, state, chunk_size, use_reentrant=False)
    return _wkv_chunked(r, w, k, v, a, b, state, chunk_size)


def _wkv_chunked(
    r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, state: Tensor | None, chunk_size: int
) -> tuple[Tensor, Tensor]:
    """The chunked algorithm.

    Within a chunk, with cumulative decays g_t = sum_{s<=t} log d_s and the state S0 entering the chunk,
    the vectors u_t = S_{t-1} a_t obey a unit lower-triangular system, so the chunk reduces to matmuls:
        (I - A_ab) U = X S0^T + A_ak V          A_xy[t, s] = sum_j x_t[j] y_s[j] exp(g_{t-1}[j] - g_s[j]), s < t
        Y = R~ S0^T + A_rb U + A_rk V            (A_r*: exponent g_t - g_s, s <= t;  R~ = r * exp(g))
        S_L = S0 diag(exp(g_L)) + U^T B^ + V^T K^     (B^ = b * exp(g_L - g), K^ likewise)
    Everything not involving S0 is computed for all chunks at once; only S0 -> S_L runs chunk by chunk.
    Exponents are centred on half the chunk's total decay so that fp32 stays far from overflow.
    """
    with _no_autocast(r):
        return _wkv_chunked_fp32(r, w, k, v, a, b, state, chunk_size)


def _wkv_chunked_fp32(
    r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, state: Tensor | None, chunk_size: int
) -> tuple[Tensor, Tensor]:
    B, T, H, N = r.shape
    out_dtype = r.dtype
    cdt = _state_dtype(r)
    L = chunk_size
    nc = -(-T // L)
    pad = nc * L - T

    def prep(x: Tensor) -> Tensor:  # [B, T, H, N] -> [B, H, nc, L, N] in the compute dtype
        x = x.to(cdt).transpose(1, 2)
        if pad:
            x = F.pad(x, (0, 0, 0, pad))  # zero k, v, a, b, r and log-decay 0: padded steps do nothing
        return x.reshape(B, H, nc, L, N)

    ld = prep(log_decay(w.to(cdt)))
    r, k, v, a, b = (prep(x) for x in (r, k, v, a, b))

    g = ld.cumsum(dim=-2)  # log of the decay product up to and including step t
    g_prev = g - ld  # ... up to step t-1
    g_last = g[..., -1:, :]  # whole chunk, [B, H, nc, 1, N]
    c = 0.5 * g_last
    r_c, a_c = r * torch.exp(g - c), a * torch.exp(g_prev - c)
    inv = torch.exp(c - g)
    k_c, b_c = k * inv, b * inv

    A_ab = torch.tril(a_c @ b_c.mT, diagonal=-1)
    A_ak = torch.tril(a_c @ k_c.mT, diagonal=-1)
    A_rb = torch.tril(r_c @ b_c.mT)
    A_rk = torch.tril(r_c @ k_c.mT)

    eye = torch.eye(L, dtype=cdt, device=r.device)
    rhs = torch.cat([a * torch.exp(g_prev), A_ak @ v], dim=-1)
    sol = torch.linalg.solve_triangular(eye - A_ab, rhs, upper=False, unitriangular=True)
    P, U = sol.split([N, N], dim=-1)  # u_t = S0 P_t + U_t (as rows: U_rows = P S0^T + U)

    Q = r * torch.exp(g) + A_rb @ P  # y = Q S0^T + Z
    Z = A_rb @ U + A_rk @ v
    to_end = torch.exp(g_last - g)
    KB = torch.cat([b * to_end, k * to_end], dim=-2)  # [B, H, nc, 2L, N]
    d_last = torch.exp(g_last)

    S = r.new_zeros(B, H, N, N) if state is None else state.to(cdt)
    entering = []
    for ci in range(nc):
        entering.append(S)
        u = U[:, :, ci] + P[:, :, ci] @ S.mT  # [B, H, L, N] rows u_t
        S = S * d_last[:, :, ci] + torch.cat([u, v[:, :, ci]], dim=-2).mT @ KB[:, :, ci]
    S_in = torch.stack(entering, dim=2)  # [B, H, nc, N, N]
    y = Q @ S_in.mT + Z  # [B, H, nc, L, N]
    y = y.reshape(B, H, nc * L, N)[:, :, :T].transpose(1, 2)
    return y.to(out_dtype), S


def _impl_choice() -> str:
    choice = os.environ.get("RWKV_MUSIC_WKV", "auto").strip().lower() or "auto"
    if choice not in ("auto", "torch", "cuda"):
        raise ValueError(f"RWKV_MUSIC_WKV must be auto, torch or cuda, got {choice!r}")
    return choice


@functools.lru_cache(maxsize=1)
def _cuda_module() -> object | None:
    """The CUDA implementation module if it imports and reports itself available; warns once otherwise."""
    try:
        from rwkv_music.model import wkv_cuda  # type: ignore[attr-defined]
    except Exception as e:  # missing module or broken build: fall back, never crash
        warnings.warn(f"CUDA WKV unavailable ({type(e).__name__}: {e}); using the chunked PyTorch WKV",
                      stacklevel=3)
        return None
    try:
        ok = bool(wkv_cuda.is_available())
    except Exception as e:
        warnings.warn(f"CUDA WKV is_available() failed ({e}); using the chunked PyTorch WKV", stacklevel=3)
        return None
    if not ok:
        warnings.warn("CUDA WKV extension not available; using the chunked PyTorch WKV", stacklevel=3)
        return None
    return wkv_cuda


def _cuda_for(x: Tensor) -> object | None:
    choice = _impl_choice()
    if not x.is_cuda or choice == "torch":
        return None
    mod = _cuda_module()
    if mod is None and choice == "cuda":
        raise RuntimeError("RWKV_MUSIC_WKV=cuda but the CUDA WKV extension is not available")
    return mod


def wkv(
    r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, state: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """RWKV-7 WKV over a sequence.

    r, w, k, v, a, b: [B, T, H, N] (fp32 or bf16; w is the raw decay logit); state: [B, H, N, N] fp32 or
    None (zeros). Returns (y [B, T, H, N] in r.dtype, final state [B, H, N, N] fp32). Differentiable
    w.r.t. all inputs and the initial state. Dispatches to the CUDA kernel on GPU when available.
    """
    if r.shape[1] == 1:  # one token: the RNN step is cheaper than any chunked form
        y, s = wkv_step(r[:, 0], w[:, 0], k[:, 0], v[:, 0], a[:, 0], b[:, 0], state)
        return y[:, None], s
    mod = _cuda_for(r)
    if mod is not None:
        return mod.wkv_cuda(r, w, k, v, a, b, state)  # type: ignore[attr-defined]
    return wkv_chunked(r, w, k, v, a, b, state)


def wkv_step(
    r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, state: Tensor | None
) -> tuple[Tensor, Tensor]:
    """One token (RNN mode): inputs [B, H, N], state [B, H, N, N] fp32. Same math as `wkv`."""
    mod = _cuda_for(r)
    if mod is not None:
        step = getattr(mod, "wkv_cuda_step", None)
        tensors = (r, w, k, v, a, b) + (() if state is None else (state,))
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
        if step is not None and not needs_grad:  # the fast step kernel has no backward
            return step(r, w, k, v, a, b, state)
        y, s = mod.wkv_cuda(*(x[:, None] for x in (r, w, k, v, a, b)), state)  # type: ignore[attr-defined]
        return y[:, 0], s
    return wkv_step_torch(r, w, k, v, a, b, state)

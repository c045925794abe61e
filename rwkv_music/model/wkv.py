"""The WKV operator of RWKV-7: one interface, implementations chosen by device.

Per head, with state S [N, N] (rows: value index i, columns: key index j) and t = 1..T:

    S_t = S_{t-1} diag(d_t) + (S_{t-1} a_t) b_t^T + v_t k_t^T,     y_t = S_t r_t
    d_t = exp(-exp(-0.5) * sigmoid(w_t))                          (w is the raw decay logit)

Packed rows: ``starts`` (bool [B, T]) marks steps where a new sequence begins; there the state is reset to
zero before the update, so several windows share one row with no padding between them and no leakage.

Implementations
  - `wkv_reference`: per-step loop in float64; the ground truth for tests.
  - `wkv_chunked`:   pure PyTorch with autograd, chunks of L steps solved with matmuls and one unit
                     lower-triangular solve per chunk (a WY-style form); any T; CPU and GPU fallback.
  - CUDA:            `rwkv_music.model.wkv_cuda` (separate module), registered as torch custom ops so that
                     torch.compile keeps the whole block in one graph.
  - Triton:          `rwkv_music.model.wkv_triton`, the chunked form on tensor cores (custom ops too).
`resolve_backend` picks one per device once (the model caches it); ``RWKV_MUSIC_WKV=torch|cuda|triton|auto``
is the default choice of a new model.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass

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
    r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, state: Tensor | None = None,
    starts: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Naive per-step recurrence in float64 (slow; for tests). Shapes as in `wkv`; returns float64."""
    B, T, H, N = r.shape
    r, w, k, v, a, b = (x.to(torch.float64) for x in (r, w, k, v, a, b))
    decay = torch.exp(log_decay(w))
    S = r.new_zeros(B, H, N, N) if state is None else state.to(torch.float64)
    ys = []
    for t in range(T):
        if starts is not None:
            S = S * (~starts[:, t]).to(S.dtype)[:, None, None, None]
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
    starts: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Chunked WKV in PyTorch (differentiable by autograd). Shapes and semantics as in `wkv`.

    With ``recompute`` (default) autograd keeps only the inputs and re-runs the chunk algebra in
    backward: the intermediates would otherwise be ~5x the size of the inputs.
    """
    tensors = (r, w, k, v, a, b) + (() if state is None else (state,))
    if recompute and torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return checkpoint(_wkv_chunked, r, w, k, v, a, b, state, chunk_size, starts, use_reentrant=False)
    return _wkv_chunked(r, w, k, v, a, b, state, chunk_size, starts)


def _wkv_chunked(
    r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, state: Tensor | None, chunk_size: int,
    starts: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The chunked algorithm.

    Within a chunk, with cumulative decays g_t = sum_{s<=t} log d_s and the state S0 entering the chunk,
    the vectors u_t = S_{t-1} a_t obey a unit lower-triangular system, so the chunk reduces to matmuls:
        (I - A_ab) U = X S0^T + A_ak V          A_xy[t, s] = sum_j x_t[j] y_s[j] exp(g_{t-1}[j] - g_s[j]), s < t
        Y = R~ S0^T + A_rb U + A_rk V            (A_r*: exponent g_t - g_s, s <= t;  R~ = r * exp(g))
        S_L = S0 diag(exp(g_L)) + U^T B^ + V^T K^     (B^ = b * exp(g_L - g), K^ likewise)
    Everything not involving S0 is computed for all chunks at once; only S0 -> S_L runs chunk by chunk.
    Exponents are centred on half the chunk's total decay so that fp32 stays far from overflow.
    Resets (`starts`) only mask: A_xy[t, s] keeps pairs of one segment, S0 reaches the steps before the
    chunk's first reset, and S_L keeps S0 and the steps of the chunk's last segment only.
    """
    with _no_autocast(r):
        return _wkv_chunked_fp32(r, w, k, v, a, b, state, chunk_size, starts)


def _wkv_chunked_fp32(
    r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, state: Tensor | None, chunk_size: int,
    starts: Tensor | None,
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
    from_s0 = to_end = None
    if starts is not None:  # segment masks: same[t, s] iff no reset in s+1..t; [B, 1, nc, L, ...] over heads
        st = starts.to(torch.int32)
        if pad:
            st = F.pad(st, (0, pad))
        seg = st.reshape(B, 1, nc, L).cumsum(dim=-1)  # segment number of each step within its chunk
        same = (seg[..., :, None] == seg[..., None, :]).to(cdt)
        A_ab, A_ak, A_rb, A_rk = (m * same for m in (A_ab, A_ak, A_rb, A_rk))
        from_s0 = (seg == 0).to(cdt)[..., None]  # steps that still see the state entering the chunk
        to_end = (seg == seg[..., -1:]).to(cdt)[..., None]  # steps of the chunk's last segment

    eye = torch.eye(L, dtype=cdt, device=r.device)
    x_s0 = a * torch.exp(g_prev) if from_s0 is None else a * torch.exp(g_prev) * from_s0
    rhs = torch.cat([x_s0, A_ak @ v], dim=-1)
    sol = torch.linalg.solve_triangular(eye - A_ab, rhs, upper=False, unitriangular=True)
    P, U = sol.split([N, N], dim=-1)  # u_t = S0 P_t + U_t (as rows: U_rows = P S0^T + U)

    r_s0 = r * torch.exp(g) if from_s0 is None else r * torch.exp(g) * from_s0
    Q = r_s0 + A_rb @ P  # y = Q S0^T + Z
    Z = A_rb @ U + A_rk @ v
    decay_to_end = torch.exp(g_last - g) if to_end is None else torch.exp(g_last - g) * to_end
    KB = torch.cat([b * decay_to_end, k * decay_to_end], dim=-2)  # [B, H, nc, 2L, N]
    d_last = torch.exp(g_last)
    if from_s0 is not None:  # S0 survives the chunk only if no reset happens in it
        d_last = d_last * from_s0[..., -1:, :]

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


BACKENDS = ("auto", "torch", "cuda", "triton")


def default_backend() -> str:
    """The choice a new model starts with: ``RWKV_MUSIC_WKV`` or auto."""
    choice = os.environ.get("RWKV_MUSIC_WKV", "auto").strip().lower() or "auto"
    if choice not in BACKENDS:
        raise ValueError(f"RWKV_MUSIC_WKV must be one of {', '.join(BACKENDS)}, got {choice!r}")
    return choice


@dataclass(frozen=True)
class WkvBackend:
    """The WKV implementation for one device: over a sequence (differentiable) and one token (inference)."""

    name: str
    seq: WkvFn
    step: WkvFn


def _torch_seq(r, w, k, v, a, b, state=None, starts=None):
    return wkv_chunked(r, w, k, v, a, b, state, starts=starts)


TORCH_BACKEND = WkvBackend("torch", _torch_seq, wkv_step_torch)


def _triton_backend(device: torch.device) -> WkvBackend:
    """The chunked Triton kernels over sequences; one token goes through the CUDA step kernel where it loads."""
    from rwkv_music.model import wkv_triton

    if not wkv_triton.is_available(device):
        reason = wkv_triton.load_error() or f"no GPU for it on {device} (TRITON_INTERPRET=1 runs it on the CPU)"
        raise RuntimeError(f"WKV backend triton asked for but it cannot run ({reason})")
    step = wkv_step_torch
    if device.type == "cuda":
        from rwkv_music.model import wkv_cuda

        if wkv_cuda.is_available():
            step = wkv_cuda.wkv_cuda_step_fn
    return WkvBackend("triton", wkv_triton.wkv_triton, step)


def resolve_backend(choice: str, device: torch.device) -> WkvBackend:
    """``torch`` always works; ``cuda`` needs the extension (raises if it does not load); ``triton`` needs
    triton and a GPU (or TRITON_INTERPRET=1); ``auto`` takes CUDA on a GPU when the extension loads, else torch
    with one warning saying why."""
    if choice not in BACKENDS:
        raise ValueError(f"WKV backend must be one of {BACKENDS}, got {choice!r}")
    if choice == "triton":
        return _triton_backend(device)
    if choice == "torch" or (device.type != "cuda" and choice == "auto"):
        return TORCH_BACKEND
    if device.type != "cuda":
        raise RuntimeError(f"WKV backend cuda asked for on {device}")
    try:
        from rwkv_music.model import wkv_cuda
    except Exception as e:  # missing or broken build: fall back (auto) or say why (cuda)
        reason = f"{type(e).__name__}: {e}"
    else:
        if wkv_cuda.is_available():
            return WkvBackend("cuda", wkv_cuda.wkv_cuda, wkv_cuda.wkv_cuda_step_fn)
        reason = wkv_cuda.load_error() or "extension not available"
    if choice == "cuda":
        raise RuntimeError(f"WKV backend cuda asked for but the CUDA extension is not available ({reason})")
    warnings.warn(f"CUDA WKV unavailable ({reason}); using the chunked PyTorch WKV", stacklevel=2)
    return TORCH_BACKEND


def wkv(
    r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, state: Tensor | None = None,
    starts: Tensor | None = None, backend: WkvBackend | None = None,
) -> tuple[Tensor, Tensor]:
    """RWKV-7 WKV over a sequence.

    r, w, k, v, a, b: [B, T, H, N] (fp32 or bf16; w is the raw decay logit); state: [B, H, N, N] fp32 or
    None (zeros); starts: bool [B, T] or None (state reset to zero before each marked step). Returns
    (y [B, T, H, N] in r.dtype, final state [B, H, N, N] fp32). Differentiable w.r.t. all inputs and the
    initial state. `backend` defaults to `resolve_backend(default_backend(), r.device)`.
    """
    if backend is None:
        backend = resolve_backend(default_backend(), r.device)
    if r.shape[1] == 1 and starts is None:  # one token: the RNN step is cheaper than any chunked form
        y, s = wkv_step(r[:, 0], w[:, 0], k[:, 0], v[:, 0], a[:, 0], b[:, 0], state, backend)
        return y[:, None], s
    return backend.seq(r, w, k, v, a, b, state, starts=starts)


def wkv_step(
    r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, state: Tensor | None,
    backend: WkvBackend | None = None,
) -> tuple[Tensor, Tensor]:
    """One token (RNN mode): inputs [B, H, N], state [B, H, N, N] fp32. Same math as `wkv`."""
    if backend is None:
        backend = resolve_backend(default_backend(), r.device)
    return backend.step(r, w, k, v, a, b, state)

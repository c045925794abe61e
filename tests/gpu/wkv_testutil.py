"""Shared inputs of the WKV kernels' GPU tests (test_wkv_cuda.py, test_wkv_triton.py)."""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F

wkv_module = importlib.import_module("rwkv_music.model.wkv")  # the package's `wkv` is the function

N = 64


def wkv_inputs(B: int, T: int, H: int, dtype: torch.dtype, seed: int, state: bool = True):
    """r, w, k, v, a, b on the GPU shaped as the model makes them (kk unit per head, a = -kk, b = kk * iclr, raw
    decay logits w ~ N(0, 2^2)) in `dtype`; an fp32 initial state (None without `state`); dy and a final-state
    gradient."""
    g = torch.Generator(device="cuda").manual_seed(seed)

    def rn(scale=1.0):
        return torch.randn(B, T, H, N, generator=g, device="cuda") * scale

    kk = F.normalize(rn(), dim=-1)
    iclr = torch.sigmoid(rn())
    xs = [rn(), rn(2.0), rn(), rn(), -kk, kk * iclr]
    s0 = torch.randn(B, H, N, N, generator=g, device="cuda") * 0.5 if state else None
    dy = rn().to(dtype)
    dsT = torch.randn(B, H, N, N, generator=g, device="cuda")
    return [x.to(dtype) for x in xs], s0, dy, dsT


def reset_marks(B: int, T: int, seed: int) -> torch.Tensor:
    """Resets inside chunks, at chunk boundaries, adjacent, at t = 0 (row 0) and none at all (last row)."""
    g = torch.Generator().manual_seed(seed)
    st = torch.rand(B, T, generator=g) < 0.03
    st[0, 0] = True
    for t in (15, 16, 17, 33, 34):
        if t < T:
            st[0, t] = True
    st[-1] = False
    return st.cuda()


class _LogDecayExact(torch.autograd.Function):
    """log decay = -e^-0.5 sigmoid(w) whose derivative is taken as sigmoid(w) sigmoid(-w). Autograd's sigmoid
    backward forms y (1 - y): at w = 30, 1 - y keeps three digits even in float64, so the "exact" reference's dw
    was off by 1e-3 there (found when the tf32x3 bound of 1e-4 failed on the GPU, 2026-12-07)."""

    @staticmethod
    def forward(ctx, w):
        ctx.save_for_backward(w)
        return -wkv_module.DECAY_SCALE * torch.sigmoid(w)

    @staticmethod
    def backward(ctx, g):
        (w,) = ctx.saved_tensors
        return g * (-wkv_module.DECAY_SCALE) * torch.sigmoid(w) * torch.sigmoid(-w)


def wkv_reference_exact(*args, **kwargs):
    """`wkv_reference` with the decay's derivative exact at both ends of w (the float64 reference of the tests)."""
    saved = wkv_module.log_decay
    wkv_module.log_decay = _LogDecayExact.apply
    try:
        return wkv_module.wkv_reference(*args, **kwargs)
    finally:
        wkv_module.log_decay = saved

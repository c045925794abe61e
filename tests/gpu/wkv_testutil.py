"""Shared inputs of the WKV kernels' GPU tests (test_wkv_cuda.py, test_wkv_triton.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

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

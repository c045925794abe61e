"""Shared helpers for the model tests: realistic WKV inputs and a small randomised model."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rwkv_music.model import RWKV7, RWKV7Config


def wkv_inputs(B: int, T: int, H: int, N: int, dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    """r, w, k, v, a, b shaped as the model makes them: a = -kk, b = kk * iclr with unit kk."""
    g = torch.Generator().manual_seed(seed)

    def rnd(scale: float = 1.0) -> torch.Tensor:
        return torch.randn(B, T, H, N, generator=g, dtype=dtype) * scale

    kk = F.normalize(rnd(), dim=-1)
    iclr = torch.rand(B, T, H, N, generator=g, dtype=dtype)
    return [rnd(), rnd(2.0), rnd(0.5), rnd(), -kk, kk * iclr]


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


def randomised_model(cfg: RWKV7Config, seed: int = 0, noise: float = 0.1) -> RWKV7:
    """RWKV-LM init plus noise on every parameter, so zero-initialised paths (output, value) matter."""
    torch.manual_seed(seed)
    model = RWKV7(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * noise)
    return model.eval()


"""Shared helpers of the fused-kernel GPU tests (test_fast_step.py, test_fast_prefill.py)."""

from __future__ import annotations

import torch

from rwkv_music.model import RWKV7, RWKV7Config, RWKV7State


def fast_model(seed: int = 0, n_layer: int = 3, n_embd: int = 256, vocab: int = 470, **cfg) -> RWKV7:
    """A CUDA model whose every parameter matters (the x070 init zeroes the LoRA downs and the output
    projections), on the PyTorch WKV: the readable reference."""
    torch.manual_seed(seed)
    m = RWKV7(RWKV7Config(vocab_size=vocab, n_layer=n_layer, n_embd=n_embd, **cfg))
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    m.wkv_backend = "torch"
    return m.eval().cuda()


def rel(x, ref) -> float:
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


def state_err(s: RWKV7State, ref: RWKV7State) -> float:
    return max(rel(s.att_x, ref.att_x), rel(s.wkv, ref.wkv), rel(s.ffn_x, ref.ffn_x))

"""The chunked WKV against the float64 per-step reference, values and gradients."""

from __future__ import annotations

import itertools

import pytest
import torch
from model_testutil import rel_err, wkv_inputs

from rwkv_music.model.wkv import resolve_backend, wkv, wkv_chunked, wkv_reference, wkv_step, wkv_step_torch


@pytest.mark.parametrize("T", [1, 15, 16, 17, 100])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunked_matches_reference_float64(T: int, with_state: bool) -> None:
    x = wkv_inputs(2, T, 2, 64, torch.float64, seed=T)
    s0 = torch.randn(2, 2, 64, 64, dtype=torch.float64) if with_state else None
    y_ref, s_ref = wkv_reference(*x, s0)
    for chunk in (16, 32):
        y, s = wkv_chunked(*x, s0, chunk_size=chunk)
        assert y.dtype == torch.float64 and s.shape == (2, 2, 64, 64)
        assert rel_err(y, y_ref) < 1e-5
        assert rel_err(s, s_ref) < 1e-5


def test_chunked_float32_close_even_at_strongest_decay() -> None:
    x = wkv_inputs(1, 130, 2, 64, torch.float32, seed=3)
    x[1] = torch.full_like(x[1], 30.0)  # sigmoid -> 1: decay 0.545 every step, the largest chunk exponents
    s0 = torch.randn(1, 2, 64, 64)
    y_ref, s_ref = wkv_reference(*x, s0)
    y, s = wkv_chunked(*x, s0)
    assert y.dtype == torch.float32 and s.dtype == torch.float32
    assert rel_err(y, y_ref) < 1e-5 and rel_err(s, s_ref) < 1e-5


def test_gradcheck_chunked() -> None:
    x = [t.requires_grad_() for t in wkv_inputs(1, 7, 1, 4, torch.float64, seed=1)]
    s0 = torch.randn(1, 1, 4, 4, dtype=torch.float64, requires_grad=True)
    # chunk 3 over T = 7: three chunks, the last one padded
    assert torch.autograd.gradcheck(lambda *a: wkv_chunked(*a, chunk_size=3), (*x, s0))


def _gradient_probe(B: int, T: int, seed: int):
    """float64 inputs (initial state included) and a function giving every input's gradient of a random
    projection of (y, final state) under a WKV implementation."""
    x = [t.requires_grad_() for t in wkv_inputs(B, T, 2, 16, torch.float64, seed=seed)]
    inputs = [*x, torch.randn(B, 2, 16, 16, dtype=torch.float64, requires_grad=True)]
    gy = torch.randn(B, T, 2, 16, dtype=torch.float64)
    gs = torch.randn(B, 2, 16, 16, dtype=torch.float64)

    def grads(fn):
        y, s = fn(*inputs)
        return torch.autograd.grad((y * gy).sum() + (s * gs).sum(), inputs)

    return grads


def test_chunked_gradients_match_reference() -> None:
    grads = _gradient_probe(2, 40, seed=2)
    ref = grads(wkv_reference)
    got = grads(lambda *a: wkv_chunked(*a, chunk_size=16))
    for g_ref, g in zip(ref, got, strict=True):
        assert rel_err(g, g_ref) < 1e-8


def test_step_matches_sequence() -> None:
    x = wkv_inputs(3, 9, 2, 64, torch.float32, seed=4)
    y_seq, s_seq = wkv(*x)
    s = None
    ys = []
    for t in range(9):
        y, s = wkv_step(*(z[:, t] for z in x), s)
        ys.append(y)
    assert rel_err(torch.stack(ys, 1), y_seq) < 1e-5
    assert rel_err(s, s_seq) < 1e-5
    y1, s1 = wkv(*(z[:, :1] for z in x))  # T = 1 goes through the step path
    y1_ref, s1_ref = wkv_step_torch(*(z[:, 0] for z in x), None)
    assert torch.equal(y1[:, 0], y1_ref) and torch.equal(s1, s1_ref)


def test_bf16_inputs_keep_fp32_state() -> None:
    x = [t.to(torch.bfloat16) for t in wkv_inputs(1, 20, 2, 64, torch.float32, seed=5)]
    y, s = wkv(*x)
    assert y.dtype == torch.bfloat16 and s.dtype == torch.float32
    y_ref, _ = wkv_reference(*x)
    assert rel_err(y, y_ref) < 2e-2  # bf16 output rounding only


def test_env_var_is_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    x = wkv_inputs(1, 4, 1, 64, torch.float32)
    monkeypatch.setenv("RWKV_MUSIC_WKV", "torch")
    y, _ = wkv(*x)
    assert rel_err(y, wkv_reference(*x)[0]) < 1e-5
    monkeypatch.setenv("RWKV_MUSIC_WKV", "fla")
    with pytest.raises(ValueError, match="RWKV_MUSIC_WKV"):
        wkv(*x)


def test_cuda_backend_on_cpu_is_refused_and_auto_falls_back() -> None:
    assert resolve_backend("auto", torch.device("cpu")).name == "torch"
    with pytest.raises(RuntimeError, match="cuda"):
        resolve_backend("cuda", torch.device("cpu"))


def _random_starts(B: int, T: int, seed: int) -> torch.Tensor:
    """Resets at random steps, some at chunk boundaries, some adjacent, one row without any."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.rand(B, T, generator=g) < 0.08
    starts[0, 0] = True
    if T > 17:
        starts[0, 16] = starts[0, 17] = True
    starts[-1] = False
    return starts


def _segments_separately(x: list[torch.Tensor], s0: torch.Tensor | None, starts: torch.Tensor):
    """The meaning of `starts`: each segment run on its own from a zero state (the first from s0)."""
    B, T = starts.shape
    ys, finals = torch.zeros_like(x[0]), []
    for bi in range(B):
        cuts = [0, *[t for t in range(1, T) if starts[bi, t]], T]
        state = None if s0 is None or starts[bi, 0] else s0[bi : bi + 1]
        for lo, hi in itertools.pairwise(cuts):
            y, state = wkv_reference(*(z[bi : bi + 1, lo:hi] for z in x), state)
            ys[bi, lo:hi] = y[0]
            state_end = state
            state = None
        finals.append(state_end)
    return ys, torch.cat(finals)


@pytest.mark.parametrize("T", [1, 16, 37, 100])
@pytest.mark.parametrize("with_state", [False, True])
def test_resets_equal_separate_sequences(T: int, with_state: bool) -> None:
    x = wkv_inputs(3, T, 2, 16, torch.float64, seed=40 + T)
    s0 = torch.randn(3, 2, 16, 16, dtype=torch.float64) if with_state else None
    starts = _random_starts(3, T, seed=T)
    y_sep, s_sep = _segments_separately(x, s0, starts)
    y_ref, s_ref = wkv_reference(*x, s0, starts=starts)
    assert rel_err(y_ref, y_sep) < 1e-12 and rel_err(s_ref, s_sep) < 1e-12
    for chunk in (16, 32):
        y, s = wkv_chunked(*x, s0, chunk_size=chunk, starts=starts)
        assert rel_err(y, y_sep) < 1e-9 and rel_err(s, s_sep) < 1e-9


def test_reset_gradients_match_reference() -> None:
    grads = _gradient_probe(2, 45, seed=9)
    starts = _random_starts(2, 45, seed=3)
    ref = grads(lambda *a: wkv_reference(*a, starts=starts))
    got = grads(lambda *a: wkv_chunked(*a, chunk_size=16, starts=starts))
    for g_ref, g in zip(ref, got, strict=True):
        assert rel_err(g, g_ref) < 1e-8
    # a reset at step 0 of row 0 cuts the initial state off: no gradient flows to it
    assert got[-1][0].abs().max() == 0


def test_autocast_does_not_lower_wkv_precision() -> None:
    """Inside a bf16 autocast region the chunk algebra and the step must still run in fp32."""
    x = wkv_inputs(2, 50, 2, 64, torch.float32, seed=6)
    s0 = torch.randn(2, 2, 64, 64)
    y_ref, s_ref = wkv_reference(*x, s0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, s = wkv(*x, state=s0)
        y1, _ = wkv(*(z[:, :1] for z in x), state=s0)
    assert y.dtype == torch.float32 and rel_err(y, y_ref) < 1e-5 and rel_err(s, s_ref) < 1e-5
    assert rel_err(y1[:, 0], y_ref[:, 0]) < 1e-5

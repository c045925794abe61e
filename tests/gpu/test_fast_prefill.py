"""The fused prefill (`FastStep.prefill`) against the readable model's parallel forward. Needs a CUDA device.

Reference: the readable model in float32 with the PyTorch WKV. In float32 the fused prefill must match its last
logits and the state after the prompt within rel L2 1e-4; in bf16 / fp16 it must be within 1.5x the error of the
readable forward run in that same dtype, and within 3e-2.
"""

from __future__ import annotations

import pytest
import torch
from fast_testutil import fast_model, rel, state_err

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

TOL_F32 = 1e-4


@torch.no_grad()
def _readable(model, prompt, state=None):
    last = torch.full((prompt.shape[0],), prompt.shape[1] - 1, device=prompt.device)
    logits, new_state = model(prompt, state, positions=last, return_state=True)
    return logits.float(), new_state


@pytest.mark.parametrize(("B", "T"), [(1, 1), (1, 37), (3, 200), (2, 16)])
def test_float32_matches_the_readable_forward(fast_step_mod, B, T) -> None:
    model = fast_model()
    prompt = torch.randint(0, 470, (B, T), device="cuda", generator=torch.Generator("cuda").manual_seed(T))
    want, want_state = _readable(model, prompt)
    got, got_state = fast_step_mod.FastStep(model).prefill(prompt)
    assert got.dtype == torch.float32 and got.shape == (B, 470)
    assert rel(got, want) < TOL_F32
    assert state_err(got_state, want_state) < TOL_F32


def test_from_a_state_equals_one_prefill_of_the_whole(fast_step_mod) -> None:
    """Prefix, then the rest from the prefix's state (updated in place): the same as the readable forward over the
    whole prompt, and as the readable forward from the same state."""
    model = fast_model(seed=1)
    fast = fast_step_mod.FastStep(model)
    prompt = torch.randint(0, 470, (2, 90), device="cuda")
    want, want_state = _readable(model, prompt)
    _, state = fast.prefill(prompt[:, :41])
    _, mid = _readable(model, prompt[:, :41])
    from_mid, from_mid_state = _readable(model, prompt[:, 41:], mid)
    got, got_state = fast.prefill(prompt[:, 41:], state)
    assert got_state is state
    assert rel(got, want) < TOL_F32 and rel(got, from_mid) < TOL_F32
    assert state_err(got_state, want_state) < TOL_F32 and state_err(got_state, from_mid_state) < TOL_F32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_as_close_as_the_readable_forward(fast_step_mod, dtype) -> None:
    prompt = torch.randint(0, 470, (2, 150), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    want, _ = _readable(fast_model(seed=2), prompt)
    low = fast_model(seed=2).to(dtype)
    readable, _ = _readable(low, prompt)
    fused, state = fast_step_mod.FastStep(low).prefill(prompt)
    assert state.att_x.dtype == dtype and state.wkv.dtype == torch.float32
    e_readable, e_fused = rel(readable, want), rel(fused, want)
    assert e_fused < 3e-2
    assert e_fused <= 1.5 * e_readable, (e_fused, e_readable)


def test_base_shape_one_layer_and_odd_lora_ranks(fast_step_mod) -> None:
    """The base preset's shape (L12 D768, LoRA ranks 64/64/32/128), a model with only layer 0, odd LoRA ranks."""
    for kw in (dict(n_layer=12, n_embd=768, vocab=640), dict(n_layer=1, n_embd=128),
               dict(d_decay_lora=30, d_aaa_lora=18, d_mv_lora=14, d_gate_lora=31)):
        model = fast_model(seed=3, **kw)
        prompt = torch.randint(0, model.cfg.vocab_size, (1, 300), device="cuda")
        want, want_state = _readable(model, prompt)
        got, got_state = fast_step_mod.FastStep(model).prefill(prompt)
        assert rel(got, want) < TOL_F32, kw
        assert state_err(got_state, want_state) < TOL_F32, kw


def test_then_the_fused_step_continues_like_the_readable_model(fast_step_mod) -> None:
    model = fast_model(seed=4)
    fast = fast_step_mod.FastStep(model)
    prompt = torch.randint(0, 470, (1, 64), device="cuda")
    nxt = torch.tensor([17], device="cuda")
    _, state = fast.prefill(prompt)
    got = fast(nxt, state)
    want, _ = _readable(model, torch.cat([prompt, nxt[:, None]], dim=1))
    assert rel(got, want) < TOL_F32


def test_out_of_range_token_gives_nan_logits_and_bad_calls_raise(fast_step_mod) -> None:
    model = fast_model(seed=5)
    fast = fast_step_mod.FastStep(model)
    prompt = torch.randint(0, 470, (2, 12), device="cuda")
    prompt[1, 4] = 470
    logits, _ = fast.prefill(prompt)
    assert torch.isfinite(logits[0]).all() and torch.isnan(logits[1]).all()
    with pytest.raises(ValueError, match="batch 2"):
        fast.prefill(prompt, fast.zero_state(3))
    with pytest.raises(ValueError, match=r"tokens \[B, T\]"):
        fast.prefill(prompt[0])

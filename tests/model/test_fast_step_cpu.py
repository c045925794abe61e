"""What of the fused decode step (`model/fast_step.py`) runs without a GPU: why it cannot run here, and the key
that tells its per-model cache when the weights changed. Its kernels are tested in tests/gpu/test_fast_step.py."""

from __future__ import annotations

import pytest
import torch

from rwkv_music.model import RWKV7, RWKV7Config
from rwkv_music.model.fast_step import FastStep, _weights_key, unsupported_reason


def _model() -> RWKV7:
    return RWKV7(RWKV7Config(vocab_size=64, n_layer=1, n_embd=64))


def test_says_why_it_cannot_run_on_the_cpu() -> None:
    model = _model()
    assert unsupported_reason(model) == "the fused step needs a CUDA device"
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        FastStep(model)


def test_weights_key_changes_with_an_update_in_place_and_with_a_new_dtype() -> None:
    model = _model()
    key = _weights_key(model)
    assert _weights_key(model) == key
    with torch.no_grad():
        model.blocks[0].att.w0.add_(1.0)  # what an optimizer step does
    updated = _weights_key(model)
    assert updated != key
    model.to(torch.bfloat16)
    assert _weights_key(model) != updated

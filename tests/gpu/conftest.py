from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def fast_step_mod():
    """`rwkv_music.model.fast_step`, failing (not skipping) when CUDA is present but the extension is not."""
    from rwkv_music.model import fast_step, wkv_cuda

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if not wkv_cuda.is_available():
        pytest.fail(f"CUDA present but the extension did not build/load: {wkv_cuda.load_error()}")
    return fast_step

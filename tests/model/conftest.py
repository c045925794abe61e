"""Session fixtures for the model tests."""

from __future__ import annotations

import pytest
from model_testutil import randomised_model

from rwkv_music.model import RWKV7, RWKV7Config


@pytest.fixture(scope="session")
def tiny_cfg() -> RWKV7Config:
    return RWKV7Config(vocab_size=97, n_layer=3, n_embd=128, head_size=64)


@pytest.fixture(scope="session")
def tiny_model(tiny_cfg: RWKV7Config) -> RWKV7:
    return randomised_model(tiny_cfg)

"""Packed batches train the same function: the loss and every gradient equal those of the same windows
in an ordinary padded batch (real shards, real model, the trainer's own loss function)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rwkv_music.model import RWKV7, RWKV7Config
from rwkv_music.shards import iter_samples
from rwkv_music.shards.dataset import collate, collate_packed
from rwkv_music.train.fit import completion_loss_sum

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(vocab: int) -> RWKV7:
    torch.manual_seed(0)
    model = RWKV7(RWKV7Config(vocab_size=vocab, n_layer=2, n_embd=64, head_size=32))
    with torch.no_grad():  # RWKV-LM's init zeroes some projections; perturb so every gradient is non-trivial
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def test_packed_and_padded_batches_give_the_same_loss_and_gradients(small_shards: Path) -> None:
    samples = [s for _, s in zip(range(9), iter_samples(small_shards, "train"), strict=False)]
    lengths = [len(s["tokens"]) - 1 for s in samples]
    pack_len = max(sum(lengths[:5]), sum(lengths[5:])) + 3  # two rows, each ending in padding
    rows = [samples[:5], samples[5:]]
    packed = collate_packed(rows, pack_len=pack_len)
    assert packed["starts"].sum() == len(samples) and packed["n_windows"] == len(samples)
    padded = collate(samples)
    assert packed["n_targets"] == padded["n_targets"] and packed["n_tokens"] == padded["n_tokens"]
    vocab = int(max(max(s["tokens"]) for s in samples)) + 1
    out = []
    for batch in (packed, padded):
        model = _model(vocab)
        loss, n = completion_loss_sum(model, batch, torch.device("cpu"), amp=False)
        (loss / n).backward()
        out.append((loss.item(), n, [p.grad.clone() for p in model.parameters()]))
    (lp, np_, gp), (lu, nu, gu) = out
    assert np_ == nu and lp == pytest.approx(lu, rel=1e-5)
    for a, b in zip(gp, gu, strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)

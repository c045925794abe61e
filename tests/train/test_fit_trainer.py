"""The Trainer in this process, on real shards: its options reach the model and its state advances as saved."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rwkv_music.model import load
from rwkv_music.train.checkpoints import latest_checkpoint, read_trainer_state
from rwkv_music.train.config import TrainConfig
from rwkv_music.train.fit import DistInfo, Trainer, _batches

pytestmark = pytest.mark.usefixtures("one_thread")  # every test here on one thread (conftest.py)


def tiny_config(shards: Path, out: Path, **kw) -> TrainConfig:
    return TrainConfig(shards=str(shards), out=str(out), n_layer=2, n_embd=64, device="cpu", progress=False,
                       tensorboard=False, batch_size=4, eval_batches=1, shuffle_buffer=256, **kw)


@pytest.mark.parametrize("opts", [{"grad_checkpoint": True}, {"recompute": "elementwise"}, {}])
def test_recompute_option_reruns_blocks_in_backward(small_shards: Path, tmp_path: Path, opts: dict):
    trainer = Trainer(tiny_config(small_shards, tmp_path / "run", max_steps=1, **opts),
                      DistInfo(), torch.device("cpu"))
    mode = opts.get("recompute", "blocks" if opts else "none")
    assert trainer.raw.recompute == mode and trainer.cfg.recompute == mode
    on = mode != "none"
    calls = []
    # a pre-hook: the recomputation stops early once it has what backward needs, before forward hooks would run
    trainer.raw.blocks[0].register_forward_pre_hook(lambda *_: calls.append(torch.is_grad_enabled()))
    batches = _batches(trainer.stream, 0, 0, 0, pin=False)
    trainer.train_step(batches)
    assert len(calls) == (2 if on else 1)  # forward, and with checkpointing its recomputation in backward
    assert trainer.state.step == 1 and trainer.state.consumed == 1 and trainer.state.tokens_seen > 0


def test_transpose_reaches_the_training_stream_only(small_shards: Path, tmp_path: Path):
    """--transpose moves training windows (some pitch ids differ from the unmoved stream's); val is never moved."""
    moved = Trainer(tiny_config(small_shards, tmp_path / "a", max_steps=1, transpose=6), DistInfo(),
                    torch.device("cpu"))
    plain = Trainer(tiny_config(small_shards, tmp_path / "b", max_steps=1), DistInfo(), torch.device("cpu"))
    assert moved.stream.spec.transpose == 6 and plain.stream.spec.transpose == 0
    a = [next(_batches(t.stream, 0, 0, 0, pin=False)).batch for t in (moved, plain)]
    assert torch.equal(a[0]["mask"], a[1]["mask"]) and not torch.equal(a[0]["input_ids"], a[1]["input_ids"])
    assert moved.evaluate() == plain.evaluate()  # the same initial weights score the same, unmoved, val windows


def test_run_state_is_what_the_checkpoint_saves(small_shards: Path, tmp_path: Path):
    trainer = Trainer(tiny_config(small_shards, tmp_path / "run", max_steps=3, grad_accum=2, eval_every=2),
                      DistInfo(), torch.device("cpu"))
    res = trainer.run()
    st = trainer.state
    assert res.step == st.step == 3 and st.consumed == 6 and st.stopped_by is None
    assert res.checkpoint == latest_checkpoint(tmp_path / "run") == st.checkpoint
    saved = read_trainer_state(res.checkpoint)
    assert (saved.step, saved.epoch, saved.consumed, saved.tokens_seen) == (st.step, st.epoch, st.consumed,
                                                                            st.tokens_seen)
    assert saved.val_loss == st.val_loss == res.val_loss and st.val_step == 3
    assert saved.best_val_loss == st.best_val_loss <= st.val_loss
    assert saved.build_id == trainer.build_id


def test_bf16_weights_compute_in_bf16_and_step_fp32_masters(small_shards: Path, tmp_path: Path):
    """--precision bf16-weights: forward and backward on a bf16 copy, AdamW on the fp32 model; after every step
    the copy is the masters rounded, the checkpoint holds the fp32 masters, and training follows the fp32 run."""
    runs = {}
    for precision in ("fp32", "bf16-weights"):
        trainer = Trainer(tiny_config(small_shards, tmp_path / precision, max_steps=3, precision=precision,
                                      eval_every=3), DistInfo(), torch.device("cpu"))
        losses = []
        batches = _batches(trainer.stream, 0, 0, 0, pin=False)
        for _ in range(3):
            before = [p.detach().clone() for p in trainer.raw.parameters()]
            losses.append(trainer.train_step(batches).loss)
            if precision == "bf16-weights":
                compute = list(trainer.bf16.model.parameters())
                assert all(c.dtype == torch.bfloat16 and c.grad is None for c in compute)
                kept = 0
                for m, c, b in zip(trainer.raw.parameters(), compute, before, strict=True):
                    assert m.dtype == torch.float32 and torch.equal(c, m.detach().to(torch.bfloat16))
                    # updates too small to change the bf16 weight, which only the fp32 master keeps
                    kept += int(((m != b) & (m.to(torch.bfloat16) == b.to(torch.bfloat16))).sum())
                assert kept > 0
        trainer.save()
        runs[precision] = (losses, trainer)
    (ref, _), (got, trainer) = runs["fp32"], runs["bf16-weights"]
    assert trainer.bf16 is not None and runs["fp32"][1].bf16 is None
    for a, b in zip(got, ref, strict=True):
        assert a == pytest.approx(b, rel=3e-2)
    saved = load(latest_checkpoint(tmp_path / "bf16-weights"))
    for (name, p), q in zip(saved.named_parameters(), trainer.raw.parameters(), strict=True):
        assert p.dtype == torch.float32 and torch.equal(p, q.detach()), name

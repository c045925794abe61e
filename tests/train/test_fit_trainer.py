"""The Trainer in this process, on real shards: its options reach the model and its state advances as saved."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

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

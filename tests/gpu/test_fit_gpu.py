"""`musictrain fit`'s memory and precision options on a GPU, compiled: each trains like bf16 autocast.

`--recompute elementwise` changes what backward keeps, and `--precision bf16-weights` computes with a bf16 copy
of the weights while AdamW steps the fp32 ones; neither should change what is learnt beyond bf16 rounding. Each
runs six steps on real shards beside bf16 autocast with everything kept (fit's default on CUDA until 2026-12-07),
same seed and data order; fit's default on CUDA since (None, None: both options left to the device) is the lean
pair, bf16-weights and elementwise.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rwkv_music.train.config import TrainConfig
from rwkv_music.train.fit import DistInfo, Trainer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(scope="module")
def shards(corpus_dir: Path, build_cli, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("gpu-fit-shards") / "out"
    build_cli(corpus_dir, out, "--format", "parquet", "--max-seq-len", "256", "--workers", "2", "--val-fraction", "0.2",
              "--seed", "0")
    return out


def _train(shards: Path, out: Path, **opts) -> tuple[list[float], float, Trainer]:
    torch._dynamo.reset()
    cfg = TrainConfig(shards=str(shards), out=str(out), preset="tiny", n_layer=2, n_embd=128, device="cuda",
                      compile=True, batch_tokens=4096, pack_len=512, max_steps=6, lr=3e-3, warmup_steps=0,
                      log_every=1, eval_every=6, eval_batches=4, progress=False, tensorboard=False, **opts)
    trainer = Trainer(cfg, DistInfo(), torch.device("cuda"))
    res = trainer.run()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r["loss"] for r in rows if "loss" in r], res.val_loss, trainer


@pytest.fixture(scope="module")
def default_run(shards: Path, tmp_path_factory: pytest.TempPathFactory):
    return _train(shards, tmp_path_factory.mktemp("gpu-fit") / "autocast", precision="bf16", recompute="none")


@pytest.mark.parametrize(("precision", "recompute"),
                         [("bf16", "elementwise"), ("bf16-weights", "none"), ("bf16-weights", "elementwise"),
                          (None, None)])
def test_options_train_like_the_default(shards, tmp_path, default_run, precision, recompute) -> None:
    ref_losses, ref_val, _ = default_run
    losses, val, trainer = _train(shards, tmp_path / "run", precision=precision, recompute=recompute)
    print(f"{precision}/{recompute}: losses {losses} val {val}; default {ref_losses} val {ref_val}")
    assert len(losses) == len(ref_losses) == 6
    for a, b in zip(losses, ref_losses, strict=True):
        assert a == pytest.approx(b, rel=3e-2)
    assert val == pytest.approx(ref_val, rel=3e-2)
    assert losses[-1] < losses[0]
    if precision is None:  # left to the device: the lean step on CUDA
        assert (trainer.cfg.precision, trainer.cfg.recompute) == ("bf16-weights", "elementwise")
        precision, recompute = trainer.cfg.precision, trainer.cfg.recompute
    compute = trainer.raw if trainer.bf16 is None else trainer.bf16.model
    assert compute.recompute == recompute
    if precision == "bf16-weights":  # the bf16 copy computes; the fp32 masters are what the checkpoint holds
        assert all(p.dtype == torch.bfloat16 for p in compute.parameters())
        assert all(p.dtype == torch.float32 for p in trainer.raw.parameters())


@pytest.mark.parametrize(("precision", "recompute", "contrast"), [("bf16", "none", 0.0), ("bf16-weights", "none", 0.0),
                                                                 ("bf16-weights", "elementwise", 0.0),
                                                                 ("bf16-weights", "elementwise", 1.0)])
def test_a_training_step_never_waits_for_the_gpu(shards, tmp_path, precision, recompute, contrast) -> None:
    """After the compile, train_step queues its work and returns: no host-device sync (the loss and grad norm are
    read on logged steps only, the completion positions come as host-made indices, non-finite steps are watched
    on the device), so the GPU never idles while the next batch is built; with --repeat-contrast too."""
    from rwkv_music.train.fit import _batches

    torch._dynamo.reset()
    cfg = TrainConfig(shards=str(shards), out=str(tmp_path / "run"), preset="tiny", n_layer=2, n_embd=128,
                      device="cuda", compile=True, batch_tokens=4096, pack_len=512, max_steps=8, warmup_steps=0,
                      progress=False, tensorboard=False, precision=precision,
                      recompute=recompute, repeat_contrast=contrast)
    trainer = Trainer(cfg, DistInfo(), torch.device("cuda"))
    batches = (item for item in _batches(trainer.stream, 0, 0, 0, pin=True))
    items = [next(batches) for _ in range(6)]
    for item in items[:3]:  # the compile (one: the number of positions is marked dynamic) and AdamW's first step
        trainer.train_step(iter([item]))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        stats = [trainer.train_step(iter([item])) for item in items[3:]]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert trainer.state.step == 6
    assert all(s.loss > 0 and s.grad_norm > 0 for s in stats)  # read afterwards: the step did not have to
    if contrast:
        assert all(s.n_pairs > 0 and 0 <= s.contrast()["truth_leads_repeat"] <= 1 for s in stats)
    trainer.check_finite()

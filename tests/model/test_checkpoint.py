"""Checkpoints: project format, RWKV-LM format, vocabulary resizing, and BlinkDL's `rwkv` package as an
independent reference implementation of the same x070 checkpoint."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from model_testutil import randomised_model, rel_err

from rwkv_music.model import (
    RWKV7,
    RWKV7Config,
    config_from_rwkv_lm,
    load,
    load_rwkv_lm,
    read_meta,
    resize_vocab,
    save,
    save_rwkv_lm,
)

HERE = Path(__file__).parent


def _logits(model: RWKV7, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(idx)


def test_project_format_round_trip(tiny_model: RWKV7, tmp_path: Path) -> None:
    idx = torch.randint(0, tiny_model.cfg.vocab_size, (2, 19))
    out = save(tiny_model, tmp_path / "ckpt", extra_meta={"tokenizer_hash": "abc", "step": 7})
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]  # no temp files left
    loaded = load(out)
    assert loaded.cfg == tiny_model.cfg
    assert torch.equal(_logits(loaded, idx), _logits(tiny_model, idx))
    assert read_meta(out) == {"tokenizer_hash": "abc", "step": 7}
    with pytest.raises(FileNotFoundError, match="not a checkpoint"):
        load(tmp_path / "nowhere")


def test_rwkv_lm_format_round_trip(tiny_model: RWKV7, tmp_path: Path) -> None:
    idx = torch.randint(0, tiny_model.cfg.vocab_size, (2, 19))
    path = save_rwkv_lm(tiny_model, tmp_path / "m.pth")
    sd = torch.load(path, weights_only=True)
    assert {"emb.weight", "head.weight", "blocks.0.ln0.weight", "blocks.0.att.r_k", "blocks.0.att.v1"} <= set(sd)
    assert sd["blocks.1.att.x_r"].shape == (1, 1, 128) and sd["blocks.2.att.r_k"].shape == (2, 64)
    assert config_from_rwkv_lm(sd) == tiny_model.cfg
    loaded = load_rwkv_lm(path)
    assert torch.equal(_logits(loaded, idx), _logits(tiny_model, idx))
    bf16 = load_rwkv_lm(save_rwkv_lm(tiny_model, tmp_path / "m16.pth", dtype=torch.bfloat16))
    assert rel_err(_logits(bf16, idx), _logits(tiny_model, idx)) < 5e-2


def test_rwkv_lm_ranks_come_from_shapes(tmp_path: Path) -> None:
    """Older RWKV-LM revisions used other LoRA ranks (e.g. gate 0.6 * C**0.8); the loader must follow."""
    cfg = RWKV7Config(vocab_size=50, n_layer=2, n_embd=128, d_decay_lora=64, d_aaa_lora=96, d_mv_lora=32,
                      d_gate_lora=128, dim_ffn=448)
    model = randomised_model(cfg, seed=13)
    loaded = load_rwkv_lm(save_rwkv_lm(model, tmp_path / "old.pth"))
    assert loaded.cfg == cfg
    idx = torch.randint(0, 50, (1, 11))
    assert torch.equal(_logits(loaded, idx), _logits(model, idx))


def test_rwkv_lm_loader_rejects_other_variants(tiny_model: RWKV7, tmp_path: Path) -> None:
    sd = {k: v for k, v in tiny_model.state_dict().items()}
    sd["blocks.0.ffn.s_emb.weight"] = torch.zeros(3)  # e.g. a DeepEmbed checkpoint
    torch.save(sd, tmp_path / "de.pth")
    with pytest.raises(ValueError, match="unsupported keys"):
        load_rwkv_lm(tmp_path / "de.pth")
    torch.save({"emb.weight": torch.zeros(3, 4)}, tmp_path / "x.pth")
    with pytest.raises(ValueError, match="x070"):
        load_rwkv_lm(tmp_path / "x.pth")


def test_resize_vocab(tiny_cfg: RWKV7Config) -> None:
    big = randomised_model(RWKV7Config(**{**tiny_cfg.to_dict(), "vocab_size": 1000}), seed=8)
    att_before = big.blocks[1].att.w0.detach().clone()
    emb_before = big.emb.weight.detach().clone()
    resize_vocab(big, 200, keep_rows=10)
    assert big.cfg.vocab_size == 200 and big.emb.weight.shape == (200, 128) and big.head.weight.shape == (200, 128)
    assert torch.equal(big.emb.weight[:10], emb_before[:10])
    assert big.emb.weight[10:].abs().max() <= 1e-4  # RWKV-LM's embedding init
    assert torch.equal(big.blocks[1].att.w0, att_before)  # the body is untouched
    with torch.no_grad():
        assert big(torch.randint(0, 200, (1, 9))).shape == (1, 9, 200)
    resize_vocab(big, 300)
    assert big.emb.weight.shape == (300, 128) and big.emb.weight.abs().max() <= 1e-4


def test_matches_blinkdl_rwkv_package(tmp_path: Path) -> None:
    """Same random x070 checkpoint through `rwkv` (BlinkDL's inference code, cpu fp32) and through ours."""
    pytest.importorskip("rwkv")
    cfg = RWKV7Config(vocab_size=300, n_layer=3, n_embd=128)
    ckpt = save_rwkv_lm(randomised_model(cfg, seed=9), tmp_path / "ref.pth")
    g = torch.Generator().manual_seed(10)
    prompt = torch.randint(0, cfg.vocab_size, (23,), generator=g)
    steps = torch.randint(0, cfg.vocab_size, (6,), generator=g)
    out = tmp_path / "ref_out.pt"
    proc = subprocess.run(
        [sys.executable, str(HERE / "rwkv_pip_ref.py"), str(ckpt), ",".join(map(str, prompt.tolist())),
         ",".join(map(str, steps.tolist())), str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref = torch.load(out, weights_only=True)

    model = load_rwkv_lm(ckpt).eval()
    with torch.no_grad():
        seq, state = model(prompt[None], return_state=True)
        assert rel_err(seq[0], ref["seq"]) < 1e-4
        outs = []
        for t in steps:
            logits, state = model.step(t[None], state)
            outs.append(logits[0])
    assert rel_err(torch.stack(outs), ref["steps"]) < 1e-4

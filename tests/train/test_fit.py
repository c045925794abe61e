"""`musictrain fit` end to end on real shards: it learns, resumes exactly, DDP matches one process, bad input."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from fit_testutil import TINY, assert_same_losses, fit_env, metrics, musictrain, musictrain_here, torchrun_fit
from safetensors.torch import load_file, save_file

from rwkv_music.model import RWKV7, RWKV7Config, load, save_rwkv_lm
from rwkv_music.shards import iter_samples
from rwkv_music.shards.dataset import open_split
from rwkv_music.train.checkpoints import load_for_inference, resolve_checkpoint
from rwkv_music.train.config import TrainConfig
from rwkv_music.train.fit import evaluate

pytestmark = pytest.mark.usefixtures("one_thread")  # every test here on one thread (conftest.py)


@pytest.fixture(scope="module")
def learned_run(small_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("learn") / "run"
    musictrain("fit", small_shards, "-o", run, *TINY, "--batch-size", "16", "--max-steps", "150", "--lr", "5e-3",
               "--warmup-steps", "10", "--eval-every", "50", "--save-every", "50", "--keep-last", "1",
               "--log-every", "10")
    return run


def unigram_entropy(shards: Path) -> float:
    counts = np.zeros(4096)
    for s in iter_samples(shards, "train"):
        np.add.at(counts, s["tokens"], 1)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def test_completion_loss_falls_well_below_unigram_entropy(learned_run: Path, small_shards: Path):
    h = unigram_entropy(small_shards)
    rows = metrics(learned_run)
    assert rows[0]["loss"] > rows[-1]["loss"] + 1.0  # it really learned (step 10 is already near h)
    vals = [r["val_loss"] for r in rows if "val_loss" in r]
    assert [r["step"] for r in rows if "val_loss" in r] == [50, 100, 150]
    assert vals[-1] < h - 1.0, (vals, h)
    assert rows[-1]["loss"] < h - 1.0
    for r in rows:
        assert {"step", "loss", "lr", "tokens_per_s"} <= set(r) and r["tokens_per_s"] > 0


def test_run_directory_layout(learned_run: Path):
    cfg = json.loads((learned_run / "config.json").read_text())
    assert cfg["train"]["max_steps"] == 150 and cfg["model"]["n_layer"] == 2 and cfg["model"]["n_embd"] == 64
    assert (learned_run / "tokenizer.json").is_file()
    assert (learned_run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any(p.name.startswith("events.out.tfevents") for p in (learned_run / "tb").iterdir())
    ckpts = learned_run / "checkpoints"
    latest = json.loads((ckpts / "latest.json").read_text())
    best = json.loads((ckpts / "best.json").read_text())
    assert latest["step"] == 150 and latest["path"] == "step-00000150"
    vals = {r["step"]: r["val_loss"] for r in metrics(learned_run) if "val_loss" in r}
    assert best["val_loss"] == min(vals.values()) and best["step"] == min(vals, key=vals.get)
    # keep-last 1: only the latest and the best survive
    assert {p.name for p in ckpts.iterdir() if p.is_dir()} == {latest["path"], best["path"]}
    for name in ("model.safetensors", "config.json", "tokenizer.json", "optimizer.pt", "trainer_state.json"):
        assert (ckpts / latest["path"] / name).is_file()
    state = json.loads((ckpts / latest["path"] / "trainer_state.json").read_text())
    assert state["step"] == 150 and state["consumed"] == 150 and state["epoch"] == 0 and state["rng"]["torch"]
    assert state["config"] == cfg["train"]


def test_checkpoint_reproduces_saved_val_loss(learned_run: Path, small_shards: Path):
    best = json.loads((learned_run / "checkpoints" / "best.json").read_text())
    ckpt = resolve_checkpoint(learned_run)
    assert ckpt.name == best["path"]
    model = load(ckpt)
    loss, n = evaluate(model, open_split(small_shards, "val"), 16, torch.device("cpu"))
    assert n > 0
    assert loss == pytest.approx(best["val_loss"], rel=1e-6)
    m2, tok, info = load_for_inference(learned_run)
    assert info["checkpoint"] == ckpt and info["val_loss"] == pytest.approx(best["val_loss"])
    assert len(tok) == m2.cfg.vocab_size and not m2.training
    assert resolve_checkpoint(learned_run, which="latest").name == "step-00000150"


def test_kill_and_resume_gives_the_losses_of_an_uninterrupted_run(small_shards: Path, tmp_path: Path):
    args = (*TINY, "--batch-size", "8", "--max-steps", "40", "--lr", "3e-3", "--warmup-steps", "5",
            "--eval-every", "20", "--eval-batches", "2", "--save-every", "10", "--log-every", "1",
            "--shuffle-buffer", "256")
    musictrain("fit", small_shards, "-o", tmp_path / "whole", *args)
    run = tmp_path / "killed"
    cmd = [sys.executable, "-m", "rwkv_music.train.cli", "fit", str(small_shards), "-o", str(run), *args]
    proc = subprocess.Popen(cmd, env=fit_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = run / "checkpoints" / "latest.json"
    deadline = time.time() + 300
    killed_at = None
    while time.time() < deadline and proc.poll() is None:
        try:
            step = json.loads(latest.read_text())["step"]
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            step = 0
        if step >= 20:
            os.kill(proc.pid, signal.SIGKILL)
            killed_at = step
            break
        time.sleep(0.02)
    proc.wait()
    assert killed_at is not None and killed_at < 40, "the run ended before it could be killed"
    assert max(r["step"] for r in metrics(run)) < 40
    musictrain("fit", small_shards, "-o", run, *args, "--resume")
    assert_same_losses(tmp_path / "whole", run, 40)


@pytest.mark.parametrize("extra", [(), ("--repeat-contrast", "1")], ids=["plain", "repeat-contrast"])
def test_two_gloo_processes_match_one_process_with_the_doubled_batch(small_shards: Path, tmp_path: Path, extra):
    """With --repeat-contrast too: its term is normalised by the pairs of the global batch, wherever they fall."""
    common = (*TINY, "--max-steps", "6", "--lr", "3e-3", "--warmup-steps", "2", "--eval-every", "3",
              "--eval-batches", "2", "--save-every", "6", "--log-every", "1", "--shuffle-buffer", "256", *extra)
    ddp = tmp_path / "ddp"
    proc = torchrun_fit(small_shards, ddp, "--batch-size", "4", *common)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((ddp / "config.json").read_text())["world_size"] == 2
    one = tmp_path / "one"
    musictrain("fit", small_shards, "-o", one, "--batch-size", "8", "--streams", "2", *common)
    a, b = metrics(one), metrics(ddp)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 7))
    for x, y in zip(a, b, strict=True):
        assert y["tokens"] == x["tokens"]  # the same samples
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5), x["step"]
        if "val_loss" in x:
            assert y["val_loss"] == pytest.approx(x["val_loss"], rel=1e-5)
        assert ("truth_leads_repeat" in x) == ("truth_leads_repeat" in y)
        for key in ("repeat_contrast", "truth_leads_repeat"):
            if key in x:
                assert y[key] == pytest.approx(x[key], rel=1e-5, abs=1e-7), (key, x["step"])
    if extra:
        assert sum("truth_leads_repeat" in r for r in a) >= 4


def test_config_file_with_cli_override(small_shards: Path, tmp_path: Path):
    cfg = tmp_path / "train.toml"
    cfg.write_text('preset = "tiny"\nn_layer = 1\nn_embd = 64\nbatch_size = 4\nmax_steps = 2\n'
                   '[optim]\nlr = 1e-3\nwarmup_steps = 0\nadam_eps = 1e-8\n')
    run = tmp_path / "run"
    res = musictrain_here("fit", small_shards, "-o", run, "--config", cfg, "--max-steps", "3", "--device", "cpu",
                          "--no-progress", "--log-every", "1", "--eval-batches", "1")
    assert res.exit_code == 0, res.output
    saved = json.loads((run / "config.json").read_text())
    assert saved["train"]["max_steps"] == 3 and saved["train"]["adam_eps"] == 1e-8
    assert saved["model"]["n_layer"] == 1 and saved["train"]["batch_size"] == 4
    assert [r["step"] for r in metrics(run)] == [1, 2, 3]
    assert metrics(run)[0]["lr"] == pytest.approx(1e-3)
    bad = tmp_path / "bad.toml"
    bad.write_text("learning_rate = 1\n")
    res = musictrain_here("fit", small_shards, "-o", tmp_path / "x", "--config", bad)
    assert res.exit_code == 2 and "unknown config key(s): learning_rate" in res.output


def test_init_from_rwkv_lm_pth_resizes_the_vocabulary(small_shards: Path, tmp_path: Path):
    torch.manual_seed(0)
    text_model = RWKV7(RWKV7Config(vocab_size=1000, n_layer=1, n_embd=64))
    pth = save_rwkv_lm(text_model, tmp_path / "x070.pth")
    run = tmp_path / "run"
    res = musictrain_here("fit", small_shards, "-o", run, "--init-from", pth, "--batch-size", "4", "--max-steps", "2",
                          "--device", "cpu", "--no-progress", "--eval-batches", "1")
    assert res.exit_code == 0 and "vocabulary resized 1000 -> " in res.output, res.output
    model = load(resolve_checkpoint(run))
    assert model.cfg.n_layer == 1 and model.cfg.vocab_size == len(load_for_inference(run)[1])
    # the transferred block weights are the text model's, moved by two small warm-up steps only
    r0 = text_model.blocks[0].att.receptance.weight
    assert (model.blocks[0].att.receptance.weight - r0).abs().max() < 1e-3 < 0.1 < r0.abs().max()


def test_bad_input_is_reported_clearly(small_shards: Path, tmp_path: Path):
    res = musictrain_here("fit", tmp_path / "missing", "-o", tmp_path / "r0", *TINY)
    assert res.exit_code == 2 and "does not exist" in res.output and res.exception.__class__ is SystemExit
    (tmp_path / "empty").mkdir()
    res = musictrain_here("fit", tmp_path / "empty", "-o", tmp_path / "r1", *TINY)
    assert res.exit_code == 2 and "manifest.json" in res.output
    res = musictrain_here("fit", small_shards, "-o", tmp_path / "r1", *TINY, "--precision", "fp16")
    assert res.exit_code == 2 and "fp16" in res.output and not (tmp_path / "r1").exists()
    with pytest.raises(ValueError, match="precision must be one of bf16, bf16-weights, fp32"):
        TrainConfig(precision="fp16")
    # precision and recompute left to the device: the lean step on CUDA, fp32 and nothing recomputed on the CPU;
    # whatever was given stays
    for device, want in (("cuda", ("bf16-weights", "elementwise")), ("cpu", ("bf16", "none"))):
        cfg = TrainConfig()
        cfg.for_device(device)
        assert (cfg.precision, cfg.recompute) == want
    cfg = TrainConfig(precision="fp32", recompute="blocks")
    cfg.for_device("cuda")
    assert (cfg.precision, cfg.recompute) == ("fp32", "blocks")
    # DDP and gradient accumulation (bf16 gradients averaged or summed in bf16) were not validated: autocast there
    for cfg, world in ((TrainConfig(), 2), (TrainConfig(grad_accum=2), 1)):
        cfg.for_device("cuda", world)
        assert (cfg.precision, cfg.recompute) == ("bf16", "none")
    assert TrainConfig(grad_checkpoint=True).recompute == "blocks"
    res = musictrain_here("fit", small_shards, "-o", tmp_path / "r1", *TINY, "--memory-budget", "1.5")
    assert res.exit_code == 2 and "--memory-budget" in res.output and not (tmp_path / "r1").exists()
    # values of the right option type but no meaning, and config files of the wrong shape or types
    bad_cfg = {"list.json": "[1, 2]", "types.toml": 'seed = "seven"\n', "float.toml": "max_steps = 2.5\n"}
    for name, text in bad_cfg.items():
        (tmp_path / name).write_text(text)
    for args, says in ((["--lr", "nan"], "finite lr"), (["--head-size", "5"], "not a multiple of head_size=5"),
                       (["--shuffle-buffer", "0"], "shuffle_buffer must be >= 1"), (["--seed", "-1"], "seed must be"),
                       (["--config", tmp_path / "list.json"], "expected a table"),
                       (["--config", tmp_path / "types.toml"], "seed must be int, not 'seven'"),
                       (["--config", tmp_path / "float.toml"], "max_steps must be int or null, not 2.5"),
                       (["-o", tmp_path / "list.json"], "is a file, not a run directory")):
        res = musictrain_here("fit", small_shards, "-o", tmp_path / "r1", *TINY, *args)
        lines = [x for x in res.output.splitlines() if x.startswith("Error:")]
        assert res.exit_code == 2 and len(lines) == 1 and says in lines[0], (args, res.output)
        assert not (tmp_path / "r1").exists()
    for out in (small_shards, small_shards / "run"):  # a run inside the build would write over its tokenizer.json
        res = musictrain_here("fit", small_shards, "-o", out, *TINY)
        assert res.exit_code == 2 and "is (inside) a shard build" in res.output, res.output
    assert not (small_shards / "run").exists()
    (tmp_path / "not-a-run").mkdir()
    (tmp_path / "not-a-run" / "config.json").write_text('{"model": {}}')
    res = musictrain_here("fit", small_shards, "-o", tmp_path / "not-a-run", *TINY, "--resume")
    assert res.exit_code == 2 and "no 'train' table" in res.output, res.output
    # a packed batch smaller than one row: one line in the options' own spelling, no traceback, no run directory
    res = musictrain_here("fit", small_shards, "-o", tmp_path / "r1", *TINY, "--batch-tokens", "64", "--pack-len",
                          "96")
    assert res.exit_code == 2 and "--batch-tokens 64 must hold at least one row of --pack-len 96" in res.output
    assert "Traceback" not in res.output and not (tmp_path / "r1").exists()
    # a finished run is not overwritten without --resume (its first run also shows --memory-budget ignored)
    run = tmp_path / "r2"
    res = musictrain_here("fit", small_shards, "-o", run, *TINY, "--batch-size", "4", "--max-steps", "1",
                          "--eval-batches", "1", "--memory-budget", "0.5")
    assert res.exit_code == 0, res.output
    assert "ignored without --compile" in res.output  # the CPU trains eagerly by default
    res = musictrain_here("fit", small_shards, "-o", run, *TINY, "--max-steps", "2")
    assert res.exit_code == 2 and "--resume" in res.output  # a usage error (docs/training.md: exit codes)
    # --resume must not change what decides the data order
    res = musictrain_here("fit", small_shards, "-o", run, *TINY, "--max-steps", "2", "--batch-size", "8", "--resume")
    assert res.exit_code == 2 and "batch_size=4" in res.output
    # a shape option on a resumed run cannot apply: said, not silently dropped
    res = musictrain_here("fit", small_shards, "-o", run, *TINY, "--batch-size", "4", "--max-steps", "1", "--resume",
                          "--n-layer", "3")
    [note] = [x for x in res.output.splitlines() if x.startswith("note:")]
    assert res.exit_code == 0 and "--n-layer" in note and "ignored: the model's shape comes from the run" in note
    # a run whose latest.json cannot be read is refused, never started over (its metrics would mix two runs)
    import shutil

    broken = tmp_path / "broken-pointer"
    shutil.copytree(run, broken)
    (broken / "checkpoints" / "latest.json").write_text("{oops")
    before = (broken / "metrics.jsonl").read_text()
    res = musictrain_here("fit", small_shards, "-o", broken, *TINY, "--batch-size", "4", "--max-steps", "2",
                          "--resume")
    assert res.exit_code == 2 and "does not name a readable checkpoint" in res.output, res.output
    assert (broken / "metrics.jsonl").read_text() == before
    # checkpoints whose latest.json was deleted: neither a new run (its pruning would drop them or its own) nor a
    # silent fresh start under --resume
    orphaned = tmp_path / "orphaned"
    shutil.copytree(run, orphaned)
    (orphaned / "checkpoints" / "latest.json").unlink()
    steps = sorted(p.name for p in (orphaned / "checkpoints").glob("step-*"))
    for extra in ([], ["--resume"]):
        res = musictrain_here("fit", small_shards, "-o", orphaned, *TINY, "--batch-size", "4", "--max-steps", "2",
                              *extra)
        assert res.exit_code == 2 and steps[-1] in res.output and "latest.json" in res.output, res.output
    assert sorted(p.name for p in (orphaned / "checkpoints").glob("step-*")) == steps
    # latest.json left with no checkpoint at all: nothing to resume, and the message says how to start over
    for step in steps:
        shutil.rmtree(orphaned / "checkpoints" / step)
    (orphaned / "checkpoints" / "latest.json").write_text('{"path": "step-00000002"}')
    res = musictrain_here("fit", small_shards, "-o", orphaned, *TINY, "--batch-size", "4", "--max-steps", "2",
                          "--resume")
    assert res.exit_code == 2 and "nothing is left to resume" in res.output, res.output
    # NaN weights -> NaN loss at the first step: stop, name the step, write no checkpoint
    ckpt = resolve_checkpoint(run)
    poisoned = tmp_path / "poisoned"
    poisoned.mkdir()
    tensors = load_file(ckpt / "model.safetensors")
    tensors["head.weight"] = torch.full_like(tensors["head.weight"], math.nan)
    save_file(tensors, poisoned / "model.safetensors")
    (poisoned / "config.json").write_bytes((ckpt / "config.json").read_bytes())
    nan_run = tmp_path / "r3"
    res = musictrain_here("fit", small_shards, "-o", nan_run, "--init-from", poisoned, "--batch-size", "4",
                          "--max-steps", "3", "--device", "cpu", "--no-progress")
    assert res.exit_code == 1 and "loss is nan" in res.output and "at step 1" in res.output
    assert not (nan_run / "checkpoints").exists()
    # a checkpoint due before the next logged step is what finds it (the check before every save)
    res = musictrain_here("fit", small_shards, "-o", tmp_path / "r4", "--init-from", poisoned, "--batch-size", "4",
                          "--max-steps", "3", "--device", "cpu", "--no-progress", "--save-every", "1",
                          "--log-every", "100")
    assert res.exit_code == 1 and "loss is nan" in res.output and "at step 1" in res.output
    assert not (tmp_path / "r4" / "checkpoints").exists()


def test_grad_accum_workers_and_webdataset(small_shards: Path, tmp_path: Path):
    common = (*TINY, "--batch-size", "4", "--log-every", "1", "--eval-batches", "1", "--warmup-steps", "0")
    runs = {
        "accum": ("--grad-accum", "2", "--max-steps", "3"),
        "plain": ("--max-steps", "6"),
        "wds": ("--grad-accum", "2", "--max-steps", "3", "--num-workers", "2", "--format", "webdataset"),
        "pq": ("--grad-accum", "2", "--max-steps", "3", "--num-workers", "2"),
    }
    for name, extra in runs.items():
        res = musictrain_here("fit", small_shards, "-o", tmp_path / name, *common, *extra)
        assert res.exit_code == 0, res.output
    accum, plain = metrics(tmp_path / "accum"), metrics(tmp_path / "plain")
    # a step of 2 micro-batches consumes exactly the next two batches of the stream
    assert [r["tokens"] for r in accum] == [r["tokens"] for r in plain][1::2]
    # DataLoader workers read WebDataset and Parquet shards into the same batches
    wds, pq = metrics(tmp_path / "wds"), metrics(tmp_path / "pq")
    assert [r["tokens"] for r in wds] == [r["tokens"] for r in pq]
    assert [r["loss"] for r in wds] == pytest.approx([r["loss"] for r in pq], rel=1e-6)
    assert [r["tokens"] for r in pq] != [r["tokens"] for r in accum]  # 2 workers = 2 data slots


def test_max_tokens_stops_once_the_budget_is_seen(small_shards: Path, tmp_path: Path):
    run = tmp_path / "run"
    res = musictrain_here("fit", small_shards, "-o", run, *TINY, "--batch-size", "4", "--max-tokens", "2000",
                          "--log-every", "1", "--eval-batches", "1")
    assert res.exit_code == 0, res.output
    rows = metrics(run)
    assert rows[-1]["tokens"] >= 2000 > rows[-2]["tokens"]
    planned = json.loads((run / "config.json").read_text())["total_steps"]
    assert abs(planned - rows[-1]["step"]) <= max(2, planned // 3)  # the schedule was planned from the manifest


def test_recompute_options_reach_the_run(small_shards: Path, tmp_path: Path):
    """--recompute picks what backward recomputes; the older --grad-checkpoint means blocks, also on --resume."""
    def train(run: Path, *opts: str) -> str:
        res = musictrain_here("fit", small_shards, "-o", run, *TINY, "--batch-size", "4", "--eval-batches", "1",
                              *opts)
        assert res.exit_code == 0, res.output
        return json.loads((run / "config.json").read_text())["train"]["recompute"]

    assert train(tmp_path / "a", "--max-steps", "1", "--recompute", "elementwise") == "elementwise"
    # left to the device: on the CPU nothing recomputed and "bf16" (which runs fp32 there), written as such
    assert train(tmp_path / "auto", "--max-steps", "1") == "none"
    assert json.loads((tmp_path / "auto" / "config.json").read_text())["train"]["precision"] == "bf16"  # fp32 on CPU
    assert train(tmp_path / "b", "--max-steps", "1", "--grad-checkpoint") == "blocks"
    assert train(tmp_path / "b", "--max-steps", "2", "--resume", "--no-grad-checkpoint") == "none"
    assert train(tmp_path / "b", "--max-steps", "3", "--resume", "--recompute", "blocks") == "blocks"
    assert train(tmp_path / "b", "--max-steps", "4", "--resume", "--recompute", "none") == "none"
    # an explicit --recompute wins over the older flag given with it
    assert train(tmp_path / "d", "--max-steps", "1", "--grad-checkpoint", "--recompute", "elementwise") == "elementwise"
    (tmp_path / "old.toml").write_text("grad_checkpoint = true\n")  # a config file of the older spelling
    assert train(tmp_path / "e", "--max-steps", "1", "--config", str(tmp_path / "old.toml")) == "blocks"
    res = musictrain_here("fit", small_shards, "-o", tmp_path / "c", *TINY, "--recompute", "some")
    assert res.exit_code == 2 and "--recompute" in res.output and not (tmp_path / "c").exists()


def test_transpose_trains_is_kept_on_resume_and_old_runs_resume(small_shards: Path, tmp_path: Path):
    """--transpose (key augmentation) is part of the data order: saved, kept on --resume, off for older runs."""
    args = (*TINY, "--batch-size", "4", "--eval-batches", "1", "--log-every", "1")
    run = tmp_path / "run"
    res = musictrain_here("fit", small_shards, "-o", run, *args, "--max-steps", "2", "--transpose", "5")
    assert res.exit_code == 0, res.output
    assert json.loads((run / "config.json").read_text())["train"]["transpose"] == 5
    assert all(math.isfinite(r["loss"]) for r in metrics(run))
    res = musictrain_here("fit", small_shards, "-o", run, *args, "--max-steps", "3", "--resume", "--transpose", "0")
    assert res.exit_code == 2 and "transpose=5" in res.output, res.output
    assert musictrain_here("fit", small_shards, "-o", run, *args, "--max-steps", "3", "--resume").exit_code == 0
    # a run saved before the option existed trained without it, and resumes
    old = tmp_path / "old"
    assert musictrain_here("fit", small_shards, "-o", old, *args, "--max-steps", "1").exit_code == 0
    cfg = json.loads((old / "config.json").read_text())
    del cfg["train"]["transpose"]
    (old / "config.json").write_text(json.dumps(cfg))
    res = musictrain_here("fit", small_shards, "-o", old, *args, "--max-steps", "2", "--resume")
    assert res.exit_code == 0, res.output
    res = musictrain_here("fit", small_shards, "-o", tmp_path / "bad", *args, "--transpose", "30")
    assert res.exit_code == 2 and "transpose" in res.output


def test_a_run_saved_before_mix_shards_resumes_reading_shards_in_turn(small_shards: Path, tmp_path: Path):
    """--mix-shards is part of the data order: a run saved before it existed read shard after shard, and resumes
    so (mix_shards 1), not with today's default; asking it for another value is refused."""
    args = (*TINY, "--batch-size", "4", "--eval-batches", "1", "--log-every", "1")
    run = tmp_path / "old"
    assert musictrain_here("fit", small_shards, "-o", run, *args, "--max-steps", "1").exit_code == 0
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["train"]["mix_shards"] == 16
    del cfg["train"]["mix_shards"]
    (run / "config.json").write_text(json.dumps(cfg))
    res = musictrain_here("fit", small_shards, "-o", run, *args, "--max-steps", "2", "--resume", "--mix-shards", "4")
    assert res.exit_code == 2 and "mix_shards=1" in res.output, res.output
    res = musictrain_here("fit", small_shards, "-o", run, *args, "--max-steps", "2", "--resume")
    assert res.exit_code == 0, res.output
    assert json.loads((run / "config.json").read_text())["train"]["mix_shards"] == 1
    res = musictrain_here("fit", small_shards, "-o", tmp_path / "bad", *args, "--mix-shards", "0")
    assert res.exit_code == 2 and "mix_shards must be >= 1" in res.output, res.output

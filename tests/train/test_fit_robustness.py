"""`musictrain fit` out of memory and under --compile, on real shards in real subprocesses.

Out of memory: a resumed run under an address-space limit (RLIMIT_AS) that its batch cannot fit in must stop
with one line naming the step, the batch shape and what to lower, and leave the last checkpoint as it was.
--compile: torch.compile (Inductor, CPU) trains to the losses of an eager run and saves plain state-dict keys.
"""

from __future__ import annotations

import hashlib
import json
import re
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fit_testutil import TINY, fit_env, metrics, musictrain, musictrain_here
from safetensors import safe_open

from rwkv_music.model import RWKV7, RWKV7Config, load
from rwkv_music.shards.dataset import open_split
from rwkv_music.train.checkpoints import latest_checkpoint, read_trainer_state, resolve_checkpoint
from rwkv_music.train.fit import TrainingError, evaluate, oom_guard, out_of_memory_kind

pytestmark = pytest.mark.usefixtures("one_thread")  # every test here on one thread (conftest.py)


# ---------------------------------------------------------------------------------------------- out of memory

# `musictrain` with the process's peak address-space size (VmPeak) written to stderr at exit.
_WITH_VMPEAK = """
import atexit, runpy, sys
def _peak():
    for line in open("/proc/self/status"):
        if line.startswith("VmPeak:"):
            print("VMPEAK_KB", line.split()[1], file=sys.stderr)
atexit.register(_peak)
sys.argv[0] = "musictrain"
runpy.run_module("rwkv_music.train.cli", run_name="__main__")
"""

# No length bucketing: every batch of 256 is padded to nearly the longest window (95 tokens), so each step
# needs about the same memory and the limit below sits well away from both sides.
OOM_ARGS = (*TINY, "--bucket-pool", "1", "--shuffle-buffer", "256", "--eval-batches", "1", "--no-tensorboard")


def vmpeak_of_fit(*args: str | Path) -> int:
    """Bytes of address space a successful `musictrain fit ...` reached at its peak."""
    proc = subprocess.run([sys.executable, "-c", _WITH_VMPEAK, "fit", *map(str, args)], capture_output=True,
                          text=True, timeout=600, env=fit_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    return int(re.search(r"VMPEAK_KB (\d+)", proc.stderr).group(1)) * 1024


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs Linux /proc for VmPeak")
def test_cpu_out_of_memory_stops_with_one_line_and_keeps_the_last_checkpoint(small_shards: Path, tmp_path: Path):
    # Measure instead of guessing: the address space of a whole run at batch 4 (imports, data, model, eval)
    # and at batch 256. A limit halfway between lets everything but the big batch's step fit.
    small = vmpeak_of_fit(small_shards, "-o", tmp_path / "small", *OOM_ARGS, "--batch-size", "4", "--max-steps", "1")
    run = tmp_path / "run"
    big = vmpeak_of_fit(small_shards, "-o", run, *OOM_ARGS, "--batch-size", "256", "--max-steps", "2",
                        "--save-every", "1")
    assert big - small > 512 * 2**20, f"batch 256 should cost far more address space ({small=} {big=})"
    limit = (small + big) // 2

    ckpts = run / "checkpoints"
    before = tree_digest(ckpts)
    good = latest_checkpoint(run)
    assert good is not None and good.name == "step-00000002"

    cmd = [sys.executable, "-m", "rwkv_music.train.cli", "fit", str(small_shards), "-o", str(run), *OOM_ARGS,
           "--batch-size", "256", "--max-steps", "4", "--resume"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=fit_env(),
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit)))
    assert proc.returncode == 1, (limit, proc.stdout, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr and "DefaultCPUAllocator" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, proc.stderr
    msg = errors[0]
    assert re.match(r"Error: CPU out of memory at step 3 \(batch 256 x \d+ tokens\): ", msg), msg
    for option in ("--batch-size", "--grad-accum", "--recompute", "--preset", "--max-seq-len"):
        assert option in msg, (option, msg)
    assert msg.endswith(f"the last good checkpoint is {good}"), msg

    # nothing was written to the checkpoints, and what latest.json names still loads and resumes from step 2
    assert tree_digest(ckpts) == before
    assert latest_checkpoint(run) == good and read_trainer_state(good).step == 2
    assert load(good).cfg.n_layer == 2
    assert max(r["step"] for r in metrics(run)) == 2


def test_allocation_failures_are_recognised_and_others_pass_through():
    with pytest.raises(RuntimeError) as cpu:
        torch.empty(2**50, dtype=torch.uint8)  # 1 PiB: a real failure of the CPU allocator
    assert out_of_memory_kind(cpu.value) == "CPU"
    def says(kind: str) -> str:
        return f"{kind} out of memory here"

    with pytest.raises(TrainingError, match=r"^CPU out of memory here$"), oom_guard(says):
        torch.empty(2**50, dtype=torch.uint8)
    with pytest.raises(TrainingError, match=r"^CPU out of memory here$"), oom_guard(says):
        bytearray(2**50)  # Python's MemoryError
    # CUDA raises its own class (no device here: built as PyTorch builds it, with its message)
    assert out_of_memory_kind(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")) == "CUDA"
    # anything else is not an out-of-memory and leaves the guard unchanged
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"), oom_guard(lambda k: "no"):
        torch.ones(2, 3) @ torch.ones(2, 3)
    assert out_of_memory_kind(TrainingError("CPU out of memory at step 1")) is None


def test_non_finite_watch_keeps_the_first_bad_step():
    """The watch fit keeps on the device (no sync per step): the first step with a NaN/inf loss or grad norm."""
    from rwkv_music.train.fit import NonFiniteWatch

    w = NonFiniteWatch(torch.device("cpu"))
    w.add(1, torch.tensor(2.5, dtype=torch.float64), torch.tensor(0.7))
    assert w.bad_step() is None
    w.add(2, torch.tensor(3.0, dtype=torch.float64), torch.tensor(float("inf")))  # finite loss, inf grad norm
    w.add(3, torch.tensor(float("nan"), dtype=torch.float64), torch.tensor(1.0))
    assert w.bad_step() == (2, 3.0, float("inf"))  # later bad steps do not overwrite the first


# ---------------------------------------------------------------------------------------------- damaged shards

def _damage_data_pages(path: Path) -> None:
    """Overwrite a Parquet file's column data, keeping its footer: it opens, but its pages no longer decode."""
    b = bytearray(path.read_bytes())
    footer = int.from_bytes(b[-8:-4], "little")
    b[8 : len(b) - footer - 8] = b"\x55" * (len(b) - footer - 16)
    path.write_bytes(bytes(b))


@pytest.mark.parametrize("damage", ["cut-short", "pages-in-a-worker", "pages-in-process"])
def test_a_damaged_shard_stops_fit_with_one_line_naming_it(damage: str, small_shards: Path, tmp_path: Path):
    """Cut short: the footer check before training finds it. Damaged pages: found when read, also inside a
    DataLoader worker process, whose error the loader would wrap in the worker's whole traceback."""
    import shutil

    shards = tmp_path / "shards"
    shutil.copytree(small_shards, shards)
    train = sorted((shards / "train").glob("*.parquet"))
    for p in train:  # every one, so that the first batch meets one
        if damage == "cut-short":
            p.write_bytes(p.read_bytes()[:1000])
        else:
            _damage_data_pages(p)
    workers = "1" if damage == "pages-in-a-worker" else "0"
    res = musictrain_here("fit", shards, "-o", tmp_path / "run", *TINY, "--batch-size", "4", "--max-steps", "2",
                          "--eval-batches", "1", "--num-workers", workers)
    assert res.exit_code == 2, res.output
    errors = [x for x in res.output.splitlines() if x.startswith("Error:")]
    assert len(errors) == 1 and "Traceback" not in res.output and "Caught" not in res.output, res.output
    assert any(f"Error: cannot read shard {p}: " in errors[0] for p in train), errors
    assert "the file is damaged" in errors[0] and "inspect --verify" in errors[0]


# ---------------------------------------------------------------------------------------------- --compile

def test_compile_trains_like_eager_and_saves_plain_keys(small_shards: Path, tmp_path: Path):
    # Bucketed batches of varying length: the compiled model meets several shapes (static, then dynamic graphs).
    args = (*TINY, "--batch-size", "8", "--max-steps", "5", "--lr", "3e-3", "--warmup-steps", "0",
            "--log-every", "1", "--eval-every", "5", "--eval-batches", "2", "--no-tensorboard")
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    musictrain("fit", small_shards, "-o", eager, *args)
    # with an activation memory budget: the partitioner recomputes element-wise work, the math stays the same
    musictrain("fit", small_shards, "-o", compiled, *args, "--compile", "--memory-budget", "0.5")
    assert json.loads((compiled / "config.json").read_text())["train"]["memory_budget"] == 0.5
    a, b = metrics(eager), metrics(compiled)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4, 5]
    for x, y in zip(a, b, strict=True):
        assert y["tokens"] == x["tokens"]
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5), x["step"]  # compile only changes fp32 rounding
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-4), x["step"]
    assert b[-1]["val_loss"] == pytest.approx(a[-1]["val_loss"], rel=1e-5)

    # the checkpoint holds the model's own keys (no torch.compile wrapper prefix) and loads as usual
    ckpt, ref = resolve_checkpoint(compiled), resolve_checkpoint(eager)
    with safe_open(ckpt / "model.safetensors", "pt") as f, safe_open(ref / "model.safetensors", "pt") as g:
        keys = set(f.keys())
        assert keys == set(g.keys())
    assert not any(k.startswith("_orig_mod.") for k in keys)
    model = load(ckpt)
    loss, _ = evaluate(model, open_split(small_shards, "val"), 8, torch.device("cpu"), max_batches=2)
    assert loss == pytest.approx(json.loads((compiled / "checkpoints" / "latest.json").read_text())["val_loss"],
                                 rel=1e-6)


def test_compiled_model_stops_recompiling_once_the_length_is_dynamic():
    """New sequence lengths (other chunk counts, T a multiple of the WKV chunk or not) add no graphs."""
    graphs: list[torch.fx.GraphModule] = []

    def counting_backend(gm: torch.fx.GraphModule, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch.manual_seed(0)
    model = RWKV7(RWKV7Config(vocab_size=50, n_layer=2, n_embd=64))
    torch.compiler.reset()
    compiled = torch.compile(model, backend=counting_backend)
    try:
        def step(T: int) -> None:
            idx = torch.randint(0, 50, (2, T))
            mask = torch.rand(2, T) < 0.3
            mask[:, -1] = True
            compiled(idx, positions=mask).sum().backward()

        step(40)
        step(41)  # the second length makes dynamo mark T dynamic
        settled = len(graphs)
        for T in (64, 70, 32, 97, 130, 300):
            step(T)
        assert len(graphs) == settled
    finally:
        torch.compiler.reset()


# ---------------------------------------------------------------------------------------------- checkpoint writes


def test_failed_checkpoint_write_leaves_the_last_good_one(tmp_path: Path):
    """A checkpoint whose write fails half-way leaves no partial directory, and latest.json keeps pointing at
    the previous, loadable checkpoint."""
    from rwkv_music.model import from_preset
    from rwkv_music.train.checkpoints import TrainerState, save_checkpoint
    from rwkv_music.train.config import TrainConfig
    from rwkv_music.train.optim import make_optimizer, make_scheduler

    model = RWKV7(from_preset("tiny", 64))
    cfg = TrainConfig(lr=1e-3, warmup_steps=1)
    opt = make_optimizer(model, cfg)
    sched = make_scheduler(opt, cfg, total_steps=10)
    tok = tmp_path / "tokenizer.json"
    tok.write_text("{}")
    run = tmp_path / "run"
    state = TrainerState(step=1, epoch=0, consumed=1, tokens_seen=10, val_loss=None, best_val_loss=None,
                         tokenizer_hash="0" * 64)
    good = save_checkpoint(run, model, opt, sched, state, tok, keep_last=3)
    before = {p.name: p.read_bytes() for p in good.iterdir()}

    state.step = 2  # the tokenizer file is gone by the time of the next save: the write fails after the weights
    with pytest.raises(FileNotFoundError):
        save_checkpoint(run, model, opt, sched, state, tmp_path / "missing.json", keep_last=3)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest.json", good.name]
    assert latest_checkpoint(run) == good
    assert {p.name: p.read_bytes() for p in good.iterdir()} == before
    assert torch.equal(load(good).emb.weight, model.emb.weight)

"""Helpers of the trainer tests (imported by test_fit*.py; pytest puts this directory on sys.path)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

# 2 context bars + 1 completion bar, at most 96 tokens: ~4k train / ~400 val windows from the test corpus.
SMALL_BUILD_ARGS = ("--format", "both", "--max-seq-len", "96", "--context-bars", "2", "--completion-bars", "1",
                    "--samples-per-shard", "256", "--workers", "2", "--val-fraction", "0.2", "--seed", "0")

# A 2-layer, 64-wide model: the smallest that still has the full x070 block.
TINY = ("--preset", "tiny", "--n-layer", "2", "--n-embd", "64", "--device", "cpu", "--no-progress")


def fit_env(tmp: Path | None = None) -> dict[str, str]:
    """One thread per process: on a busy 2-core machine more threads only fight each other. With `tmp`, the
    subprocess's temporary files go there (torchrun's agent leaves a torchelastic_* folder behind otherwise)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    if tmp is not None:
        env["TMPDIR"] = str(tmp)
    return env


def musictrain(*args: str | os.PathLike, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    """`musictrain ...` as a real subprocess."""
    cmd = [sys.executable, "-m", "rwkv_music.train.cli", *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=fit_env())
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def children(pid: int) -> list[int]:
    """The direct child processes of `pid` (Linux /proc)."""
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(c) for c in path.read_text().split()] if path.exists() else []


def torchrun_fit(shards: Path, run: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`torchrun --nproc-per-node 2 ... fit` on CPU; a run that does not end in `timeout` fails the test with
    every process's Python stacks (faulthandler on SIGABRT), so a hang in CI names where it hung."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "rwkv_music.train.cli", "fit", str(shards), "-o", str(run), *args]
    env = {**fit_env(run.parent), "PYTHONFAULTHANDLER": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        workers = children(proc.pid)
        for pid in [*workers, proc.pid]:  # workers first: the agent would kill them on its abort
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGABRT)
            time.sleep(1)
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:  # something still holds the pipes open: kill it, keep what was written
            for pid in [*workers, *(c for w in workers for c in children(w)), proc.pid]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            out, err = proc.communicate()
        raise AssertionError(f"{' '.join(cmd)} did not end in {timeout:.0f} s; the stacks of its processes:\n"
                             f"{err[-12000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def musictrain_here(*args: str | os.PathLike):
    """`musictrain ...` in this process (click's runner): no interpreter start-up, for quick error-path tests.

    Returns click's Result (exit_code, output with stdout and stderr)."""
    import torch
    from click.testing import CliRunner

    from rwkv_music.train.cli import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return CliRunner().invoke(main, [str(a) for a in args])
    finally:
        torch.set_num_threads(threads)


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines() if line.strip()]


def assert_same_losses(whole: Path, resumed: Path, steps: int) -> None:
    """An interrupted-and-resumed run logged exactly the records of an uninterrupted one (CPU: bitwise)."""
    import pytest

    a, b = metrics(whole), metrics(resumed)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, steps + 1))
    for x, y in zip(a, b, strict=True):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-9, abs=1e-12), x["step"]
        assert ("val_loss" in x) == ("val_loss" in y)
        if "val_loss" in x:
            assert y["val_loss"] == pytest.approx(x["val_loss"], rel=1e-9)
        assert y["tokens"] == x["tokens"]

"""Training logs in the run directory: metrics.jsonl, TensorBoard events (RUN/tb/), loss.png.

Only rank 0 creates a `RunLogger`. On resume, metrics.jsonl is cut back to the checkpoint's step so the
file describes one continuous run. A new run in a directory whose earlier run ended before its first
checkpoint (a crash, a kill) moves that run's logs into RUN/earlier-run-N/ first (`set_aside_earlier_logs`):
appending to them would mix two runs in one file, and deleting them would lose the only record of the failure.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from rwkv_music.atomic import atomic_path, write_bytes_atomic

METRICS = "metrics.jsonl"
PLOT = "loss.png"


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    p = Path(run_dir) / METRICS
    if not p.is_file():
        return []
    out = []
    for line in p.read_text().splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a kill mid-write
                continue
    return out


def truncate_metrics(run_dir: str | os.PathLike, step: int) -> None:
    """Keep only records with step <= `step` (atomically)."""
    rows = [r for r in read_metrics(run_dir) if r.get("step", 0) <= step]
    write_bytes_atomic(Path(run_dir) / METRICS, "".join(json.dumps(r) + "\n" for r in rows).encode())


# What a run writes besides checkpoints and tokenizer.json; metrics last, so that a move cut short is found again.
EARLIER_LOGS = (PLOT, "tb", "config.json", METRICS)


def set_aside_earlier_logs(run_dir: str | os.PathLike) -> Path | None:
    """Before a new run in `run_dir`: move an earlier run's logs to RUN/earlier-run-N (N: the first one free) and
    return that directory; None when there was nothing to keep (no metrics.jsonl, or an empty one).

    The caller has checked that `run_dir` holds no checkpoint, so these logs belong to no run that can go on."""
    run_dir = Path(run_dir)
    metrics = run_dir / METRICS
    if not metrics.is_file() or metrics.stat().st_size == 0:
        return None
    n = 1
    while True:  # the first free name; mkdir, not exists(), decides (a dangling link is not free)
        dest = run_dir / f"earlier-run-{n}"
        try:
            dest.mkdir()
            break
        except FileExistsError:
            n += 1
    for name in EARLIER_LOGS:  # renames within one directory: each is atomic, and nothing is copied or lost
        if (run_dir / name).exists():
            os.replace(run_dir / name, dest / name)
    return dest


class RunLogger:
    def __init__(self, run_dir: str | os.PathLike, tensorboard: bool = True):
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        # line-buffered: a kill loses at most one line; closed in close()
        self._f = open(self.dir / METRICS, "a", buffering=1)  # noqa: SIM115
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(self.dir / "tb"))
            except ImportError as e:  # tensorboard missing: keep training, say so once
                print(f"[musictrain] TensorBoard disabled: {e}")

    def log(self, record: dict[str, Any]) -> None:
        self._f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            step = record["step"]
            for k, v in record.items():
                if k != "step" and isinstance(v, int | float) and math.isfinite(v):
                    self._tb.add_scalar(k.replace("val_", "val/") if k.startswith("val_") else f"train/{k}",
                                        v, step)

    def plot(self) -> None:
        write_loss_plot(self.dir)

    def close(self) -> None:
        self._f.close()
        if self._tb is not None:
            self._tb.close()


def write_loss_plot(run_dir: str | os.PathLike) -> Path | None:
    """RUN/loss.png: train loss per logged step and val loss per evaluation (atomic)."""
    rows = read_metrics(run_dir)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
    if not train and not val:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train, strict=True), label="train (completion tokens)", lw=1)
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="val (completion tokens)", lw=1.5, ms=3)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(run_dir) / PLOT
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return out

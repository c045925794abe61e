"""bench/loss_curve.py's verdict on finished runs (`--metrics NAME=FILE` for every run, so nothing trains): the
fast run follows the reference within --tol, or, with a noise-floor run, within how far fp32 rounding alone
carried a run from the reference."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def write_run(path: Path, scale: float, val_scale: float | None = None) -> Path:
    """A metrics.jsonl as fit writes it: train loss every 10 steps, val loss every 100, all `scale` times a base."""
    rows = []
    for step in range(10, 301, 10):
        r = {"step": step, "loss": round(scale * (2.0 - step / 200), 6)}
        if step % 100 == 0:
            r["val_loss"] = round((val_scale or scale) * (2.1 - step / 200), 6)
        rows.append(json.dumps(r))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(rows) + "\n")
    return path


def verdict(script: str, tmp_path: Path, runs: dict[str, float]) -> tuple[int, dict]:
    args = [f"--metrics={name}={write_run(tmp_path / name / 'metrics.jsonl', s)}" for name, s in runs.items()]
    proc = subprocess.run([sys.executable, script, str(tmp_path), str(tmp_path / "work"), *args],
                          capture_output=True, text=True, timeout=60)
    return proc.returncode, json.loads(proc.stdout.strip().splitlines()[-1])


def test_tolerance_and_noise_floor(tmp_path: Path, bench_module) -> None:
    script = bench_module("loss_curve").__file__
    rc, r = verdict(script, tmp_path / "a", {"reference": 1.0, "fast": 1.02})
    assert rc == 0 and r["follows"] and abs(r["worst_rel"] - 0.02) < 1e-3
    rc, r = verdict(script, tmp_path / "b", {"reference": 1.0, "fast": 1.04})
    assert rc == 1 and not r["follows"] and "bound" not in r
    # fp32 through other code drifts 5% from the reference: a fast run 4% off is within that floor
    rc, r = verdict(script, tmp_path / "c", {"reference": 1.0, "fast": 1.04, "fp32-kernel": 0.95, "lean": 1.06})
    assert rc == 0 and r["follows_within_floor"] and not r["follows"] and abs(r["bound"] - 0.05) < 1e-3
    assert abs(r["lean_worst_rel"] - 0.06) < 1e-3 and not r["lean_follows"]
    # a floor under --tol does not tighten it
    rc, r = verdict(script, tmp_path / "d", {"reference": 1.0, "fast": 1.025, "fp32-kernel": 1.001, "lean": 0.98})
    assert rc == 0 and r["bound"] == 0.03 and r["lean_follows"]

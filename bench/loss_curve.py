"""Does the fast path train like the readable one? Two `musictrain fit` runs on the same shards, same seed and
data order: the reference (PyTorch WKV, fp32 throughout, eager) and the fast path (fit's defaults on CUDA: CUDA WKV
kernel, torch.compile, and since 2026-12-07 the lean step, so `--lean` now trains the same options twice). Prints
both loss curves side by side and one JSON line.

    python bench/loss_curve.py SHARDS WORK [--steps 300] [--preset small] [--batch-tokens 16384]
    python bench/loss_curve.py SHARDS WORK --metrics reference=REF/metrics.jsonl   # reuse a finished run
    python bench/loss_curve.py SHARDS WORK --noise-floor --parallel   # + the fp32 math through the CUDA kernel
    python bench/loss_curve.py SHARDS WORK --lean --parallel   # + bf16 weights and recomputed element-wise work

bf16 rounding makes the two runs drift apart step by step (their batches are the same, their weights soon
are not), so single steps are compared only as a mean over a window of logged steps: the curves "follow"
each other when every window's mean train loss and every val loss agree within --tol (relative).
With --noise-floor a run also "follows" when it is no further from the reference than the fp32 math through
other code is (the worst relative difference of the fp32-kernel run, if that is above --tol): two fp32 runs
already drift apart that far, so a tolerance under it would fail the reference against itself.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

RUNS = {
    "reference": ({"RWKV_MUSIC_WKV": "torch"}, ["--precision", "fp32", "--no-compile"]),
    "fast": ({}, []),
    # with --noise-floor: the same fp32 math through other code (the CUDA kernel, compiled), so it differs from the
    # reference only by fp32 rounding; how far training carries that apart is the floor any comparison stands on
    "fp32-kernel": ({"RWKV_MUSIC_WKV": "cuda"}, ["--precision", "fp32", "--compile"]),
    # with --lean: the fast path's low-memory form (bf16 weights with fp32 masters, element-wise work recomputed),
    # which has to train like the reference before it can be fit's default
    "lean": ({}, ["--precision", "bf16-weights", "--recompute", "elementwise"]),
}


def compare(ref: tuple[dict, dict], other: tuple[dict, dict], window: int) -> tuple[list[dict], list[dict], float]:
    """Window means of train loss and val losses of `other` against `ref`: (windows, vals, worst relative)."""
    (rt, rv), (ot, ov) = ref, other
    steps = sorted(set(rt) & set(ot))
    windows = []
    for i in range(0, len(steps) - window + 1, window):
        w = steps[i: i + window]
        r = sum(rt[s] for s in w) / len(w)
        o = sum(ot[s] for s in w) / len(w)
        windows.append({"steps": f"{w[0]}-{w[-1]}", "reference": round(r, 4), "other": round(o, 4),
                        "rel": round(abs(o - r) / r, 4)})
    vals = [{"step": s, "reference": round(rv[s], 4), "other": round(ov[s], 4),
             "rel": round(abs(ov[s] - rv[s]) / rv[s], 4)} for s in sorted(set(rv) & set(ov))]
    worst = max([w["rel"] for w in windows] + [v["rel"] for v in vals] + [0.0])
    return windows, vals, worst


def read(path: Path) -> tuple[dict[int, float], dict[int, float]]:
    train, val = {}, {}
    for line in path.read_text().splitlines():
        r = json.loads(line)
        if "loss" in r and "step" in r:
            train[r["step"]] = r["loss"]
        if "val_loss" in r:
            val[r["step"]] = r["val_loss"]
    return train, val


def finish(run: tuple, name: str, args: argparse.Namespace, curves: dict, seconds: dict) -> None:
    """Wait for one fit run (killed past --timeout), then read its curve."""
    proc, t0, out = run
    try:
        rc = proc.wait(timeout=max(1.0, args.timeout - (time.time() - t0)))
    except subprocess.TimeoutExpired:
        proc.kill()
        rc = "killed at --timeout"
    seconds[name] = round(time.time() - t0, 1)
    if rc != 0:
        sys.exit(f"[loss-curve] {name} failed ({rc}); see its output" + (f" in {args.work / name}.log" if args.parallel
                                                                        else ""))
    curves[name] = read(out / "metrics.jsonl")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("shards", type=Path)
    ap.add_argument("work", type=Path)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch-tokens", type=int, default=16384)
    ap.add_argument("--window", type=int, default=5, help="Logged steps per compared mean.")
    ap.add_argument("--tol", type=float, default=0.03, help="Relative tolerance of window means and val losses.")
    ap.add_argument("--timeout", type=int, default=400, help="Seconds per run.")
    ap.add_argument("--seed", type=int, default=0, help="Seed of both runs (init and data order).")
    ap.add_argument("--parallel", action="store_true",
                    help="Run the two fits at once on the same device (their output goes to WORK/NAME.log). Their "
                         "numbers do not depend on it; their speed does.")
    ap.add_argument("--noise-floor", action="store_true",
                    help="Also train the fp32 math through the CUDA kernel, compiled (run fp32-kernel): its distance "
                         "from the reference is what fp32 rounding alone does over the same steps.")
    ap.add_argument("--lean", action="store_true",
                    help="Also train the low-memory fast path (run lean: --precision bf16-weights --recompute "
                         "elementwise) and compare it with the reference like the fast run.")
    ap.add_argument("--metrics", action="append", default=[], metavar="NAME=FILE",
                    help="Take run NAME (reference, fast, fp32-kernel, lean) from the metrics.jsonl of a finished run "
                         "with the same options instead of running it (a time-limited machine: one run per command).")
    args = ap.parse_args()
    given = dict(m.split("=", 1) for m in args.metrics)
    if set(given) - set(RUNS):
        sys.exit(f"--metrics names must be among {sorted(RUNS)}")
    common = ["--preset", args.preset, "--batch-tokens", str(args.batch_tokens), "--max-steps", str(args.steps),
              "--lr", "1e-3", "--warmup-steps", "30", "--eval-every", "100", "--eval-batches", "20",
              "--save-every", "100000", "--log-every", "10", "--seed", str(args.seed), "--no-progress",
              "--no-tensorboard"]
    curves, seconds = {}, {}
    args.work.mkdir(parents=True, exist_ok=True)
    running = {}
    names = ["reference", "fast"] + (["fp32-kernel"] if args.noise_floor or "fp32-kernel" in given else []) + (
        ["lean"] if args.lean or "lean" in given else [])
    for name in names:
        env, extra = RUNS[name]
        if name in given:
            curves[name] = read(Path(given[name]))
            continue
        out = args.work / name
        if out.exists():
            subprocess.run(["rm", "-rf", str(out)], check=True)
        cmd = [sys.executable, "-m", "rwkv_music.train.cli", "fit", str(args.shards), "-o", str(out), *common, *extra]
        print(f"[loss-curve] {name}: {' '.join(f'{k}={v}' for k, v in env.items())} {' '.join(cmd[3:])}", flush=True)
        log = (args.work / f"{name}.log").open("w") if args.parallel else None
        running[name] = (subprocess.Popen(cmd, env={**os.environ, **env}, stdout=log, stderr=log), time.time(), out)
        if not args.parallel:
            finish(running.pop(name), name, args, curves, seconds)
    for name in list(running):
        finish(running.pop(name), name, args, curves, seconds)
    windows, vals, worst = compare(curves["reference"], curves["fast"], args.window)
    extra = {name: compare(curves["reference"], curves[name], args.window) for name in names[2:]}
    head = f"{'steps':>10} {'reference':>10} {'fast':>10} {'rel':>7}"
    print(head + "".join(f" {name:>11} {'rel':>7}" for name in extra))
    rows = [(w["steps"], w) for w in windows] + [(f"val {v['step']}", v) for v in vals]
    by_label = {name: {w["steps"]: w for w in e[0]} | {f"val {v['step']}": v for v in e[1]}
                for name, e in extra.items()}
    for label, r in rows:
        line = f"{label:>10} {r['reference']:10.4f} {r['other']:10.4f} {r['rel']:7.4f}"
        for name in extra:
            f = by_label[name].get(label)
            line += f" {f['other']:11.4f} {f['rel']:7.4f}" if f else f" {'-':>11} {'-':>7}"
        print(line)
    compared = bool(windows) and bool(vals)
    follows = compared and worst <= args.tol
    result = {"steps": args.steps, "preset": args.preset, "batch_tokens": args.batch_tokens, "seed": args.seed,
              "seconds": seconds, "worst_rel": worst, "tol": args.tol, "follows": follows,
              "windows": windows, "val": vals}
    if "fp32-kernel" in extra:
        floor = extra["fp32-kernel"]
        bound = max(args.tol, floor[2])
        follows = compared and worst <= bound
        result.update(noise_floor_worst_rel=floor[2], noise_floor_windows=floor[0], noise_floor_val=floor[1],
                      bound=bound, follows_within_floor=follows)
        print(f"[loss-curve] fast vs reference: worst {worst:.4f}; fp32 through the kernel vs reference (the noise "
              f"floor): worst {floor[2]:.4f}; fast {'follows' if follows else 'does not follow'} within "
              f"max(--tol, floor) = {bound:.4f}")
    if "lean" in extra:
        lean = extra["lean"]
        bound = result.get("bound", args.tol)
        result.update(lean_worst_rel=lean[2], lean_windows=lean[0], lean_val=lean[1],
                      lean_follows=bool(lean[0]) and bool(lean[1]) and lean[2] <= bound)
        print(f"[loss-curve] lean vs reference: worst {lean[2]:.4f} (fast: {worst:.4f}); lean "
              f"{'follows' if result['lean_follows'] else 'does not follow'} within {bound:.4f}")
    print(json.dumps(result))
    sys.exit(0 if follows else 1)


if __name__ == "__main__":
    main()

"""Which sampling settings make the best completions? `musictrain eval` on the dev half of the val pieces
(`--pieces dev`) for each setting of a grid of temperature x top-p x min-p x candidates x choice (one of C
continuations kept: the likeliest, or the consensus), generative metrics only, and a
ranking by how many of eval's closeness metrics the model wins against the repeat-last-bars and the
random-window baselines.

    python bench/sampling_sweep.py RUN SHARDS WORK [--temperatures ...] [--top-ps ...] [--min-ps ...]
                                   [--candidates ...] [--choose ...] [--report-test DIR]

Every setting sees the same windows and the same seed. Prints one line per setting and a JSON summary (also
WORK/sweep.json) whose "best" is the setting that wins most metrics against the repeat baseline, then against
the random one, then has the smallest sum of errors relative to the repeat baseline's. The test pieces are
read only by --report-test: one full `eval --pieces test` with the winning setting, after it was chosen.
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
from pathlib import Path

from rwkv_music.atomic import write_text_atomic
from rwkv_music.train.eval_generate import mean_error_wins
from rwkv_music.train.metrics import METRIC_NAMES
from rwkv_music.train.sampling_config import CHOICES, SamplingConfig

_DEFAULT = SamplingConfig()


def closeness(report: dict) -> dict[str, dict[str, float]]:
    """Mean error against the truth per metric and system (lower is closer), from eval's report.json."""
    systems = report["generative"]["systems"]
    out = {}
    for s in ("model", "repeat", "random"):
        out[s] = {m: systems[s]["abs_error_vs_truth"][m]["mean"] for m in METRIC_NAMES}
    return out


def score(c: dict[str, dict[str, float | None]]) -> dict:
    """Wins over eval's 9 metrics (METRIC_NAMES), the count issue 16 states its goals in. A metric with no mean
    (no window defines it, e.g. the inter-onset interval of one-note bars) is no win for either side."""
    metrics = list(c["model"])
    rel = sum(c["model"][m] / c["repeat"][m] for m in metrics
              if c["model"][m] is not None and c["repeat"][m] is not None and c["repeat"][m] > 0)
    wins_repeat, wins_random = mean_error_wins(c["model"], c["repeat"]), mean_error_wins(c["model"], c["random"])
    return {"metrics": len(metrics), "wins_vs_repeat": wins_repeat, "wins_vs_random": wins_random,
            "rel_error_sum": round(rel, 4)}


def eval_cmd(args: argparse.Namespace, setting: dict) -> list[str]:
    """`musictrain eval` on RUN's val split with one sampling setting (the caller adds pieces, sizes, -o)."""
    return [sys.executable, "-m", "rwkv_music.train.cli", "eval", str(args.run), str(args.shards), "--split", "val",
            "--temperature", str(setting["temperature"]), "--top-p", str(setting["top_p"]),
            "--min-p", str(setting["min_p"]), "--candidates", str(setting["candidates"]), "--choose", setting["choose"],
            "--seed", str(args.seed),
            "--device", args.device, "--overwrite"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", type=Path, help="Run or checkpoint directory.")
    ap.add_argument("shards", type=Path)
    ap.add_argument("work", type=Path, help="Reports go to WORK/t<T>-p<P>-m<M>-c<C>[-<choice>]/.")
    ap.add_argument("--temperatures", type=float, nargs="+", default=[0.6, 0.75, 0.85, 1.0])
    ap.add_argument("--top-ps", type=float, nargs="+", default=[0.9])
    ap.add_argument("--min-ps", type=float, nargs="+", default=[0.0, 0.1])
    ap.add_argument("--candidates", type=int, nargs="+", default=[1, _DEFAULT.candidates],
                    help="Continuations per window, one kept (1: plain sampling) [plain and complete's default].")
    ap.add_argument("--choose", nargs="+", choices=CHOICES, default=[_DEFAULT.choose],
                    help="Which candidate is kept (with candidates > 1; a setting of one candidate runs once).")
    ap.add_argument("--report-test", type=Path, default=None,
                    help="Then evaluate the winner on the test pieces into this directory (full report).")
    ap.add_argument("--test-windows", type=int, default=64, help="Generated windows of the --report-test eval.")
    ap.add_argument("--num-windows", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--timeout", type=int, default=600, help="Seconds per setting.")
    args = ap.parse_args()
    rows = []
    grid = itertools.product(args.temperatures, args.top_ps, args.min_ps, args.candidates, args.choose)
    for t, p, mp, c, ch in grid:
        if c == 1 and ch != args.choose[0]:  # one candidate: nothing to choose, the same run
            continue
        out = args.work / (f"t{t:g}-p{p:g}-m{mp:g}-c{c}" + ("" if c == 1 else f"-{ch}"))
        setting = {"temperature": t, "top_p": p, "min_p": mp, "candidates": c, "choose": ch}
        name = f"t={t:g} top_p={p:g} min_p={mp:g} candidates={c}" + ("" if c == 1 else f" choose={ch}")
        cmd = [*eval_cmd(args, setting), "--pieces", "dev", "--num-windows", str(args.num_windows),
               "--choice-windows", "0", "--max-tf-windows", "1", "--piano-rolls", "0", "-o", str(out), "-q"]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            print(f"{name}: eval ran past {args.timeout} s", flush=True)
            rows.append({**setting, "error": "timeout"})
            continue
        if res.returncode != 0:
            print(f"{name}: eval failed ({res.returncode}): {res.stderr.strip()[-300:]}", flush=True)
            rows.append({**setting, "error": res.returncode})
            continue
        report = json.loads((out / "report.json").read_text())
        gen = report["generative"]
        pch = {f"pch_distance_{s}": gen["systems"][s]["pch_distance_truth"]["mean"] for s in ("model", "repeat")}
        row = {**setting, **score(closeness(report)), **pch,
               "valid_midi_rate": gen["valid_midi_rate"],
               "bars_ok_rate": gen["bars_ok_rate"], "n_windows": gen["n_windows"]}
        rows.append(row)
        print(f"{name}: wins vs repeat {row['wins_vs_repeat']}/{row['metrics']}, "
              f"vs random {row['wins_vs_random']}/{row['metrics']}, error/repeat summed {row['rel_error_sum']:.3f}, "
              f"valid {row['valid_midi_rate']:.3f}, bars ok {row['bars_ok_rate']:.3f}", flush=True)
    ok = [r for r in rows if "error" not in r]
    best = min(ok, key=lambda r: (-r["wins_vs_repeat"], -r["wins_vs_random"], r["rel_error_sum"])) if ok else None
    summary = {"run": str(args.run), "pieces": "dev", "num_windows": args.num_windows, "seed": args.seed,
               "rows": rows, "best": best}
    args.work.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.work / "sweep.json", json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary))
    if best is None:
        sys.exit(1)
    if args.report_test is not None:
        setting = {k: best[k] for k in ("temperature", "top_p", "min_p", "candidates", "choose")}
        cmd = [*eval_cmd(args, setting), "--pieces", "test", "--num-windows", str(args.test_windows),
               "-o", str(args.report_test)]
        print("winner on the test pieces: musictrain " + " ".join(cmd[3:]), flush=True)
        sys.exit(subprocess.run(cmd, timeout=args.timeout * 3).returncode)


if __name__ == "__main__":
    main()

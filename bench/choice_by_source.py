"""The forced-choice results of one `musictrain eval` report, grouped by the collection each window's source
file belongs to (its name up to the first "__", trailing digits dropped: "oneills1850__1176.mid" -> "oneills").

    python bench/choice_by_source.py REPORT_DIR/report.json [--min-windows 10] [--phase 8] [--against OTHER.json]

Prints a Markdown table: per collection, windows, the share where the truth ranks first against each
impostor (`earlier` from reports of 2026-12-07 on, "-" where a report lacks it), and the mean margin (nats per
token) of the truth over the repeat. `--phase P` groups the windows by
their first bar in the piece modulo P instead (the `BarPhase` token of a `--bar-phase P` build; reports written
before 2026-12-07 lack the first bar). `--against` compares two reports of the same windows (two models, same
eval options and seed) window by window: for each impostor, the windows won only by one or only by the other,
and the exact two-sided sign test of that split.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path

from rwkv_music.train.metrics import sign_test

IMPOSTORS = ("repeat", "random", "earlier")


def collection(source: str) -> str:
    return re.sub(r"\d+$", "", Path(source).name.split("__")[0].removesuffix(".mid"))


def paired(windows: list[dict], others: list[dict]) -> None:
    """Print, per impostor, how the windows the two reports share split between them."""
    theirs = {(w["piece_id"], w["window"]): w for w in others}
    common = [(w, theirs[(w["piece_id"], w["window"])]) for w in windows if (w["piece_id"], w["window"]) in theirs]
    print(f"\n{len(common)} windows in both reports")
    for imp in IMPOSTORS:
        won = [(x["loglik"]["truth"] > x["loglik"][imp], y["loglik"]["truth"] > y["loglik"][imp])
               for x, y in common if imp in x["loglik"] and imp in y["loglik"]
               and not x["identical"].get(imp) and not y["identical"].get(imp)]
        if not won:
            continue
        mine, other = sum(a and not b for a, b in won), sum(b and not a for a, b in won)
        print(f"against the {imp}: truth first in this report only {mine}, in the other only {other}, "
              f"both {sum(a and b for a, b in won)} of {len(won)}; sign test p = {sign_test(mine, other):.3g}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("report", type=Path)
    ap.add_argument("--min-windows", type=int, default=10, help="Leave out collections with fewer windows.")
    ap.add_argument("--phase", type=int, default=0, help="Group by first bar modulo this instead of collection.")
    ap.add_argument("--against", type=Path, help="Another report of the same windows, compared window by window.")
    args = ap.parse_args()
    windows = json.loads(args.report.read_text())["forced_choice"]["per_window"]
    if args.phase and any("first_bar" not in w for w in windows):
        raise SystemExit(f"{args.report}: its windows have no first_bar (a report from before 2026-12-07)")
    groups: dict[str, list[dict]] = defaultdict(list)
    for w in windows:
        groups[f"bar {w['first_bar'] % args.phase}" if args.phase else collection(w["source"])].append(w)
    order = ((lambda items: sorted(items, key=lambda kv: int(kv[0].split()[1]))) if args.phase
             else (lambda items: sorted(items, key=lambda kv: -len(kv[1]))))
    group = f"first bar mod {args.phase}" if args.phase else "collection"
    print(f"| {group} | windows | truth first vs repeat | vs random | vs earlier bars | mean margin vs repeat |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, ws in order(groups.items()):
        if len(ws) < args.min_windows:
            continue
        share = {}
        for imp in IMPOSTORS:
            cmp_ = [w["loglik"] for w in ws if imp in w["loglik"] and not w["identical"].get(imp)]
            share[imp] = f"{sum(ll['truth'] > ll[imp] for ll in cmp_) / len(cmp_):.2f}" if cmp_ else "-"
        margins = [w["loglik"]["truth"] - w["loglik"]["repeat"] for w in ws if "repeat" in w["loglik"]]
        margin = sum(margins) / len(margins) if margins else float("nan")
        print(f"| {name} | {len(ws)} | {share['repeat']} | {share['random']} | {share['earlier']} | {margin:+.3f} |")
    if args.against:
        paired(windows, json.loads(args.against.read_text())["forced_choice"]["per_window"])


if __name__ == "__main__":
    main()

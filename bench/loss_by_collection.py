"""Teacher-forced completion loss of one or more checkpoints, per collection of a split (a collection: the
source file's name up to its first "__", trailing digits dropped, as bench/choice_by_source.py groups them).

    python bench/loss_by_collection.py SHARDS RUN [RUN ...] [--split val] [--per-collection 300] [--device cpu]

Prints one Markdown row per run. Each collection is scored on up to N of its windows, evenly spaced over the
split, so a run's val loss can be read apart: which collections it has learnt and which it has not.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import torch

from rwkv_music.train.checkpoints import load_for_inference
from rwkv_music.train.eval_data import load_split, token_types
from rwkv_music.train.eval_score import teacher_forced

sys.path.insert(0, str(Path(__file__).resolve().parent))  # imported by path too (the tests): find the sibling
from choice_by_source import collection


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("shards", type=Path)
    ap.add_argument("runs", type=Path, nargs="+", help="Run or checkpoint directories.")
    ap.add_argument("--split", default="val")
    ap.add_argument("--per-collection", type=int, default=300, help="Windows scored per collection (at most).")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    groups: dict[str, list] = defaultdict(list)
    for s in load_split(args.shards, args.split, "parquet"):
        groups[collection(s.source)].append(s)
    names = sorted(groups)
    print("| run | " + " | ".join(f"{g} ({len(groups[g])})" for g in names) + " |")
    print("|---|" + "---:|" * len(names))
    for run in args.runs:
        model, tok, _ = load_for_inference(run, args.device)
        types = token_types(tok)
        cells = []
        for g in names:
            ws = groups[g]
            pick = ws[:: max(1, len(ws) // args.per_collection)][: args.per_collection]
            cells.append(f"{teacher_forced(model, pick, types, torch.device(args.device))['loss']:.3f}")
        print(f"| {run} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

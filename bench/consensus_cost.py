"""What `--choose consensus` adds on the CPU: decoding one candidate to its music metrics, and choosing among C.

    python bench/consensus_cost.py SHARDS [--windows 200] [--candidates 16]

The true completions of the first --windows val windows stand in for candidates (the same kind of token stream:
a few bars of REMI). Prints the mean milliseconds per candidate of `continuation_metrics` and per choice of
`consensus_index` over --candidates of them.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from rwkv_music.remi.tokenizer import tokenizer_from_file
from rwkv_music.remi.windows import Vocab
from rwkv_music.train.consensus import consensus_index, continuation_metrics
from rwkv_music.train.eval_data import count_bars, load_split


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("shards", type=Path, help="A `musicprep build-shards` output.")
    ap.add_argument("--windows", type=int, default=200)
    ap.add_argument("--candidates", type=int, default=16)
    ap.add_argument("--format", default="parquet")
    args = ap.parse_args()
    tok = tokenizer_from_file(args.shards / "tokenizer.json")
    vocab = Vocab(tok)
    samples = load_split(args.shards, "val", args.format)[: args.windows]
    rows = [(s.tokens[: s.meta_len], s.tokens[s.ctx_len:]) for s in samples]
    t0 = time.perf_counter()
    feats = [continuation_metrics(meta, cont, count_bars(cont, vocab), tok, vocab) for meta, cont in rows]
    per_candidate = (time.perf_counter() - t0) / len(rows)
    groups = [feats[i:i + args.candidates] for i in range(0, len(feats) - args.candidates + 1, args.candidates)]
    t0 = time.perf_counter()
    for g in groups:
        consensus_index(g)
    per_choice = (time.perf_counter() - t0) / max(1, len(groups))
    tokens = sum(len(c) for _, c in rows) / len(rows)
    print(f"{len(rows)} continuations (mean {tokens:.0f} tokens): {per_candidate * 1e3:.2f} ms each to decode and "
          f"measure; choosing among {args.candidates}: {per_choice * 1e3:.2f} ms ({len(groups)} choices)")


if __name__ == "__main__":
    main()

"""How alike the true completion and the forced choice's `repeat` impostor are, note for note (no model needed).

    python bench/choice_overlap.py SHARDS [--split val] [--pieces test]

If the truth mostly restated the context's last bars, ranking it above their repeat would be a coin toss for any
model. This measures it: for each window of the split's pieces, the notes of the truth and of the repeat as
(bar of the completion, Position, Pitch) sets, velocities and durations left out, and their Jaccard overlap
(shared notes / all notes of the two). Prints the share of windows with identical tokens and identical notes,
and quantiles of the overlap.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from rwkv_music.remi.tokenizer import tokenizer_from_file
from rwkv_music.remi.windows import Vocab
from rwkv_music.shards import TOKENIZER
from rwkv_music.train.eval_choice import completion_bars, repeat_tokens
from rwkv_music.train.eval_data import PIECE_PARTS, load_split, select_pieces


def note_set(tokens: list[int], names: dict[int, str]) -> set[tuple[int, str, str]]:
    out, bar, pos = set(), -1, ""
    for t in tokens:
        kind = names[t].split("_", 1)[0]
        if kind == "Bar":
            bar += 1
        elif kind == "Position":
            pos = names[t]
        elif kind == "Pitch":
            out.add((bar, pos, names[t]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("shards", type=Path)
    ap.add_argument("--split", default="val")
    ap.add_argument("--pieces", choices=PIECE_PARTS, default="test")
    ap.add_argument("--format", default="parquet")
    args = ap.parse_args()
    tok = tokenizer_from_file(args.shards / TOKENIZER)
    vocab, names = Vocab(tok), {i: t for t, i in tok.vocab.items()}
    samples = select_pieces(load_split(args.shards, args.split, args.format), args.pieces)
    overlap, same_tokens, same_notes = [], 0, 0
    for s in samples:
        truth = s.tokens[s.ctx_len:]
        rep = repeat_tokens(s, completion_bars(s, vocab), vocab)
        if rep is None:
            continue
        a, b = note_set(truth, names), note_set(rep, names)
        same_tokens += rep == truth
        same_notes += a == b
        overlap.append(len(a & b) / max(1, len(a | b)))
    x = np.array(overlap)
    qs = np.quantile(x, [0.1, 0.25, 0.5, 0.75, 0.9]).round(3).tolist()
    q = dict(zip(("p10", "p25", "median", "p75", "p90"), qs, strict=True))
    print(f"{args.split} windows of the {args.pieces} pieces with a repeat: {len(x)}; identical tokens {same_tokens}, "
          f"identical notes {same_notes}")
    print(f"note overlap (Jaccard) of truth and repeat: {q}; mean {x.mean():.3f}; "
          f"share >= 0.5: {(x >= 0.5).mean():.3f}, >= 0.8: {(x >= 0.8).mean():.3f}")


if __name__ == "__main__":
    main()

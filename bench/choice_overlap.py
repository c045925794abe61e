"""How alike the true completion and the forced choice's `repeat` impostor are, note for note (no model needed).

    python bench/choice_overlap.py SHARDS [--split val] [--pieces test]

If the truth mostly restated the context's last bars, ranking it above their repeat would be a coin toss for any
model. This measures it: for each window of the split's pieces, the notes of the truth and of the repeat as
(bar of the completion, Position, Pitch) sets, velocities and durations left out, and their Jaccard overlap
(shared notes / all notes of the two). Prints the share of windows with identical tokens and identical notes,
and quantiles of the overlap.

It also asks where else in the context the truth could have been copied from: the truth against every run of as
many consecutive context bars as it has (the last run is the repeat), the best-matching run per window, and how
often that run is not the last one. A window whose truth restates earlier bars (a tune's opening phrase coming
back) is one a model can only get right by knowing which bars come back. Last, the same by the completion's
first bar in the piece, modulo 8 (`--period`): where in an eight-bar phrase the returns fall.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from rwkv_music.remi.tokenizer import tokenizer_from_file
from rwkv_music.remi.windows import Vocab, index_bars, replay_last_bars
from rwkv_music.shards import TOKENIZER
from rwkv_music.train.eval_data import PIECE_PARTS, count_bars, load_split, select_pieces


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


def context_runs(sample, n_bars: int, vocab: Vocab) -> list[list[int]]:
    """Every run of `n_bars` consecutive context bars, as tokens, first run first (the last one is the repeat)."""
    body = list(sample.tokens[sample.meta_len:sample.ctx_len])
    bars = index_bars(body, vocab)
    return [body[bars.at(f):bars.at(f + n_bars)] for f in range(bars.n_bars - n_bars + 1)] if n_bars >= 1 else []


def bars_before_completion(sample, vocab: Vocab) -> int:
    return index_bars(list(sample.tokens[sample.meta_len:sample.ctx_len]), vocab).n_bars


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("shards", type=Path)
    ap.add_argument("--split", default="val")
    ap.add_argument("--pieces", choices=PIECE_PARTS, default="test")
    ap.add_argument("--format", default="parquet")
    ap.add_argument("--period", type=int, default=8, help="Phrase length (bars) for the table by phrase position.")
    args = ap.parse_args()
    tok = tokenizer_from_file(args.shards / TOKENIZER)
    vocab, names = Vocab(tok), {i: t for t, i in tok.vocab.items()}
    samples = select_pieces(load_split(args.shards, args.split, args.format), args.pieces)
    overlap, same_tokens, same_notes = [], 0, 0
    best, best_is_last, phase, earlier = [], [], [], []
    for s in samples:
        truth = s.tokens[s.ctx_len:]
        nb = count_bars(s.tokens[s.ctx_len:], vocab)
        rep = replay_last_bars(s.tokens, s.meta_len, s.ctx_len, vocab)
        if rep is None:
            continue
        a, b = note_set(truth, names), note_set(rep, names)
        same_tokens += rep == truth
        same_notes += a == b
        overlap.append(len(a & b) / max(1, len(a | b)))
        runs = context_runs(s, nb, vocab)
        if runs:
            j = [len(a & note_set(r, names)) / max(1, len(a | note_set(r, names))) for r in runs]
            best.append(max(j))
            best_is_last.append(j[-1] == max(j))
            phase.append((s.first_bar + bars_before_completion(s, vocab)) % args.period)
            earlier.append(max(j[:-1], default=0.0))
    x = np.array(overlap)
    qs = np.quantile(x, [0.1, 0.25, 0.5, 0.75, 0.9]).round(3).tolist()
    q = dict(zip(("p10", "p25", "median", "p75", "p90"), qs, strict=True))
    print(f"{args.split} windows of the {args.pieces} pieces with a repeat: {len(x)}; identical tokens {same_tokens}, "
          f"identical notes {same_notes}")
    print(f"note overlap (Jaccard) of truth and repeat: {q}; mean {x.mean():.3f}; "
          f"share >= 0.5: {(x >= 0.5).mean():.3f}, >= 0.8: {(x >= 0.8).mean():.3f}")
    y, last = np.array(best), np.array(best_is_last)
    qy = dict(zip(("p10", "p25", "median", "p75", "p90"), np.quantile(y, [0.1, 0.25, 0.5, 0.75, 0.9]).round(3).tolist(),
                  strict=True))
    print(f"best-matching run of context bars (windows with a whole run: {len(y)}): overlap {qy}; mean {y.mean():.3f}; "
          f"share >= 0.5: {(y >= 0.5).mean():.3f}, >= 0.8: {(y >= 0.8).mean():.3f}")
    for t in (0.5, 0.8):
        hit = y >= t
        print(f"  of the {int(hit.sum())} windows whose best run overlaps >= {t}: that run is the last bars (the "
              f"repeat) in {last[hit].mean():.3f}, earlier bars in {1 - last[hit].mean():.3f}")
    ph, ea = np.array(phase), np.array(earlier)
    print(f"by the completion's first bar in the piece, modulo {args.period}: windows, and the share whose truth "
          f"restates earlier context bars (overlap >= 0.8)")
    for k in range(args.period):
        at = ph == k
        if at.any():
            print(f"  {k}: {int(at.sum())} windows, {(ea[at] >= 0.8).mean():.3f}")


if __name__ == "__main__":
    main()

"""Forced choice: does the model prefer the true completion to plausible impostors (issue 16)?

Loss numbers say little about whether a model has learnt *music* rather than token statistics. This test asks a
sharper question per window: after the same meta + context prefix, is the true completion more likely (mean
log-likelihood per token, teacher-forced) than
- `repeat`: the context's last bars repeated, as many bars as the completion has (the token-level twin of the
  repeat-last-bars baseline of the generative part),
- `random`: the completion of a random window of another piece, rendered after this window's prefix, and
- `earlier`: the context bars *before* the last ones repeated (bars n-2k .. n-k of n, k the completion's)?

A model that only copies scores the repeat high; one that ignores the context cannot tell the random window
apart. The share of windows where the truth ranks first is reported per impostor (goals from issue 16: 70 %
against the repeat, 95 % against the random window). `earlier` has no goal: fit's --repeat-contrast trains
against the `repeat` impostor itself, so the repeat's share partly measures that objective; `earlier` is a copy
the term never sees, and tells "does not replay the last bars" from "does not copy". (Tunes do bring earlier
bars back, so the truth need not beat it everywhere.)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from rwkv_music.remi.windows import Vocab, replay_last_bars

from .eval_data import count_bars

IMPOSTORS = ("repeat", "random", "earlier")
GOALS = {"repeat": 0.70, "random": 0.95}  # issue 16: share of windows where the truth should rank first


@torch.no_grad()
def score_continuations(model: torch.nn.Module, prefixes: Sequence[Sequence[int]], conts: Sequence[Sequence[int]],
                        device: torch.device, batch_tokens: int = 32768, pad_id: int = 0,
                        progress: Callable[[int], None] | None = None) -> np.ndarray:
    """Mean log-likelihood (nats per token) of each continuation after its prefix, teacher-forced.

    Sequences are sorted by length, padded and batched up to `batch_tokens` padded tokens; only the positions that
    predict continuation tokens are asked of the model (`positions=mask`). `progress(n)` is told of every n
    sequences scored.
    """
    model.eval()
    lens = [len(p) + len(c) for p, c in zip(prefixes, conts, strict=True)]
    order = sorted(range(len(lens)), key=lambda i: lens[i])
    batches: list[list[int]] = []
    for i in order:
        if batches and (len(batches[-1]) + 1) * lens[i] <= batch_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    out = np.full(len(lens), np.nan)
    for batch in batches:
        T = max(lens[i] for i in batch) - 1
        idx = torch.full((len(batch), T), pad_id, dtype=torch.long)
        tgt = torch.full((len(batch), T), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), T), dtype=torch.bool)
        for b, i in enumerate(batch):
            seq = torch.tensor([*prefixes[i], *conts[i]], dtype=torch.long)
            idx[b, : len(seq) - 1] = seq[:-1]
            tgt[b, : len(seq) - 1] = seq[1:]
            mask[b, len(prefixes[i]) - 1: len(seq) - 1] = True
        logits = model(idx.to(device), positions=mask.to(device)).float()
        logp = torch.log_softmax(logits, dim=-1).gather(1, tgt[mask].to(device)[:, None])[:, 0]
        rows = mask.nonzero(as_tuple=True)[0].to(device)  # boolean indexing is row-major: row of each position
        sums = torch.zeros(len(batch), dtype=torch.float64, device=device).index_add_(0, rows, logp.double())
        counts = mask.sum(dim=1).double()
        for b, i in enumerate(batch):
            out[i] = float(sums[b].item() / counts[b].item())
        if progress is not None:
            progress(len(batch))
    return out


def forced_choice(model: torch.nn.Module, samples: Sequence, chosen: Sequence[int], pool: Sequence,
                  vocab: Vocab, device: torch.device, seed: int, batch_tokens: int = 32768, pad_id: int = 0,
                  progress: Callable[[int], None] | None = None) -> dict:
    """Score the truth and every impostor of each chosen window; the per-comparison shares and counts.

    `pool` supplies the random windows (each drawn, with a generator seeded from `seed`, among the pool windows of
    another piece). A window whose impostor has the very same tokens as the truth (a completion that repeats its
    context exactly) has no right answer and is counted as `identical`, not as a win or loss.
    """
    rng = np.random.default_rng([seed, 16])
    by_piece: dict[str, list[int]] = {}
    for j, o in enumerate(pool):
        by_piece.setdefault(o.piece_id, []).append(j)
    pieces = sorted(by_piece)
    prefixes, conts, keys = [], [], []
    records = []
    for i in chosen:
        s = samples[i]
        truth = list(s.tokens[s.ctx_len:])
        nb = count_bars(s.tokens[s.ctx_len:], vocab)
        rec: dict = {"piece_id": s.piece_id, "source": s.source, "window": s.window, "first_bar": s.first_bar,
                     "completion_bars": nb, "tokens": {"truth": len(truth)}, "identical": {}}
        cands = {"truth": truth, "repeat": replay_last_bars(s.tokens, s.meta_len, s.ctx_len, vocab), "random": None,
                 "earlier": replay_last_bars(s.tokens, s.meta_len, s.ctx_len, vocab, skip=nb)}
        others = [p for p in pieces if p != s.piece_id]
        if others:
            p = others[int(rng.integers(len(others)))]
            o = pool[by_piece[p][int(rng.integers(len(by_piece[p])))]]
            cands["random"] = list(o.tokens[o.ctx_len:])
            rec["random_from"] = {"piece_id": o.piece_id, "window": o.window}
        prefix = list(s.tokens[: s.ctx_len])
        for name, toks in cands.items():
            if toks is None or not toks:
                continue
            if name != "truth":
                rec["tokens"][name] = len(toks)
                rec["identical"][name] = toks == truth
            prefixes.append(prefix)
            conts.append(toks)
            keys.append((len(records), name))
        records.append(rec)
    scores = score_continuations(model, prefixes, conts, device, batch_tokens, pad_id, progress)
    for rec in records:
        rec["loglik"] = {}
    for (r, name), v in zip(keys, scores.tolist(), strict=True):
        records[r]["loglik"][name] = v
    return {"windows": len(records), "comparisons": summarize_choice(records), "per_window": records,
            "mean_loglik": {name: _mean([r["loglik"].get(name) for r in records]) for name in ("truth", *IMPOSTORS)}}


def _mean(xs) -> float:
    a = [x for x in xs if x is not None and np.isfinite(x)]
    return float(np.mean(a)) if a else float("nan")


def summarize_choice(records: Sequence[dict]) -> dict:
    """Per impostor: windows compared, truth ranked first (strictly more likely), share, goal (None: none set),
    mean margin; and `all`: the truth above both impostors with a goal, over windows that have both (none
    identical)."""
    out: dict = {}
    for name in IMPOSTORS:
        have = [r for r in records if name in r["loglik"] and "truth" in r["loglik"]]
        same = [r for r in have if r["identical"][name]]
        cmp_ = [r for r in have if not r["identical"][name]]
        first = sum(r["loglik"]["truth"] > r["loglik"][name] for r in cmp_)
        out[name] = {"n": len(cmp_), "truth_first": int(first), "share": first / len(cmp_) if cmp_ else float("nan"),
                     "goal": GOALS.get(name), "identical": len(same), "missing": len(records) - len(have),
                     "mean_margin_nats": _mean([r["loglik"]["truth"] - r["loglik"][name] for r in cmp_])}
    full = [r for r in records if all(n in r["loglik"] and not r["identical"][n] for n in GOALS)]
    first = sum(all(r["loglik"]["truth"] > r["loglik"][n] for n in GOALS) for r in full)
    out["all"] = {"n": len(full), "truth_first": int(first), "share": first / len(full) if full else float("nan")}
    return out

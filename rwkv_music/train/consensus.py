"""Choosing one of several sampled continuations by consensus: the candidate closest to all the others.

One sample is a draw from the model's distribution over continuations, and its bars can land far from the
centre of it (a sparse bar where the model expects a busy one). The candidate whose music metrics (`metrics`,
the same ones `eval` compares with the truth) are nearest to those of the other candidates is the one with the
least expected distance to a continuation the model would write: minimum Bayes risk decoding, with the
model's own samples standing in for its distribution. No truth is involved; the choice only uses what the
model drew.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from rwkv_music.remi.windows import Vocab, decode_window
from rwkv_music.train import metrics as M


def continuation_metrics(meta: Sequence[int], continuation: Sequence[int], bars: int, tokenizer,
                         vocab: Vocab) -> np.ndarray | None:
    """The METRIC_NAMES values of a continuation decoded on its own (meta tokens = time signature and tempo, then
    its bars), over the `bars` bars it was asked for; None where it does not decode."""
    try:
        score = decode_window(list(meta) + list(continuation), len(meta), tokenizer, vocab)
    except Exception:  # an undecodable candidate is not the consensus (eval counts such a stream, not a crash)
        return None
    values = M.compute_metrics(M.notes_from_score(score, n_bars=bars))
    return np.array([values[m] for m in M.METRIC_NAMES], dtype=np.float64)


def consensus_index(features: Sequence[np.ndarray | None]) -> int:
    """The candidate with the least summed distance to the others (ties: the lowest index).

    Each metric's differences are divided by that metric's mean difference over all pairs, so every metric
    weighs alike whatever its unit (note counts next to rates). Over the fixed bars of a completion the note count
    and the note density are one metric twice, so the number of notes weighs double (as it does in eval's count
    of metrics won). A metric undefined (NaN) in one candidate and not the other is one unit apart; undefined in
    both, none. A candidate that did not decode is not chosen while another did; if none did, 0 is."""
    ok = [i for i, f in enumerate(features) if f is not None]
    if len(ok) <= 2:
        return ok[0] if ok else 0
    F = np.stack([features[i] for i in ok])  # [n, metrics]
    diff = np.abs(F[:, None, :] - F[None, :, :])  # [n, n, metrics]; NaN where either is undefined
    nan_a, nan_b = np.isnan(F)[:, None, :], np.isnan(F)[None, :, :]
    n = len(ok)
    pairs = ~np.eye(n, dtype=bool)[:, :, None] & ~np.isnan(diff)
    counts = pairs.sum(axis=(0, 1))
    scale = np.where(counts > 0, np.where(pairs, diff, 0.0).sum(axis=(0, 1)) / np.maximum(counts, 1), 0.0)
    unit = np.where(scale > 0, diff / np.where(scale > 0, scale, 1.0), 0.0)  # a metric all candidates share: 0
    unit = np.where(nan_a ^ nan_b, 1.0, np.where(nan_a & nan_b, 0.0, unit))
    total = unit.sum(axis=(1, 2))
    return ok[int(np.argmin(total))]  # argmin keeps the first of equal totals

"""Decoding a window gives back exactly the source piece's notes in the window's bars."""

from __future__ import annotations

from fractions import Fraction

import pytest

from rwkv_music.remi.tokenizer import build_tokenizer, encode_piano, load_piano_score
from rwkv_music.remi.windows import Vocab, WindowSpec, decode_window, make_windows

# 4/4 pop, multitrack merge, and a waltz that switches between 3/4 and 4/4 bar after bar.
PIECES = ["MIDIs_one_track/Maestro_1.mid", "MIDIs_multitrack/Funkytown.mid",
          "MIDIs_one_track/6354774_Macabre Waltz.mid"]


def bar_starts(score, n_bars: int) -> list[Fraction]:
    """Bar start times in quarter notes, following the score's time signatures (the independent reference)."""
    sigs = sorted((Fraction(ts.time, score.tpq), ts.numerator, ts.denominator) for ts in score.time_signatures)
    if not sigs or sigs[0][0] > 0:
        sigs.insert(0, (Fraction(0), 4, 4))
    starts, t, i = [], Fraction(0), 0
    while len(starts) <= n_bars:
        while i + 1 < len(sigs) and sigs[i + 1][0] <= t:
            i += 1
        starts.append(t)
        t += Fraction(4 * sigs[i][1], sigs[i][2])
    return starts


def notes_q(score) -> list[tuple]:
    """(onset, duration) in quarter notes, pitch, velocity (already quantised to the tokenizer's bins)."""
    return sorted((Fraction(n.time, score.tpq), Fraction(n.duration, score.tpq), n.pitch, n.velocity)
                  for t in score.tracks for n in t.notes)


@pytest.mark.parametrize("rel", PIECES)
def test_window_decodes_to_source_bars(corpus_dir, rel):
    tok = build_tokenizer()
    vocab = Vocab(tok)
    piano = load_piano_score(corpus_dir / rel, tok)
    ids = encode_piano(piano, tok)
    windows = make_windows(ids, vocab, WindowSpec())
    assert windows
    source = tok.preprocess_score(piano.score.copy())  # resampled, velocities binned: what REMI encodes
    src_notes = notes_q(source)
    n_bars = sum(1 for t in ids if t in vocab.bar_ids)
    starts = bar_starts(source, n_bars)
    checked = 0
    for w in windows[:: max(1, len(windows) // 20)]:
        bars_in_window = sum(1 for t in w.tokens[w.meta_len:] if t in vocab.bar_ids)
        lo = starts[w.first_bar]
        hi = starts[w.first_bar + bars_in_window] if w.first_bar + bars_in_window < n_bars else None
        expected = [(t - lo, d, p, v) for t, d, p, v in src_notes if t >= lo and (hi is None or t < hi)]
        got = notes_q(decode_window(w.tokens, w.meta_len, tok, vocab))
        assert got == expected, f"{rel} window {w.window} (first bar {w.first_bar})"
        # the decoded window states the meter in force at its first bar
        ts = decode_window(w.tokens, w.meta_len, tok, vocab).time_signatures[0]
        in_force = [s for s in source.time_signatures if Fraction(s.time, source.tpq) <= lo]
        if in_force:
            assert (ts.numerator, ts.denominator) == (in_force[-1].numerator, in_force[-1].denominator)
        checked += 1
    assert checked >= 5

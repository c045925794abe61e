"""Key augmentation on real windows: a shifted window decodes to the same notes, every pitch moved alike."""

from __future__ import annotations

import random

import numpy as np
import pytest

from rwkv_music.remi.tokenizer import build_tokenizer, encode_piano, load_piano_score
from rwkv_music.remi.transpose import PitchShift
from rwkv_music.remi.windows import Vocab, WindowSpec, decode_window, make_windows


def _notes(score) -> list[tuple[int, int, int, int]]:
    return sorted((n.time, n.duration, n.pitch, n.velocity) for t in score.tracks for n in t.notes)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def test_shifted_window_decodes_to_the_same_notes_moved(corpus_dir, tok):
    vocab, ps = Vocab(tok), PitchShift(tok.vocab)
    inv = {i: t for t, i in tok.vocab.items()}
    ids = encode_piano(load_piano_score(corpus_dir / "MIDIs_one_track/Maestro_1.mid", tok), tok)
    windows = make_windows(ids, vocab, WindowSpec())
    checked = 0
    for w in windows[:: max(1, len(windows) // 10)]:
        tokens = np.asarray(w.tokens, dtype=np.int32)
        lo, hi = ps.bounds(tokens)
        base = _notes(decode_window(w.tokens, w.meta_len, tok, vocab))
        assert base and lo <= 0 <= hi
        assert lo == ps.low - min(n[2] for n in base) and hi == ps.high - max(n[2] for n in base)
        for k in {lo, -5, -1, 1, 7, hi} & set(range(lo, hi + 1)):
            moved = ps.apply(tokens, k)
            assert moved.dtype == tokens.dtype and len(moved) == len(tokens)
            # only the Pitch tokens change (by name, from the vocabulary)
            is_pitch = np.array([inv[int(t)].startswith("Pitch_") for t in tokens])
            assert ((moved != tokens) == (is_pitch & (k != 0))).all()
            got = _notes(decode_window(moved.tolist(), w.meta_len, tok, vocab))
            assert got == sorted((t, d, p + k, v) for t, d, p, v in base), (w.window, k)
        checked += 1
    assert checked >= 5


def test_shifts_that_leave_the_keyboard_are_refused(tok):
    ps = PitchShift(tok.vocab)
    v = tok.vocab
    window = np.array([v["Bar_None"], v["Position_0"], v["Pitch_105"], v["Velocity_63"], v["Duration_1.0.8"],
                       v["Pitch_30"], v["Velocity_63"], v["Duration_1.0.8"]], dtype=np.int32)
    pitches = sorted(int(t.split("_")[1]) for t in v if t.startswith("Pitch_"))
    assert (ps.low, ps.high) == (pitches[0], pitches[-1]) == (21, 109)  # miditok's range includes its upper end
    assert ps.bounds(window) == (21 - 30, 109 - 105)
    assert ps.apply(window, 4)[2] == v["Pitch_109"] and ps.apply(window, -9)[5] == v["Pitch_21"]
    for k in (5, -10):
        with pytest.raises(ValueError, match=r"outside 21\.\.109"):
            ps.apply(window, k)
    # a window without notes: any shift, and it stays as it is
    empty = window[:2]
    assert ps.bounds(empty) == (-128, 128) and ps.apply(empty, 5).tolist() == empty.tolist()
    with pytest.raises(ValueError, match="no Pitch_"):
        PitchShift({"Bar_None": 0})


def test_draws_cover_the_allowed_shifts_evenly(tok):
    ps, v = PitchShift(tok.vocab), tok.vocab
    near_top = np.array([v["Pitch_107"], v["Pitch_60"]], dtype=np.int32)  # allowed: -39 .. +2
    rng = random.Random(0)
    draws = [ps.draw(near_top, 5, rng) for _ in range(6000)]
    counts = np.bincount(np.array(draws) + 5)
    assert min(draws) == -5 and max(draws) == 2  # +3..+5 would leave the keyboard
    assert counts[:8].min() > 0.8 * 6000 / 8  # uniform over the 8 allowed shifts
    assert ps.draw(near_top, 0, rng) == 0

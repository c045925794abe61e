"""Music metrics on hand-built segments (values derived by hand in the comments) and on real MIDI."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import symusic

from rwkv_music.remi.tokenizer import build_tokenizer, encode_piano, load_piano_score
from rwkv_music.remi.windows import Vocab, WindowSpec, decode_window, make_windows
from rwkv_music.train import metrics as M

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "examples" / "demo-corpus"

# tpq = 4 ticks per quarter, 4/4, two bars of 16 ticks; beats at 0, 4, ..., 32.
#   pitch 60 @0 len4, 64 @0 len4, 67 @0 len8   (a C-major triad, G held for two beats)
#   pitch 62 @8 len4                          (bar 1, beat 3)
#   pitch 73 @16 len4                         (bar 2, beat 1)
#   pitch 66 @26 len2                         (bar 2, beat 3 plus a half beat)
ONSET = [0, 0, 0, 8, 16, 26]
DUR = [4, 4, 8, 4, 4, 2]
PITCH = [60, 64, 67, 62, 73, 66]


@pytest.fixture
def hand():
    return M.note_array(ONSET, DUR, PITCH, tpq=4, n_bars=2)


def test_grid_of_hand_segment(hand):
    assert hand.bars.tolist() == [0, 16, 32]
    assert hand.beats.tolist() == list(range(0, 33, 4))
    assert (hand.n_bars, hand.n_beats, hand.n_notes) == (2, 8, 6)


def test_pitch_metrics_by_hand(hand):
    # Pitch classes 0, 4, 7, 2, 1, 6: six classes, one note each.
    hist = M.pitch_class_histogram(hand)
    expected = np.zeros(12)
    expected[[0, 1, 2, 4, 6, 7]] = 1 / 6
    np.testing.assert_allclose(hist, expected)
    assert M.pitch_range(hand) == 73 - 60
    assert M.n_pitch_classes(hand) == 6
    # C, C# and D are three consecutive semitones, which no major or natural-minor scale holds, so at most
    # five of six fit; G major (G A B C D E F#) holds C, D, E, F#, G: 5/6.
    assert M.scale_consistency(hand) == pytest.approx(5 / 6)


def test_rhythm_metrics_by_hand(hand):
    assert M.note_density(hand, "bar") == 3.0  # 6 notes / 2 bars
    assert M.note_density(hand, "beat") == 0.75  # 6 notes / 8 beats
    # Distinct onsets 0, 8, 16, 26 -> gaps 8, 8, 10 ticks -> mean 26/3 ticks = 26/12 quarters.
    assert M.mean_ioi(hand) == pytest.approx(26 / 12)
    # Onsets fall in beats 0, 2, 4, 6: 4 of 8 beats empty.
    assert M.empty_beat_rate(hand) == 0.5
    # Per-pitch sounding time 4+4+8+4+4+2 = 26 ticks; something sounds during [0,12) [16,20) [26,28) = 18.
    assert M.polyphony(hand) == pytest.approx(26 / 18)
    # One step per tick: bar 1 onsets at steps {0, 8}, bar 2 at {0, 10}: 2 of 16 steps differ.
    assert M.groove_consistency(hand, steps_per_quarter=4) == pytest.approx(1 - 2 / 16)
    # At 2 steps per quarter (2 ticks a step) steps {0, 4} vs {0, 5}: 2 of 8 differ.
    assert M.groove_consistency(hand, steps_per_quarter=2) == pytest.approx(1 - 2 / 8)


def test_histogram_distance_by_hand(hand):
    single_c = M.note_array([0], [4], [48], tpq=4, n_bars=1)
    # |1/6 - 1| for C plus 1/6 for each of the other five classes, halved: 5/6.
    assert M.pitch_class_histogram_distance(hand, single_c) == pytest.approx(5 / 6)
    assert M.pitch_class_histogram_distance(hand, hand) == 0.0
    empty = M.note_array([], [], [], tpq=4, n_bars=2)
    assert M.pitch_class_histogram_distance(hand, empty) == 1.0
    assert M.pitch_class_histogram_distance(empty, empty) == 0.0
    # Octaves do not matter: the same classes an octave up are at distance 0.
    up = M.note_array(ONSET, DUR, [p + 12 for p in PITCH], tpq=4, n_bars=2)
    assert M.pitch_class_histogram_distance(hand, up) == 0.0


def test_empty_segment():
    empty = M.note_array([], [], [], tpq=4, n_bars=2)
    m = M.compute_metrics(empty)
    assert m["n_notes"] == 0 and m["note_density"] == 0.0
    assert m["empty_beat_rate"] == 1.0  # every beat is empty
    assert m["groove_consistency"] == 1.0  # two identical (silent) bars
    for k in ("pitch_range", "mean_ioi", "polyphony", "scale_consistency"):
        assert math.isnan(m[k]), k


def test_polyphony_counts_pitches_not_notes():
    # Two overlapping notes on one pitch sound as one key: [0, 12) at 1 pitch -> polyphony 1.
    n = M.note_array([0, 4], [8, 8], [60, 60], tpq=4)
    assert M.polyphony(n) == 1.0
    # A melody of non-overlapping notes.
    n = M.note_array([0, 4, 8], [4, 4, 4], [60, 62, 64], tpq=4)
    assert M.polyphony(n) == 1.0


def test_compound_meter_and_meter_change():
    bars, beats = M.bar_grid(4, [(0, 6, 8)], n_bars=2)
    assert bars.tolist() == [0, 12, 24]  # 6 eighths = 12 ticks
    assert beats.tolist() == list(range(0, 25, 2))  # a beat is an eighth (2 ticks)
    bars, _ = M.bar_grid(4, [(0, 4, 4), (16, 3, 4)], n_bars=3)
    assert bars.tolist() == [0, 16, 28, 40]
    # A change in the middle of a bar takes effect at the next barline.
    bars, _ = M.bar_grid(4, [(0, 4, 4), (8, 3, 4)], n_bars=2)
    assert bars.tolist() == [0, 16, 28]
    # Without n_bars the grid covers the last note's end.
    n = M.note_array([0, 20], [4, 4], [60, 62], tpq=4)
    assert n.bars.tolist() == [0, 16, 32]


def test_groove_across_bars_of_different_length():
    # 4/4 then 2/4 bar, 1 step per quarter (tpq 1): bar 1 = [1,0,1,0], bar 2 = [1,0] padded -> [1,0,0,0].
    n = M.note_array([0, 2, 4], [1, 1, 1], [60, 60, 60], tpq=1, time_signatures=[(0, 4, 4), (4, 2, 4)], n_bars=2)
    assert n.bars.tolist() == [0, 4, 6]
    assert M.groove_consistency(n, steps_per_quarter=1) == pytest.approx(1 - 1 / 4)


def test_bar_slice(hand):
    second = M.bar_slice(hand, 1, 2)
    assert second.onset.tolist() == [0, 10]
    assert second.pitch.tolist() == [73, 66]
    assert second.bars.tolist() == [0, 16]
    assert second.beats.tolist() == [0, 4, 8, 12, 16]
    assert M.empty_beat_rate(second) == 0.5
    with pytest.raises(ValueError):
        M.bar_slice(hand, 1, 3)


def test_notes_from_score_merges_tracks_and_ignores_drums():
    s = symusic.Score(4)
    s.time_signatures.append(symusic.TimeSignature(0, 4, 4))
    a, b, drums = symusic.Track("a", 0, False), symusic.Track("b", 0, False), symusic.Track("d", 0, True)
    for t, d, p in zip(ONSET[:3], DUR[:3], PITCH[:3], strict=True):
        a.notes.append(symusic.Note(t, d, p, 80))
    for t, d, p in zip(ONSET[3:], DUR[3:], PITCH[3:], strict=True):
        b.notes.append(symusic.Note(t, d, p, 80))
    drums.notes.append(symusic.Note(2, 1, 36, 100))
    s.tracks.extend([a, b, drums])
    n = M.notes_from_score(s, n_bars=2)
    ref = M.note_array(ONSET, DUR, PITCH, tpq=4, n_bars=2)
    assert M.compute_metrics(n) == pytest.approx(M.compute_metrics(ref), nan_ok=True)


def _real_windows(name: str, count: int):
    tok = build_tokenizer()
    vocab = Vocab(tok)
    ids = encode_piano(load_piano_score(DEMO / name, tok), tok)
    windows = make_windows(ids, vocab, WindowSpec(context_bars=4, completion_bars=2))
    step = max(1, len(windows) // count)
    for w in windows[::step][:count]:
        n_bars = sum(1 for t in w.tokens[w.meta_len:] if t in vocab.bar_ids)
        yield decode_window(w.tokens, w.meta_len, tok, vocab), n_bars


@pytest.mark.parametrize("name", ["POP909_008.mid", "Maestro_1.mid"])
def test_real_midi_windows(name):
    for score, n_bars in _real_windows(name, 4):
        n = M.notes_from_score(score, n_bars=n_bars)
        assert n.n_bars == n_bars
        # Every decoded onset lies inside the bars the window's Bar tokens announce (REMI without rests).
        assert n.onset.size and int(n.onset.max()) < n.end
        m = M.compute_metrics(n)
        assert m["n_notes"] == score.note_num()
        assert 0.0 <= m["empty_beat_rate"] <= 1.0
        assert 0.0 <= m["groove_consistency"] <= 1.0
        assert 7 / 12 - 1e-9 <= m["scale_consistency"] <= 1.0  # the best of 24 scales beats a uniform spread
        pitches = [note.pitch for note in score.tracks[0].notes]
        assert m["pitch_range"] == max(pitches) - min(pitches)
        # Polyphony against symusic's own piano roll at tick resolution (MusPy's definition).
        roll = score.tracks[0].pianoroll(modes=["frame"], pitch_range=(0, 128))[0] > 0
        per_tick = roll.sum(axis=0)
        assert m["polyphony"] == pytest.approx(per_tick.sum() / np.count_nonzero(per_tick))
        # Empty beats against a direct count of beats holding an onset (4/4 or 2/4 pieces: beat = quarter).
        beats_with_onset = {note.time // score.tpq for note in score.tracks[0].notes}
        if all(ts.denominator == 4 for ts in score.time_signatures):
            assert m["empty_beat_rate"] == pytest.approx(1 - len(beats_with_onset) / n.n_beats)


def test_repeat_last_bars(hand):
    rep = M.repeat_last_bars(hand, 3)  # bars 0, 1 of the segment, then bar 0 again (cycling the last two)
    assert rep.bars.tolist() == [0, 16, 32, 48]
    assert rep.beats.tolist() == list(range(0, 49, 4))
    assert rep.onset.tolist() == [0, 0, 0, 8, 16, 26, 32, 32, 32, 40]
    last = M.repeat_last_bars(hand, 1)  # just the last bar
    assert last.onset.tolist() == [0, 10] and last.pitch.tolist() == [73, 66]
    # Repeating one bar twice gives a perfectly consistent groove.
    twice = M.concat_segments([last, last])
    assert twice.bars.tolist() == [0, 16, 32]
    assert M.groove_consistency(twice) == 1.0

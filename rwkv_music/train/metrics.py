"""Objective music metrics on note arrays, in the sense of MusPy (Dong et al., 2020) and the papers it cites.

Every metric is a pure function of a `NoteArray`: the notes of one segment (ticks relative to the segment's
first bar) plus the bar and beat grid they sit on. The grid matters because a generated completion is judged
over the bars it was asked for: two silent bars are two empty bars, not a zero-length piece.

Conventions shared by all metrics:
- a *beat* is one unit of the time signature's denominator (a quarter in 4/4, an eighth in 6/8), the same
  beat miditok's REMI positions count in;
- a metric that is undefined for a segment (the pitch range of no notes, the mean gap of a single onset)
  is NaN; aggregations use the defined values and report how many there were.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import symusic

# Pitch classes of the C major and C natural minor scales; other keys are rotations.
_MAJOR = np.array([1, 0, 1, 0, 1, 1, 0, 1, 0, 1, 0, 1], dtype=bool)
_MINOR = np.array([1, 0, 1, 1, 0, 1, 0, 1, 1, 0, 1, 0], dtype=bool)
SCALES = np.stack([np.roll(_MAJOR, k) for k in range(12)] + [np.roll(_MINOR, k) for k in range(12)])

METRIC_NAMES = (
    "n_notes",
    "pitch_range",
    "n_pitch_classes",
    "note_density",
    "mean_ioi",
    "polyphony",
    "empty_beat_rate",
    "groove_consistency",
    "scale_consistency",
)


@dataclass(frozen=True)
class NoteArray:
    """The notes of one segment and its bar/beat grid, all in ticks from the segment's start.

    `bars` holds the start tick of each bar followed by the segment's end (length n_bars + 1); `beats` the
    same for beats. Notes may extend past the end (a held chord); onsets are expected inside [0, end).
    """

    onset: np.ndarray
    duration: np.ndarray
    pitch: np.ndarray
    velocity: np.ndarray
    tpq: int
    bars: np.ndarray
    beats: np.ndarray

    @property
    def n_notes(self) -> int:
        return int(self.onset.size)

    @property
    def n_bars(self) -> int:
        return int(self.bars.size - 1)

    @property
    def n_beats(self) -> int:
        return int(self.beats.size - 1)

    @property
    def end(self) -> int:
        return int(self.bars[-1])


def bar_grid(tpq: int, time_signatures: Iterable[tuple[int, int, int]], n_bars: int | None = None,
             until: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Bar and beat start ticks for `n_bars` bars (or as many as needed to cover tick `until`).

    `time_signatures` are (tick, numerator, denominator); a signature takes effect at the first bar starting
    at or after its tick (a change inside a bar waits for the next barline, as in a score). No signature
    means 4/4.
    """
    sigs = sorted((int(t), int(n), int(d)) for t, n, d in time_signatures if n > 0 and d > 0)
    if not sigs or sigs[0][0] > 0:
        sigs.insert(0, (0, sigs[0][1], sigs[0][2]) if sigs else (0, 4, 4))
    bars, beats = [0], [0]
    pos, k, num, den = 0, 0, sigs[0][1], sigs[0][2]
    while (n_bars is None and (pos < until or len(bars) == 1)) or (n_bars is not None and len(bars) <= n_bars):
        while k < len(sigs) and sigs[k][0] <= pos:
            _, num, den = sigs[k]
            k += 1
        beat = tpq * 4 / den
        for i in range(1, num + 1):
            beats.append(round(pos + i * beat))
        pos = round(pos + num * beat)
        bars.append(pos)
    return np.asarray(bars, dtype=np.int64), np.asarray(beats, dtype=np.int64)


def note_array(onset, duration, pitch, velocity=None, *, tpq: int, time_signatures=((0, 4, 4),),
               n_bars: int | None = None) -> NoteArray:
    """Build a NoteArray from plain sequences (ticks); the grid covers `n_bars` bars or the last note's end."""
    onset = np.asarray(onset, dtype=np.int64).reshape(-1)
    duration = np.asarray(duration, dtype=np.int64).reshape(-1)
    pitch = np.asarray(pitch, dtype=np.int64).reshape(-1)
    velocity = (np.full_like(pitch, 64) if velocity is None else np.asarray(velocity, dtype=np.int64).reshape(-1))
    if not (onset.size == duration.size == pitch.size == velocity.size):
        raise ValueError("onset, duration, pitch and velocity must have the same length")
    until = int((onset + np.maximum(duration, 1)).max()) if onset.size else 0
    bars, beats = bar_grid(tpq, time_signatures, n_bars=n_bars, until=until)
    order = np.lexsort((pitch, onset))
    return NoteArray(onset[order], duration[order], pitch[order], velocity[order], int(tpq), bars, beats)


def notes_from_score(score: symusic.Score, n_bars: int | None = None) -> NoteArray:
    """All non-drum notes of a tick-based Score, on the grid of its time signatures.

    Tracks are merged (the project models one piano track). `n_bars` fixes the grid length; without it the
    grid covers the last note's end.
    """
    parts = [t.notes.numpy() for t in score.tracks if not t.is_drum and len(t.notes)]
    if parts:
        cols = {k: np.concatenate([p[k].astype(np.int64) for p in parts]) for k in ("time", "duration", "pitch",
                                                                                    "velocity")}
    else:
        cols = {k: np.zeros(0, dtype=np.int64) for k in ("time", "duration", "pitch", "velocity")}
    sigs = [(ts.time, ts.numerator, ts.denominator) for ts in score.time_signatures]
    return note_array(cols["time"], cols["duration"], cols["pitch"], cols["velocity"], tpq=int(score.tpq),
                      time_signatures=sigs or ((0, 4, 4),), n_bars=n_bars)


def bar_slice(notes: NoteArray, first: int, last: int) -> NoteArray:
    """Bars first..last-1 as their own segment (time 0 = bar `first`); a note belongs to the bar of its onset."""
    if not 0 <= first <= last <= notes.n_bars:
        raise ValueError(f"bars {first}..{last} outside the segment's {notes.n_bars} bars")
    t0, t1 = int(notes.bars[first]), int(notes.bars[last])
    keep = (notes.onset >= t0) & (notes.onset < t1)
    beats = notes.beats[(notes.beats >= t0) & (notes.beats <= t1)] - t0
    return NoteArray(notes.onset[keep] - t0, notes.duration[keep], notes.pitch[keep], notes.velocity[keep],
                     notes.tpq, notes.bars[first:last + 1] - t0, beats)


# --------------------------------------------------------------------------------------------- pitch metrics

def pitch_class_histogram(notes: NoteArray) -> np.ndarray:
    """Share of notes (onsets, not durations) in each of the 12 pitch classes, C = 0; all zeros if no notes."""
    counts = np.bincount(notes.pitch % 12, minlength=12).astype(np.float64)
    total = counts.sum()
    return counts / total if total else counts


def pitch_class_histogram_distance(a: NoteArray | np.ndarray, b: NoteArray | np.ndarray) -> float:
    """Total-variation distance between two pitch-class histograms: half the L1 distance, in [0, 1].

    0 means the same distribution of pitch classes, 1 disjoint pitch classes. A segment without notes has
    no distribution: two empty segments are at distance 0, an empty and a non-empty one at distance 1 (a
    silent completion of a sounding passage is as far off as it can be).
    """
    ha = pitch_class_histogram(a) if isinstance(a, NoteArray) else np.asarray(a, dtype=np.float64)
    hb = pitch_class_histogram(b) if isinstance(b, NoteArray) else np.asarray(b, dtype=np.float64)
    ea, eb = ha.sum() == 0, hb.sum() == 0
    if ea or eb:
        return 0.0 if ea and eb else 1.0
    return float(0.5 * np.abs(ha / ha.sum() - hb / hb.sum()).sum())


def pitch_range(notes: NoteArray) -> float:
    """Highest minus lowest MIDI pitch, in semitones (NaN without notes)."""
    return float(notes.pitch.max() - notes.pitch.min()) if notes.n_notes else float("nan")


def n_pitch_classes(notes: NoteArray) -> float:
    """Number of distinct pitch classes used (0 to 12)."""
    return float(np.unique(notes.pitch % 12).size)


def scale_consistency(notes: NoteArray) -> float:
    """The largest share of notes that fall in one scale, over the 12 major and 12 natural-minor scales.

    1.0 means every note fits some single major/minor key; random pitches give about 7/12. NaN without notes.
    """
    if not notes.n_notes:
        return float("nan")
    in_scale = SCALES[:, notes.pitch % 12]  # (24 scales, n notes)
    return float(in_scale.mean(axis=1).max())


def _union_length(starts: np.ndarray, ends: np.ndarray) -> int:
    """Total length covered by the union of half-open intervals [start, end)."""
    if starts.size == 0:
        return 0
    order = np.argsort(starts, kind="stable")
    s, e = starts[order], ends[order]
    total, cur_s, cur_e = 0, int(s[0]), int(e[0])
    for a, b in zip(s[1:].tolist(), e[1:].tolist(), strict=True):
        if a > cur_e:
            total += cur_e - cur_s
            cur_s, cur_e = a, b
        else:
            cur_e = max(cur_e, b)
    return total + cur_e - cur_s


def polyphony(notes: NoteArray) -> float:
    """Mean number of distinct pitches sounding at once, over the time when at least one pitch sounds.

    The MusPy definition on a piano roll at tick resolution, computed exactly from intervals: the summed
    length of each pitch's sounding time divided by the length of time anything sounds. A melody gives 1,
    block triads give 3. Notes count with their full duration, also past the segment's end. NaN without notes.
    """
    dur = np.maximum(notes.duration, 1)  # a zero-length note still sounds for a tick on a piano roll
    starts, ends = notes.onset, notes.onset + dur
    any_on = _union_length(starts, ends)
    if any_on == 0:
        return float("nan")
    per_pitch = sum(_union_length(starts[notes.pitch == p], ends[notes.pitch == p]) for p in np.unique(notes.pitch))
    return float(per_pitch / any_on)


# -------------------------------------------------------------------------------------------- rhythm metrics

def note_density(notes: NoteArray, per: str = "bar") -> float:
    """Notes per bar (`per="bar"`) or per beat (`per="beat"`) over the whole grid, silent bars included."""
    if per == "bar":
        return notes.n_notes / notes.n_bars if notes.n_bars else float("nan")
    if per == "beat":
        return notes.n_notes / notes.n_beats if notes.n_beats else float("nan")
    raise ValueError(f"per must be 'bar' or 'beat', not {per!r}")


def mean_ioi(notes: NoteArray) -> float:
    """Mean inter-onset interval in quarter notes: the mean gap between consecutive distinct onset times.

    A chord is one onset. NaN with fewer than two distinct onsets.
    """
    onsets = np.unique(notes.onset)
    if onsets.size < 2:
        return float("nan")
    return float(np.diff(onsets).mean() / notes.tpq)


def empty_beat_rate(notes: NoteArray) -> float:
    """Share of the grid's beats in which no note starts (MusPy's onset-based definition).

    A beat held over by a long note still counts as empty: the metric measures rhythmic activity.
    """
    if notes.n_beats == 0:
        return float("nan")
    idx = np.searchsorted(notes.beats, notes.onset, side="right") - 1
    idx = idx[(idx >= 0) & (idx < notes.n_beats)]
    return float(1.0 - np.unique(idx).size / notes.n_beats)


def groove_consistency(notes: NoteArray, steps_per_quarter: int = 8) -> float:
    """1 minus the mean Hamming distance between the onset patterns of neighbouring bars (Wu & Yang, 2020).

    Each bar becomes a binary vector over a grid of `steps_per_quarter` steps per quarter note (1 where a
    note starts); the distance between two neighbouring bars is the number of differing steps divided by
    the vector length. 1.0 means every bar has the same rhythm. Bars of different length (a meter change)
    are compared on the longer one's grid. NaN with fewer than two bars.
    """
    if notes.n_bars < 2:
        return float("nan")
    step = notes.tpq / steps_per_quarter
    lengths = [round((notes.bars[i + 1] - notes.bars[i]) / step) for i in range(notes.n_bars)]
    width = max(max(lengths), 1)
    patterns = np.zeros((notes.n_bars, width), dtype=bool)
    bar_of = np.searchsorted(notes.bars, notes.onset, side="right") - 1
    for bar, t in zip(bar_of.tolist(), notes.onset.tolist(), strict=True):
        if 0 <= bar < notes.n_bars:
            patterns[bar, min(int((t - notes.bars[bar]) // step), width - 1)] = True
    dist = (patterns[1:] != patterns[:-1]).mean(axis=1)
    return float(1.0 - dist.mean())


def compute_metrics(notes: NoteArray) -> dict[str, float]:
    """All metrics of METRIC_NAMES for one segment (density per bar)."""
    return {
        "n_notes": float(notes.n_notes),
        "pitch_range": pitch_range(notes),
        "n_pitch_classes": n_pitch_classes(notes),
        "note_density": note_density(notes, "bar"),
        "mean_ioi": mean_ioi(notes),
        "polyphony": polyphony(notes),
        "empty_beat_rate": empty_beat_rate(notes),
        "groove_consistency": groove_consistency(notes),
        "scale_consistency": scale_consistency(notes),
    }


# ------------------------------------------------------------------------------------------ segment building

def concat_segments(segments: list[NoteArray]) -> NoteArray:
    """Segments one after another (each shifted by the total length of those before it); same tpq required."""
    if not segments:
        raise ValueError("nothing to concatenate")
    tpq = segments[0].tpq
    if any(s.tpq != tpq for s in segments):
        raise ValueError("segments have different resolutions")
    offsets = np.cumsum([0] + [s.end for s in segments[:-1]])
    cat = lambda f: np.concatenate([f(s, o) for s, o in zip(segments, offsets, strict=True)])  # noqa: E731
    bars = np.concatenate([segments[0].bars[:1]] + [s.bars[1:] + o for s, o in zip(segments, offsets, strict=True)])
    beats = np.concatenate([segments[0].beats[:1]] + [s.beats[1:] + o for s, o in zip(segments, offsets,
                                                                                       strict=True)])
    return NoteArray(cat(lambda s, o: s.onset + o), cat(lambda s, o: s.duration), cat(lambda s, o: s.pitch),
                     cat(lambda s, o: s.velocity), tpq, bars, beats)


def repeat_last_bars(notes: NoteArray, n_bars: int) -> NoteArray:
    """`n_bars` bars made by repeating the segment's last `n_bars` bars (cycling if it has fewer)."""
    if notes.n_bars == 0:
        raise ValueError("the segment has no bars to repeat")
    k = min(n_bars, notes.n_bars)
    first = notes.n_bars - k
    return concat_segments([bar_slice(notes, first + i % k, first + i % k + 1) for i in range(n_bars)])


def sign_test(a: int, b: int) -> float:
    """Exact two-sided sign test: the chance of a split at least this uneven of a + b discordant cases, were each
    equally likely to go either way (1.0 for none)."""
    n, k = a + b, min(a, b)
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)

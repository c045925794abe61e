"""Key augmentation on REMI ids: a window moved up or down by whole semitones, still a valid window.

Transposing a piece leaves its rhythm, meter and dynamics alone and moves every pitch by the same interval, so
on REMI ids it is a lookup: each `Pitch_p` id becomes `Pitch_{p+k}`, every other id stays. A shift is allowed
only while every pitch of the window stays inside the tokenizer's pitch range (no note is dropped or folded
back an octave). Training draws one shift per window, so a corpus in few keys teaches the model every key.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from miditok import MusicTokenizer

MAX_TRANSPOSE = 24  # semitones: two octaves either way is more than any key augmentation needs


def check_transpose(n: object) -> int:
    """`n` as a largest shift in semitones (an int in 0..MAX_TRANSPOSE), else ValueError."""
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= MAX_TRANSPOSE:
        raise ValueError(f"transpose must be 0..{MAX_TRANSPOSE} semitones, got {n}")
    return n


class PitchShift:
    """Id remapping for transpositions under one tokenizer's vocabulary (token string -> id)."""

    def __init__(self, vocab: Mapping[str, int]) -> None:
        pitch_of = {i: int(t.split("_", 1)[1]) for t, i in vocab.items() if t.startswith("Pitch_")}
        if not pitch_of:
            raise ValueError("the vocabulary has no Pitch_ tokens to transpose")
        self.low, self.high = min(pitch_of.values()), max(pitch_of.values())
        if len(pitch_of) != self.high - self.low + 1:
            raise ValueError(f"Pitch_ tokens do not cover {self.low}..{self.high} without gaps")
        # pitch (or -1) of every id; one spare entry so out-of-vocabulary ids read as "not a pitch"
        self.pitch = np.full(max(vocab.values()) + 2, -1, dtype=np.int64)
        self.id_of = np.zeros(self.high - self.low + 1, dtype=np.int64)
        for i, p in pitch_of.items():
            self.pitch[i] = p
            self.id_of[p - self.low] = i

    def _pitches(self, tokens: np.ndarray) -> np.ndarray:
        """The pitch of each token, -1 where it is no Pitch token."""
        return self.pitch.take(np.asarray(tokens).astype(np.int64, copy=False), mode="clip")

    def _bounds(self, p: np.ndarray) -> tuple[int, int]:
        p = p[p >= 0]
        if p.size == 0:
            return -128, 128
        return self.low - int(p.min()), self.high - int(p.max())

    def bounds(self, tokens: np.ndarray) -> tuple[int, int]:
        """(lowest, highest) shift in semitones that keeps every pitch of `tokens` in range ((-inf, inf) as
        (-128, 128) for a window without pitches)."""
        return self._bounds(self._pitches(tokens))

    def apply(self, tokens: np.ndarray, semitones: int) -> np.ndarray:
        """A copy of `tokens` transposed by `semitones` (ValueError if a pitch would leave the range)."""
        tokens = np.asarray(tokens)
        if semitones == 0:
            return tokens.copy()
        p = self._pitches(tokens)
        lo, hi = self._bounds(p)
        if not lo <= semitones <= hi:
            raise ValueError(f"a shift of {semitones} semitones takes pitches outside {self.low}..{self.high}")
        out = tokens.copy()
        is_pitch = p >= 0
        out[is_pitch] = self.id_of[p[is_pitch] + semitones - self.low].astype(tokens.dtype)
        return out

    def draw(self, tokens: np.ndarray, max_semitones: int, rng) -> int:
        """A shift drawn uniformly from the allowed ones within +-max_semitones (0 is always allowed).

        One draw per call whatever the window, so the random stream does not depend on the data."""
        lo, hi = self.bounds(tokens)
        lo, hi = max(lo, -max_semitones), min(hi, max_semitones)
        u = rng.random()
        return lo + min(int(u * (hi - lo + 1)), hi - lo)


def pitch_shift_for(tokenizer: MusicTokenizer) -> PitchShift:
    """The PitchShift of a tokenizer whose ids can be transposed one by one; ValueError says why not.

    Refused: a trained (BPE/Unigram) vocabulary, whose ids stand for several tokens, and token kinds that carry a
    pitch in another form (pitch intervals, chord roots) or a drum under a Pitch id (programs with drums)."""
    cfg = tokenizer.config
    if getattr(tokenizer, "is_trained", False):
        raise ValueError("the tokenizer's vocabulary is trained (BPE/Unigram); its ids cannot be transposed one by one")
    for flag, what in (("use_pitch_intervals", "pitch intervals"), ("use_chords", "chord tokens")):
        if getattr(cfg, flag, False):
            raise ValueError(f"the tokenizer writes {what}, which transposing Pitch ids would not move")
    if getattr(cfg, "use_programs", False) and -1 in getattr(cfg, "programs", ()):
        raise ValueError("the tokenizer keeps drums (program -1) as Pitch ids; transposing would move them")
    return PitchShift(tokenizer.vocab)

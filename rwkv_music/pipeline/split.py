"""Deterministic train/val assignment by the piece's note content, so a piece never straddles splits."""

from __future__ import annotations

import hashlib

import numpy as np
import symusic

# Onsets and durations are compared on a grid of this many steps per quarter note: fine enough for 64th-note
# triplets, coarse enough that re-encoding at another ticks-per-quarter lands on the same steps.
GRID_PER_QUARTER = 96


def note_array(score: symusic.Score) -> np.ndarray:
    """(onset, duration, pitch) of every note of every track, onset/duration in grid steps, sorted: a view of the
    music that ignores tempo, ticks-per-quarter, velocity and how notes are spread over tracks."""
    parts = []
    for track in score.tracks:
        n = track.notes.numpy()
        if len(n["time"]):
            parts.append(np.stack([n["time"].astype(np.int64), n["duration"].astype(np.int64),
                                   n["pitch"].astype(np.int64)], axis=1))
    if not parts:
        return np.zeros((0, 3), dtype=np.int64)
    a = np.concatenate(parts)
    a[:, 0] = np.rint(a[:, 0] * GRID_PER_QUARTER / score.tpq)
    a[:, 1] = np.rint(a[:, 1] * GRID_PER_QUARTER / score.tpq)
    return a[np.lexsort((a[:, 1], a[:, 2], a[:, 0]))]


def note_content_hash(notes: np.ndarray) -> str:
    """sha256 of a piece's `note_array`: equal for re-encoded copies of the same notes (other tpq, tempo, track
    layout)."""
    a = np.ascontiguousarray(notes, dtype=np.int64)
    return hashlib.sha256(b"notes-v1\n" + a.tobytes()).hexdigest()


def assign_split(content_hash: str, val_fraction: float, seed: int) -> str:
    """'val' for a `val_fraction` share of contents (chosen by hash and seed), else 'train'."""
    u = int.from_bytes(hashlib.sha256(f"{seed}:{content_hash}".encode()).digest()[:8], "big") / 2**64
    return "val" if u < val_fraction else "train"

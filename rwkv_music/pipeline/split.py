"""Deterministic train/val assignment by the piece's note content, so a piece never straddles splits."""

from __future__ import annotations

import hashlib

import numpy as np
import symusic


def note_content_hash(score: symusic.Score) -> str:
    """sha256 over the merged piano track's notes (onset, duration, pitch, velocity) and the resolution."""
    h = hashlib.sha256(f"tpq={score.tpq}\n".encode())
    for track in score.tracks:
        notes = track.notes.numpy()
        for k in ("time", "duration", "pitch", "velocity"):
            h.update(np.ascontiguousarray(notes[k], dtype=np.int64).tobytes())
    return h.hexdigest()


def assign_split(content_hash: str, val_fraction: float, seed: int) -> str:
    """'val' for a `val_fraction` share of contents (chosen by hash and seed), else 'train'."""
    u = int.from_bytes(hashlib.sha256(f"{seed}:{content_hash}".encode()).digest()[:8], "big") / 2**64
    return "val" if u < val_fraction else "train"

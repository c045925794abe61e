"""The one piano-roll drawing of the project (`complete --plot` and `eval`'s report use it).

The x axis counts bars, not quarter notes: the bar grid (time signatures in force) is what the model is asked
for, so a 6/8 bar and a 4/4 bar are each one unit wide, bar lines fall on integers, and the last bar is drawn to
its end even when it is silent (a completion of rests still shows its bars).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from rwkv_music.atomic import atomic_path


@dataclass(frozen=True)
class RollLayer:
    """Notes drawn in one colour; times in ticks on the grid's clock."""

    onset: np.ndarray
    duration: np.ndarray
    pitch: np.ndarray
    colour: str
    label: str


def layer(notes, colour: str, label: str, offset: int = 0) -> RollLayer:
    """A layer of a `metrics.NoteArray` (or anything with onset/duration/pitch arrays), shifted by `offset` ticks."""
    return RollLayer(np.asarray(notes.onset) + offset, np.asarray(notes.duration), np.asarray(notes.pitch), colour,
                     label)


def ticks_to_bars(ticks: np.ndarray, bars: np.ndarray) -> np.ndarray:
    """Tick -> position in bars (bar k starts at k), linear inside each bar; past the grid's end, clipped to it."""
    return np.interp(np.asarray(ticks, dtype=np.float64), bars.astype(np.float64), np.arange(len(bars),
                                                                                              dtype=np.float64))


def draw_roll(ax, layers: Sequence[RollLayer], bars: np.ndarray, marks: Sequence[int] = (),
              empty_text: str | None = None) -> None:
    """Draw `layers` on `ax` over the bar grid `bars` (start tick of each bar, then the end: n_bars + 1 entries).

    Bar lines at every bar, a dashed line at each tick of `marks` (where a continuation starts); notes held past
    the grid's end are cut there. `empty_text` is written in the plot when no layer has a note."""
    bars = np.asarray(bars)
    pitches: list[int] = []
    for ly in layers:
        if ly.onset.size == 0:
            continue
        x0 = ticks_to_bars(ly.onset, bars)
        x1 = ticks_to_bars(ly.onset + np.maximum(ly.duration, 1), bars)
        ax.barh(ly.pitch, np.maximum(x1 - x0, 1e-3), left=x0, height=0.8, color=ly.colour, edgecolor="black",
                linewidth=0.3, label=ly.label)
        pitches += ly.pitch.tolist()
    n = len(bars) - 1
    for k in range(n + 1):
        ax.axvline(k, color="0.85", linewidth=0.6, zorder=0)
    for m in marks:
        ax.axvline(float(ticks_to_bars(np.array([m]), bars)[0]), color="black", linewidth=1.2, linestyle="--")
    if pitches:
        ax.set_ylim(min(pitches) - 2, max(pitches) + 2)
    elif empty_text:
        ax.text(0.5, 0.5, empty_text, transform=ax.transAxes, ha="center", va="center")
    ax.set_xlim(0, max(n, 1))
    ax.set_xticks(range(max(n, 1) + 1))


def save_figure(fig, path: str | os.PathLike) -> None:
    """Write a matplotlib Figure as PNG, atomically (the umask's file mode)."""
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")

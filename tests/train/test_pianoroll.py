"""The one piano roll (`train/pianoroll.py`): bars on the x axis, the last bar drawn to its end, for both callers."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from rwkv_music.train import metrics as M
from rwkv_music.train.pianoroll import draw_roll, layer, ticks_to_bars


def test_bar_axis_follows_the_meter():
    # A 3/4 bar then two 4/4 bars at 480 ticks per quarter: 1440, 1920, 1920 ticks wide, one unit each.
    bars, _ = M.bar_grid(480, [(0, 3, 4), (1440, 4, 4)], n_bars=3)
    assert bars.tolist() == [0, 1440, 3360, 5280]
    assert ticks_to_bars(bars, bars).tolist() == [0, 1, 2, 3]
    assert ticks_to_bars(np.array([720, 1440 + 960, 9999]), bars).tolist() == [0.5, 1.5, 3.0]  # cut at the end


def test_silent_last_bars_are_drawn_to_the_end():
    notes = M.note_array([0, 480], [480, 480], [60, 64], tpq=480, n_bars=4)  # notes in bar 0 only
    fig = Figure()
    ax = fig.subplots()
    draw_roll(ax, [layer(notes, "#999999", "ctx")], notes.bars, marks=[int(notes.bars[2])])
    assert ax.get_xlim() == (0.0, 4.0)
    xs = sorted(line.get_xdata()[0] for line in ax.get_lines())
    assert xs == [0, 1, 2, 2, 3, 4]  # five bar lines and the dashed mark at bar 2
    widths = sorted(round(p.get_width(), 6) for p in ax.patches)
    assert widths == [0.25, 0.25]  # a quarter note is a quarter of a 4/4 bar


def test_no_notes_is_a_labelled_empty_roll():
    notes = M.note_array([], [], [], tpq=480, n_bars=2)
    fig = Figure()
    ax = fig.subplots()
    draw_roll(ax, [layer(notes, "k", "none")], notes.bars, empty_text="(no valid output)")
    assert ax.get_xlim() == (0.0, 2.0) and [t.get_text() for t in ax.texts] == ["(no valid output)"]

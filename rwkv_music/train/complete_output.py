"""Files and summaries of a completion: MIDI per sample, optional piano-roll PNGs, the sample table.

Everything is written to a staging directory next to OUT first and moved into OUT only when all files exist,
so a failure never leaves half a result behind.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import symusic

from rwkv_music.atomic import default_file_mode
from rwkv_music.train.cli_util import clear_own_files
from rwkv_music.train.complete import Completion, Sample
from rwkv_music.train.metrics import bar_grid
from rwkv_music.train.pianoroll import RollLayer, draw_roll

PROMPT_COLOUR = "#4c72b0"
CONTINUATION_COLOUR = "#dd8452"
_NAMES = ["C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B"]


def note_name(pitch: int) -> str:
    return f"{_NAMES[pitch % 12]}{pitch // 12 - 1}"


def sample_stats(s: Sample) -> dict:
    """Notes, bars and pitch range of a sample's continuation."""
    notes = [n for tr in s.continuation.tracks for n in tr.notes]
    pitches = [n.pitch for n in notes]
    lo, hi = (min(pitches), max(pitches)) if pitches else (None, None)
    return {"sample": s.index, "seed": s.seed, "tokens": len(s.tokens), "notes": len(notes), "bars": s.bars,
            "pitch_min": lo, "pitch_max": hi, "candidate": s.candidate}


def format_table(completion: Completion) -> str:
    """A plain-text table, one row per sample."""
    kept = any(s.candidate is not None for s in completion.samples)  # the candidate column, where one was chosen
    head = f"{'sample':>6} {'seed':>6}{' kept' if kept else ''} {'tokens':>6} {'notes':>5} {'bars':>4}  pitch range"
    rows = [head]
    for s in completion.samples:
        st = sample_stats(s)
        rng = "-" if st["pitch_min"] is None else (
            f"{note_name(st['pitch_min'])}-{note_name(st['pitch_max'])} ({st['pitch_min']}-{st['pitch_max']})")
        cand = f" {st['candidate']:>4}" if kept else ""
        rows.append(f"{st['sample']:>6} {st['seed']:>6}{cand} {st['tokens']:>6} {st['notes']:>5} {st['bars']:>4}  "
                    f"{rng}")
    return "\n".join(rows)


def write_completion(completion: Completion, out: str | os.PathLike, plot: bool = False,
                     clear: Sequence[str] = ()) -> list[Path]:
    """Write OUT/sample-K.mid, OUT/sample-K-continuation.mid (and OUT/sample-K.png). Returns the paths.

    Files of OUT matching a `clear` pattern are deleted once the new files are staged, just before they move in,
    so no file of an earlier run is left beside them. Files get the umask's mode, like any `open()`."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        names = []
        for s in completion.samples:
            k = s.index
            s.score.dump_midi(str(stage / f"sample-{k}.mid"))
            s.continuation.dump_midi(str(stage / f"sample-{k}-continuation.mid"))
            names += [f"sample-{k}.mid", f"sample-{k}-continuation.mid"]
            if plot:
                plot_piano_roll(s, stage / f"sample-{k}.png")
                names.append(f"sample-{k}.png")
        out.mkdir(exist_ok=True)
        clear_own_files(out, clear)
        mode = default_file_mode()
        paths = []
        for name in names:
            os.chmod(stage / name, mode)  # whatever the writer did, the mode a plain open() gives
            os.replace(stage / name, out / name)
            paths.append(out / name)
        return paths
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def plot_piano_roll(s: Sample, path: str | os.PathLike) -> None:
    """Write `piano_roll_figure(s)` as a PNG."""
    piano_roll_figure(s).savefig(str(path))


def piano_roll_figure(s: Sample):
    """The model's view: the prompt window's bars and the continuation, in two colours, on a bar axis."""
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no GUI backend
    from matplotlib.patches import Patch

    score: symusic.Score = s.window_score
    sigs = [(t.time, t.numerator, t.denominator) for t in score.time_signatures] or [(0, 4, 4)]
    # The window's own bars end where the continuation starts; then come the continuation's s.bars bars.
    ctx_grid, _ = bar_grid(score.tpq, sigs, until=s.window_continuation_tick)
    n_ctx = int(np.searchsorted(ctx_grid, s.window_continuation_tick))
    bars, _ = bar_grid(score.tpq, sigs, n_bars=n_ctx + s.bars)
    layers = []
    for tr in score.tracks:
        a = tr.notes.numpy()
        colour, label = ((CONTINUATION_COLOUR, "continuation") if tr.name == "continuation"
                         else (PROMPT_COLOUR, "prompt (context bars)"))
        layers.append(RollLayer(a["time"].astype(np.int64), a["duration"].astype(np.int64),
                                a["pitch"].astype(np.int64), colour, label))
    fig = Figure(figsize=(12, 4.5), dpi=100)
    ax = fig.subplots()
    draw_roll(ax, layers, bars, marks=[s.window_continuation_tick], empty_text="(no notes)")
    ax.set_xlabel("bars from the start of the prompt window (dashed: the continuation starts)")
    ax.set_ylabel("MIDI pitch")
    ax.set_title(f"sample {s.index} (seed {s.seed}): {s.bars} new bar(s)", loc="left")
    ax.legend(handles=[Patch(color=PROMPT_COLOUR, label="prompt (context bars)"),
                       Patch(color=CONTINUATION_COLOUR, label="continuation")], loc="lower right",
              bbox_to_anchor=(1.0, 1.0), ncol=2, fontsize=8, frameon=False)
    fig.tight_layout()
    return fig

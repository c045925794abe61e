"""Bar-aligned windows over a REMI token stream: the one sample format of the project.

A window is `[meta][context bars][completion bars]`. `meta` is the TimeSig and Tempo tokens in force at the
window's first bar, so a window cut from the middle of a piece still says its meter and speed; with a tokenizer
that has BarPhase tokens (`musicprep build-shards --bar-phase P`), also `BarPhase_k`, k the window's first bar in
the piece modulo P, so the model knows where in a phrase it starts (in the music21 folk tunes, the phrase's opening
bars come back at its fifth bar far more often than elsewhere: docs/results.md). Training
samples (`make_windows`, or `window_spans` for the pipeline's array slicing) and generation prompts
(`build_prompt`) are all located by `_locate`, so the model sees the same format in both.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # only annotations: importing miditok here would load it (and torch) in every importer
    import symusic
    from miditok import REMI

META_LEN = 2  # TimeSig, Tempo; a tokenizer with BarPhase tokens adds a third (Vocab.meta_len)
BAR_PHASE = "BarPhase"  # BarPhase_0 .. BarPhase_{P-1}: special tokens of the tokenizer, present or not


@dataclass(frozen=True)
class WindowSpec:
    context_bars: int = 4
    completion_bars: int = 2
    stride_bars: int = 1
    max_seq_len: int = 2048

    def __post_init__(self):
        if self.context_bars < 0 or self.completion_bars < 1 or self.stride_bars < 1:
            raise ValueError("need context_bars >= 0, completion_bars >= 1, stride_bars >= 1")
        if self.max_seq_len < META_LEN + 2:
            raise ValueError(f"max_seq_len must be at least {META_LEN + 2}")


@dataclass(frozen=True)
class Window:
    tokens: list[int]
    meta_len: int
    ctx_len: int  # meta + context tokens (after truncation)
    completion_len: int
    window: int  # index of the window within its piece
    first_bar: int  # piece bar index of the first context bar kept (after truncation)


@dataclass
class WindowStats:
    too_short: int = 0  # pieces with fewer than context + completion bars
    dropped: int = 0  # windows whose meta + completion alone exceed max_seq_len
    truncated: int = 0  # windows that lost leading context bars
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class WindowSpan:
    """Where a window lies in its piece: the tokens are `meta` followed by `ids[start:end]`.

    The pipeline slices samples straight from the piece's token array with it, instead of building each
    overlapping window's token list (about 6x the piece with the default stride)."""

    meta: tuple[int, ...]  # TimeSig, Tempo ids in force at the first kept bar (+ its BarPhase id)
    start: int  # token index of the first kept context bar
    end: int  # token index where the completion ends
    ctx_len: int
    completion_len: int
    window: int
    first_bar: int

    @property
    def meta_len(self) -> int:
        return len(self.meta)


@dataclass(frozen=True)
class BarIndex:
    """Where each bar starts in the token stream, and the meta tokens in force there."""

    starts: list[int]  # token index of each Bar token
    end: int  # len(ids)
    meta: list[tuple[int, int]]  # (TimeSig id, Tempo id) in force at each bar
    phase_ids: tuple[int, ...] = ()  # BarPhase_0 .. BarPhase_{P-1} ids, or none

    @property
    def meta_len(self) -> int:
        return meta_len_of(self.phase_ids)

    def meta_at(self, bar: int, bar_offset: int = 0) -> tuple[int, ...]:
        """The meta tokens of a window whose first bar is `bar` (`bar_offset` bars into the piece before it)."""
        meta = self.meta[min(bar, self.n_bars - 1)]
        if self.phase_ids:
            meta = (*meta, self.phase_ids[(bar + bar_offset) % len(self.phase_ids)])
        return meta

    @property
    def n_bars(self) -> int:
        return len(self.starts)

    def at(self, bar: int) -> int:
        """Token index where bar `bar` starts (the stream's end for bar == n_bars)."""
        return self.starts[bar] if bar < self.n_bars else self.end


# Token classes: the one classification of token ids (the grammar, the windows and the evaluation use it).
OTHER, BAR, TIMESIG, POSITION, TEMPO, PITCH, VELOCITY, DURATION, REST, PEDAL, PEDALOFF, PAD, BARPHASE = range(13)
N_CLASSES = 13
CLASS_OF_PREFIX = {
    "Bar": BAR, "TimeSig": TIMESIG, "Position": POSITION, "Tempo": TEMPO, "Pitch": PITCH,
    "Velocity": VELOCITY, "Duration": DURATION, "Rest": REST, "Pedal": PEDAL, "PedalOff": PEDALOFF, "PAD": PAD,
    BAR_PHASE: BARPHASE,
}
CLASS_NAMES = {v: k for k, v in CLASS_OF_PREFIX.items()} | {OTHER: "Other"}


def token_class(name: str) -> int:
    """The class of a token by its name: the part before the first underscore (``Pitch_60`` -> PITCH)."""
    return CLASS_OF_PREFIX.get(name.partition("_")[0], OTHER)


def token_classes(vocab: dict[str, int]) -> np.ndarray:
    """The class of every token id of a vocabulary (ids without a token are OTHER)."""
    cls = np.full(max(vocab.values()) + 1 if vocab else 0, OTHER, np.int64)
    for name, i in vocab.items():
        cls[i] = token_class(name)
    return cls


_OTHER, _BAR, _TIMESIG, _TEMPO = 0, 1, 2, 3  # index_bars' kinds: only the tokens it looks at


class Vocab:
    """Token-type lookups for one tokenizer (cheap to build, keep one per tokenizer)."""

    def __init__(self, tokenizer: REMI):
        self.cls = token_classes(tokenizer.vocab)
        self.bar_ids, self.timesig_ids, self.tempo_ids, self.position_ids = (
            frozenset(np.flatnonzero(self.cls == c).tolist()) for c in (BAR, TIMESIG, TEMPO, POSITION))
        # Token id -> BAR/TIMESIG/TEMPO/OTHER, so that index_bars finds the few tokens it needs with numpy.
        # One spare OTHER entry at the end: out-of-range ids are clipped onto it.
        self.kinds = np.full(max(tokenizer.vocab.values()) + 2, _OTHER, dtype=np.uint8)
        for ids, kind in ((self.bar_ids, _BAR), (self.timesig_ids, _TIMESIG), (self.tempo_ids, _TEMPO)):
            self.kinds[list(ids)] = kind
        self.position0 = tokenizer.vocab["Position_0"]
        self.bar = tokenizer.vocab["Bar_None"]
        self.default_timesig = tokenizer.vocab.get("TimeSig_4/4", min(self.timesig_ids))
        tempos = {i: float(t.split("_", 1)[1]) for t, i in tokenizer.vocab.items() if t.startswith("Tempo_")}
        self.default_tempo = min(tempos, key=lambda i: abs(tempos[i] - 120.0))
        self.phase_ids = bar_phase_ids(tokenizer.vocab)

    @property
    def meta_len(self) -> int:
        return meta_len_of(self.phase_ids)


def meta_len_of(phase_ids: tuple[int, ...]) -> int:
    """Meta tokens of a window: TimeSig and Tempo, and the BarPhase where the tokenizer has those tokens."""
    return META_LEN + (1 if phase_ids else 0)


def bar_phase_ids(vocab: dict[str, int]) -> tuple[int, ...]:
    """The ids of BarPhase_0 .. BarPhase_{P-1} in order (empty without them); a gap or stray name is an error."""
    phases = {}
    for name, i in vocab.items():
        if token_class(name) == BARPHASE:
            value = name.partition("_")[2]
            if not value.isdigit():
                raise ValueError(f"bad bar-phase token {name!r}: expected {BAR_PHASE}_<n>")
            phases[int(value)] = i
    if sorted(phases) != list(range(len(phases))):
        raise ValueError(f"the tokenizer's {BAR_PHASE} tokens must be {BAR_PHASE}_0 .. {BAR_PHASE}_<P-1>, "
                         f"found {sorted(phases)}")
    return tuple(phases[k] for k in range(len(phases)))


def index_bars(ids: list[int] | np.ndarray, vocab: Vocab) -> BarIndex:
    """Find bar starts and the TimeSig/Tempo in force at each.

    Only the Bar, TimeSig and Tempo tokens matter (a few percent of a stream), so they are located with numpy
    and walked in order in Python.
    """
    arr = np.asarray(ids, dtype=np.int64)
    kinds = vocab.kinds.take(arr, mode="clip") if len(arr) else np.zeros(0, dtype=np.uint8)
    at = np.flatnonzero(kinds)
    starts: list[int] = []
    meta: list[tuple[int, int]] = []
    timesig, tempo = None, None
    first_tempo = None
    for i, kind, t in zip(at.tolist(), kinds[at].tolist(), arr[at].tolist(), strict=True):
        if kind == _BAR:
            starts.append(i)
            meta.append((timesig, tempo))
        elif kind == _TIMESIG:
            timesig = t
            if starts and starts[-1] == i - 1:
                # REMI writes the bar's signature right after its Bar token: it is in force at the bar.
                meta[-1] = (t, meta[-1][1])
        else:
            tempo = t
            if first_tempo is None:
                first_tempo = t
            # A tempo change at the very start of a bar (Bar [TimeSig] Position_0 Tempo) is in force there.
            if starts and _at_bar_start(ids, starts[-1], i, vocab):
                meta[-1] = (meta[-1][0], t)
    resolved = []
    for ts, tp in meta:
        resolved.append((ts if ts is not None else vocab.default_timesig,
                         tp if tp is not None else (first_tempo or vocab.default_tempo)))
    return BarIndex(starts, len(ids), resolved, vocab.phase_ids)


def _at_bar_start(ids: list[int] | np.ndarray, bar_at: int, tempo_at: int, vocab: Vocab) -> bool:
    between = ids[bar_at + 1:tempo_at]
    between = [t for t in between if t not in vocab.timesig_ids]
    return between == [vocab.position0]


def _locate(bars: BarIndex, first: int, ctx_end: int, end: int, max_seq_len: int,
            index: int = 0, bar_offset: int = 0) -> WindowSpan | None:
    """The span of bars first..end-1 (context up to ctx_end), leading context bars dropped until it fits."""
    meta_len = bars.meta_len
    c0, c1 = bars.at(ctx_end), bars.at(end)
    if meta_len + (c1 - c0) > max_seq_len:
        return None
    while first < ctx_end and meta_len + (c1 - bars.at(first)) > max_seq_len:
        first += 1
    ctx_start = bars.at(first)
    return WindowSpan(meta=bars.meta_at(first, bar_offset), start=ctx_start, end=c1,
                      ctx_len=meta_len + (c0 - ctx_start), completion_len=c1 - c0, window=index, first_bar=first)


def _window(ids: list[int], span: WindowSpan) -> Window:
    return Window(tokens=[*span.meta, *ids[span.start:span.end]], meta_len=span.meta_len, ctx_len=span.ctx_len,
                  completion_len=span.completion_len, window=span.window, first_bar=span.first_bar)


def assemble(ids: list[int], bars: BarIndex, first: int, ctx_end: int, end: int,
             max_seq_len: int, bar_offset: int = 0) -> Window | None:
    """Meta + bars first..ctx_end-1 (context) + bars ctx_end..end-1 (completion), truncated to max_seq_len
    by dropping whole leading context bars; None if meta + completion alone do not fit. `bar_offset`: bars of
    the piece before `ids` begins (for the BarPhase token)."""
    span = _locate(bars, first, ctx_end, end, max_seq_len, bar_offset=bar_offset)
    return None if span is None else _window(ids, span)


def window_spans(bars: BarIndex, spec: WindowSpec, stats: WindowStats | None = None) -> list[WindowSpan]:
    """Where all training windows of one piece lie, in order (see make_windows)."""
    stats = stats if stats is not None else WindowStats()
    need = spec.context_bars + spec.completion_bars
    if bars.n_bars < need:
        stats.too_short += 1
        return []
    out: list[WindowSpan] = []
    for start in range(0, bars.n_bars - need + 1, spec.stride_bars):
        ctx_end = start + spec.context_bars
        span = _locate(bars, start, ctx_end, ctx_end + spec.completion_bars, spec.max_seq_len, len(out))
        if span is None:
            stats.dropped += 1
            continue
        if span.first_bar != start:
            stats.truncated += 1
        out.append(span)
    return out


def make_windows(ids: list[int], vocab: Vocab, spec: WindowSpec, stats: WindowStats | None = None) -> list[Window]:
    """All training windows of one piece, in order."""
    return [_window(ids, span) for span in window_spans(index_bars(ids, vocab), spec, stats)]


def build_prompt(ids: list[int], vocab: Vocab, context_bars: int | None, max_seq_len: int,
                 first_bar: int = 0) -> Window:
    """The model input for completing a piece: meta + its last `context_bars` bars (None = all).

    Same assembly as training windows with an empty completion, so train and inference agree. `first_bar`: the
    piece's bar number where `ids` begins (0: the prompt is the piece's start), which sets the BarPhase token of
    tokenizers that have one. Raises ValueError when the piece has fewer bars than asked for.
    """
    bars = index_bars(ids, vocab)
    if bars.n_bars == 0:
        raise ValueError("the prompt has no bars")
    n = bars.n_bars if context_bars is None else context_bars
    if n > bars.n_bars:
        raise ValueError(f"the prompt has {bars.n_bars} bar(s), fewer than the {n} context bars asked for")
    if first_bar < 0:
        raise ValueError(f"first_bar must be >= 0, not {first_bar}")
    w = assemble(ids, bars, bars.n_bars - n, bars.n_bars, bars.n_bars, max_seq_len, bar_offset=first_bar)
    assert w is not None  # an empty completion always fits
    return w


def replay_last_bars(tokens: Sequence[int], meta_len: int, ctx_len: int, vocab: Vocab,
                     skip: int = 0) -> list[int] | None:
    """The completion that only replays the context: its last bars, as many as the completion has (cycled if the
    context has fewer); None without a context or completion bar. With `skip` > 0 the replayed bars end `skip`
    bars before the context does, and are not cycled (None if the context has too few).

    Whole bar spans are copied (Bar, its TimeSig, positions, notes), so the result is a grammatical REMI stream:
    the forced choice's `repeat` impostor and the negative of fit's `--repeat-contrast` (skip 0), and the forced
    choice's `earlier` impostor (skip = the completion's bars), a copy the training term never sees."""
    completion = np.asarray(tokens[ctx_len:], dtype=np.int64)
    n_bars = int((vocab.kinds.take(completion, mode="clip") == _BAR).sum())
    body = np.asarray(tokens[meta_len:ctx_len], dtype=np.int64).tolist()
    bars = index_bars(body, vocab)
    if bars.n_bars == 0 or n_bars < 1 or skip < 0 or (skip and bars.n_bars < skip + n_bars):
        return None
    k = n_bars if skip else min(n_bars, bars.n_bars)
    first = bars.n_bars - skip - k
    out: list[int] = []
    for i in range(n_bars):
        b = first + i % k
        out += body[bars.at(b):bars.at(b + 1)]
    return out


def decodable_tokens(tokens: list[int], meta_len: int, vocab: Vocab) -> list[int]:
    """Rewrite `[TimeSig, Tempo(, BarPhase)] Bar ...` as the stream miditok decodes: `Bar TimeSig Position_0 Tempo
    ...` (a BarPhase token says nothing about the notes and is left out)."""
    if meta_len == 0:
        return list(tokens)
    timesig, tempo = tokens[0], tokens[1]
    body = list(tokens[meta_len:])
    if not body or body[0] not in vocab.bar_ids:
        body = [vocab.bar, *body]
    rest = body[1:]
    if rest and rest[0] in vocab.timesig_ids:
        timesig, rest = rest[0], rest[1:]
    return [body[0], timesig, vocab.position0, tempo, *rest]


def decode_window(tokens: list[int], meta_len: int, tokenizer: REMI, vocab: Vocab | None = None) -> symusic.Score:
    """Tokens of a window (or prompt + continuation) back to a Score whose time 0 is the window's first bar."""
    vocab = vocab or Vocab(tokenizer)
    return tokenizer.decode([decodable_tokens(tokens, meta_len, vocab)])

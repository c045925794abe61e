"""Bar-aligned windows over a REMI token stream: the one sample format of the project.

A window is `[meta][context bars][completion bars]`. `meta` is the TimeSig and Tempo tokens in force at the
window's first bar, so a window cut from the middle of a piece still says its meter and speed. Training
samples (`make_windows`) and generation prompts (`build_prompt`) are both built by `assemble`, so the model
sees the same format in both.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import symusic
from miditok import REMI

META_LEN = 2  # TimeSig, Tempo


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
class BarIndex:
    """Where each bar starts in the token stream, and the meta tokens in force there."""

    starts: list[int]  # token index of each Bar token
    end: int  # len(ids)
    meta: list[tuple[int, int]]  # (TimeSig id, Tempo id) in force at each bar

    @property
    def n_bars(self) -> int:
        return len(self.starts)

    def at(self, bar: int) -> int:
        """Token index where bar `bar` starts (the stream's end for bar == n_bars)."""
        return self.starts[bar] if bar < self.n_bars else self.end


class Vocab:
    """Token-type lookups for one tokenizer (cheap to build, keep one per tokenizer)."""

    def __init__(self, tokenizer: REMI):
        self.bar_ids = frozenset(i for t, i in tokenizer.vocab.items() if t.startswith("Bar_"))
        self.timesig_ids = frozenset(i for t, i in tokenizer.vocab.items() if t.startswith("TimeSig_"))
        self.tempo_ids = frozenset(i for t, i in tokenizer.vocab.items() if t.startswith("Tempo_"))
        self.position_ids = frozenset(i for t, i in tokenizer.vocab.items() if t.startswith("Position_"))
        self.position0 = tokenizer.vocab["Position_0"]
        self.bar = tokenizer.vocab["Bar_None"]
        self.default_timesig = tokenizer.vocab.get("TimeSig_4/4", min(self.timesig_ids))
        tempos = {i: float(t.split("_", 1)[1]) for t, i in tokenizer.vocab.items() if t.startswith("Tempo_")}
        self.default_tempo = min(tempos, key=lambda i: abs(tempos[i] - 120.0))


def index_bars(ids: list[int], vocab: Vocab) -> BarIndex:
    """Find bar starts and the TimeSig/Tempo in force at each (one linear pass)."""
    starts: list[int] = []
    meta: list[tuple[int, int]] = []
    timesig, tempo = None, None
    first_tempo = None
    for i, t in enumerate(ids):
        if t in vocab.bar_ids:
            starts.append(i)
            meta.append((timesig, tempo))
        elif t in vocab.timesig_ids:
            timesig = t
            if starts and starts[-1] == i - 1:
                # REMI writes the bar's signature right after its Bar token: it is in force at the bar.
                meta[-1] = (t, meta[-1][1])
        elif t in vocab.tempo_ids:
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
    return BarIndex(starts, len(ids), resolved)


def _at_bar_start(ids: list[int], bar_at: int, tempo_at: int, vocab: Vocab) -> bool:
    between = ids[bar_at + 1:tempo_at]
    between = [t for t in between if t not in vocab.timesig_ids]
    return between == [vocab.position0]


def assemble(ids: list[int], bars: BarIndex, first: int, ctx_end: int, end: int,
             max_seq_len: int) -> Window | None:
    """Meta + bars first..ctx_end-1 (context) + bars ctx_end..end-1 (completion), truncated to max_seq_len
    by dropping whole leading context bars; None if meta + completion alone do not fit."""
    c0, c1 = bars.at(ctx_end), bars.at(end)
    if META_LEN + (c1 - c0) > max_seq_len:
        return None
    while first < ctx_end and META_LEN + (c1 - bars.at(first)) > max_seq_len:
        first += 1
    meta = list(bars.meta[min(first, bars.n_bars - 1)])
    ctx_start = bars.at(first)
    tokens = meta + ids[ctx_start:c1]
    return Window(tokens=tokens, meta_len=META_LEN, ctx_len=META_LEN + (c0 - ctx_start),
                  completion_len=c1 - c0, window=0, first_bar=first)


def make_windows(ids: list[int], vocab: Vocab, spec: WindowSpec, stats: WindowStats | None = None) -> list[Window]:
    """All training windows of one piece, in order."""
    stats = stats if stats is not None else WindowStats()
    bars = index_bars(ids, vocab)
    need = spec.context_bars + spec.completion_bars
    if bars.n_bars < need:
        stats.too_short += 1
        return []
    out: list[Window] = []
    for start in range(0, bars.n_bars - need + 1, spec.stride_bars):
        ctx_end = start + spec.context_bars
        w = assemble(ids, bars, start, ctx_end, ctx_end + spec.completion_bars, spec.max_seq_len)
        if w is None:
            stats.dropped += 1
            continue
        if w.first_bar != start:
            stats.truncated += 1
        out.append(Window(w.tokens, w.meta_len, w.ctx_len, w.completion_len, len(out), w.first_bar))
    return out


def build_prompt(ids: list[int], vocab: Vocab, context_bars: int | None, max_seq_len: int) -> Window:
    """The model input for completing a piece: meta + its last `context_bars` bars (None = all).

    Same assembly as training windows with an empty completion, so train and inference agree. Raises
    ValueError when the piece has fewer bars than asked for.
    """
    bars = index_bars(ids, vocab)
    if bars.n_bars == 0:
        raise ValueError("the prompt has no bars")
    n = bars.n_bars if context_bars is None else context_bars
    if n > bars.n_bars:
        raise ValueError(f"the prompt has {bars.n_bars} bar(s), fewer than the {n} context bars asked for")
    w = assemble(ids, bars, bars.n_bars - n, bars.n_bars, bars.n_bars, max_seq_len)
    assert w is not None  # an empty completion always fits
    return w


def decodable_tokens(tokens: list[int], meta_len: int, vocab: Vocab) -> list[int]:
    """Rewrite `[TimeSig, Tempo] Bar ...` as the stream miditok decodes: `Bar TimeSig Position_0 Tempo ...`."""
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

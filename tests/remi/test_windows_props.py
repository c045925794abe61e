"""Property tests of bar-aligned windowing and truncation on synthetic REMI streams (real vocabulary)."""

from __future__ import annotations

import functools

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rwkv_music.remi.tokenizer import build_tokenizer
from rwkv_music.remi.windows import META_LEN, Vocab, WindowSpec, WindowStats, build_prompt, make_windows


@functools.lru_cache(maxsize=1)
def vocab_and_names():
    tok = build_tokenizer()
    return Vocab(tok), tok.vocab


def ids_of(prefix: str) -> list[int]:
    _, names = vocab_and_names()
    return sorted(i for t, i in names.items() if t.startswith(prefix))


@st.composite
def remi_stream(draw):
    """A REMI-like stream: every bar is `Bar TimeSig [Position_0 Tempo] (Position Pitch Velocity Duration)*`,
    with occasional mid-bar tempo changes, plus the TimeSig/Tempo a reference walk says are in force per bar."""
    vocab, names = vocab_and_names()
    timesigs, tempos = ids_of("TimeSig_"), ids_of("Tempo_")
    positions = [names[f"Position_{p}"] for p in range(1, 16)]
    pitches, vels, durs = ids_of("Pitch_"), ids_of("Velocity_"), ids_of("Duration_")
    n_bars = draw(st.integers(0, 14))
    ids: list[int] = []
    in_force: list[tuple[int, int]] = []
    timesig, tempo = draw(st.sampled_from(timesigs)), draw(st.sampled_from(tempos))
    for b in range(n_bars):
        if draw(st.integers(0, 4)) == 0:
            timesig = draw(st.sampled_from(timesigs))
        ids += [vocab.bar, timesig]
        if b == 0 or draw(st.integers(0, 3)) == 0:  # tempo change right at the bar start: in force for this bar
            tempo = draw(st.sampled_from(tempos))
            ids += [vocab.position0, tempo]
        in_force.append((timesig, tempo))
        for _ in range(draw(st.integers(0, 12))):
            ids += [draw(st.sampled_from(positions)), draw(st.sampled_from(pitches)),
                    draw(st.sampled_from(vels)), draw(st.sampled_from(durs))]
            if draw(st.integers(0, 15)) == 0:  # mid-bar tempo change: in force from the next bar on
                tempo = draw(st.sampled_from(tempos))
                ids += [draw(st.sampled_from(positions)), tempo]
    return ids, in_force


specs = st.builds(WindowSpec, context_bars=st.integers(0, 5), completion_bars=st.integers(1, 3),
                  stride_bars=st.integers(1, 3), max_seq_len=st.integers(META_LEN + 2, 160))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(remi_stream(), specs)
def test_windows_properties(stream, spec):
    ids, in_force = stream
    vocab, _ = vocab_and_names()
    bar_starts = [i for i, t in enumerate(ids) if t == vocab.bar]
    n_bars = len(bar_starts)

    def at(bar: int) -> int:
        return bar_starts[bar] if bar < n_bars else len(ids)

    stats = WindowStats()
    windows = make_windows(ids, vocab, spec, stats)
    need = spec.context_bars + spec.completion_bars
    if n_bars < need:
        assert windows == [] and stats.too_short == 1
        return
    starts = list(range(0, n_bars - need + 1, spec.stride_bars))
    assert len(windows) + stats.dropped == len(starts)
    kept = iter(windows)
    truncated = 0
    for start in starts:
        ctx_end, end = start + spec.context_bars, start + need
        completion = ids[at(ctx_end):at(end)]
        if META_LEN + len(completion) > spec.max_seq_len:
            continue  # dropped (counted above)
        w = next(kept)
        # metadata first and intact: the TimeSig and Tempo in force at the first kept bar
        assert w.meta_len == META_LEN
        assert tuple(w.tokens[:META_LEN]) == in_force[w.first_bar]
        # truncation drops whole leading context bars, as few as needed, never the completion
        assert start <= w.first_bar <= ctx_end
        assert len(w.tokens) <= spec.max_seq_len
        if w.first_bar > start:
            truncated += 1
            assert META_LEN + at(end) - at(w.first_bar - 1) > spec.max_seq_len
        # the body is a contiguous run of whole bars of the piece: no cut inside a bar
        assert w.tokens[META_LEN:] == ids[at(w.first_bar):at(end)]
        assert w.ctx_len == META_LEN + at(ctx_end) - at(w.first_bar)
        assert w.completion_len == len(completion) and w.tokens[w.ctx_len:] == completion
        assert w.tokens[w.ctx_len] == vocab.bar  # the completion starts at a Bar token
        if w.ctx_len > META_LEN:
            assert w.tokens[META_LEN] == vocab.bar
        assert w.window == windows.index(w)
    assert next(kept, None) is None
    assert stats.truncated == truncated


@settings(max_examples=150, deadline=None)
@given(remi_stream(), st.integers(0, 6), st.integers(META_LEN + 2, 200))
def test_prompt_is_meta_plus_last_bars(stream, context_bars, max_seq_len):
    ids, in_force = stream
    vocab, _ = vocab_and_names()
    bar_starts = [i for i, t in enumerate(ids) if t == vocab.bar]
    if not bar_starts or context_bars > len(bar_starts):
        return
    p = build_prompt(ids, vocab, context_bars, max_seq_len)
    assert p.completion_len == 0 and p.ctx_len == len(p.tokens) <= max_seq_len
    assert tuple(p.tokens[:META_LEN]) == in_force[min(p.first_bar, len(bar_starts) - 1)]
    tail = ids[bar_starts[p.first_bar]:] if p.first_bar < len(bar_starts) else []
    assert p.tokens[META_LEN:] == tail

"""The BarPhase meta token (`build-shards --bar-phase P`): where in a phrase a window starts, on real MIDI."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest

from rwkv_music.remi.grammar import BatchedGrammar, GrammarError, RemiGrammar
from rwkv_music.remi.tokenizer import build_tokenizer, encode_piano, load_piano_score, with_bar_phase
from rwkv_music.remi.windows import (
    BARPHASE,
    META_LEN,
    Vocab,
    WindowSpec,
    WindowStats,
    bar_phase_ids,
    build_prompt,
    decode_window,
    make_windows,
)

CORPUS = Path(__file__).resolve().parents[1] / "data" / "miditok-tests"
PERIOD = 8


@functools.lru_cache(maxsize=1)
def tokenizers():
    return build_tokenizer(), build_tokenizer(with_bar_phase(None, PERIOD))


@functools.lru_cache(maxsize=1)
def piece() -> str:
    """The longest one-track file of the corpus (many bars: every phase occurs)."""
    files = sorted((CORPUS / "MIDIs_one_track").glob("*.mid"), key=lambda p: p.stat().st_size)
    if not files:
        pytest.skip(f"test corpus not found at {CORPUS}")
    return str(files[-1])


def encode(tok) -> list[int]:
    return encode_piano(load_piano_score(piece(), tok), tok)


def names(tok, ids) -> list[str]:
    inv = {i: t for t, i in tok.vocab.items()}
    return [inv[int(i)] for i in ids]


def notes(score) -> list[tuple[int, int, int]]:
    return [(n.time, n.pitch, n.duration) for t in score.tracks for n in t.notes]


def test_the_option_adds_period_tokens_once():
    plain, phased = tokenizers()
    assert len(phased.vocab) == len(plain.vocab) + PERIOD
    ids = bar_phase_ids(phased.vocab)
    assert [phased[i] for i in ids] == [f"BarPhase_{k}" for k in range(PERIOD)]
    assert Vocab(phased).meta_len == META_LEN + 1 and Vocab(plain).meta_len == META_LEN
    assert with_bar_phase({"num_velocities": 16}, 0) == {"num_velocities": 16}
    assert with_bar_phase({"num_velocities": 16}, 4)["num_velocities"] == 16
    with pytest.raises(ValueError, match="already has BarPhase"):
        with_bar_phase(with_bar_phase(None, 4), 4)
    for bad in (-1, 65, 2.5, True):
        with pytest.raises(ValueError, match=r"0\.\.64"):
            with_bar_phase(None, bad)
    with pytest.raises(ValueError, match=r"BarPhase_0 \.\. BarPhase_<P-1>"):
        bar_phase_ids({"BarPhase_0": 3, "BarPhase_2": 4})


def test_windows_start_with_their_phase_and_are_otherwise_unchanged():
    plain, phased = tokenizers()
    # Short windows, so some lose leading bars; one token less for the plain ones, whose meta is one token shorter
    stats = WindowStats()
    a = make_windows(encode(plain), Vocab(plain), WindowSpec(max_seq_len=159))
    b = make_windows(encode(phased), Vocab(phased), WindowSpec(max_seq_len=160), stats)
    assert len(a) == len(b) > 2 * PERIOD
    assert stats.truncated > 0  # truncated windows: the phase follows the first kept bar
    phases = bar_phase_ids(phased.vocab)
    decoded = 0
    for x, y in zip(a, b, strict=True):
        assert (y.meta_len, y.ctx_len, y.completion_len) == (x.meta_len + 1, x.ctx_len + 1, x.completion_len)
        assert y.first_bar == x.first_bar and y.tokens[META_LEN] == phases[y.first_bar % PERIOD]
        assert names(phased, y.tokens[:META_LEN] + y.tokens[META_LEN + 1:]) == names(plain, x.tokens)
        got = notes(decode_window(y.tokens, y.meta_len, phased))
        assert got == notes(decode_window(x.tokens, x.meta_len, plain))
        decoded += len(got)
    assert decoded > 1000
    assert {y.tokens[META_LEN] for y in b} == set(phases)


def test_prompt_phase_counts_from_the_given_first_bar():
    _, phased = tokenizers()
    ids, vocab = encode(phased), Vocab(phased)
    n_bars = sum(1 for t in ids if t in vocab.bar_ids)
    for first_bar in (0, 3, 13):
        w = build_prompt(ids, vocab, 4, 2048, first_bar=first_bar)
        assert w.meta_len == META_LEN + 1 and w.completion_len == 0
        assert w.tokens[META_LEN] == vocab.phase_ids[(n_bars - 4 + first_bar) % PERIOD]
    w = build_prompt(ids, vocab, None, 200, first_bar=3)  # the whole prompt does not fit: leading bars dropped
    assert 0 < w.first_bar < n_bars and w.tokens[META_LEN] == vocab.phase_ids[(w.first_bar + 3) % PERIOD]
    with pytest.raises(ValueError, match="first_bar"):
        build_prompt(ids, vocab, 4, 2048, first_bar=-1)
    plain = tokenizers()[0]
    w = build_prompt(encode(plain), Vocab(plain), 4, 2048, first_bar=5)  # no phase tokens: the number is unused
    assert w.meta_len == META_LEN


def test_grammar_reads_the_phase_and_never_samples_it():
    plain, phased = tokenizers()
    grammar, vocab = RemiGrammar(phased), Vocab(phased)
    w = make_windows(encode(phased), vocab, WindowSpec())[5]
    x = make_windows(encode(plain), Vocab(plain), WindowSpec())[5]
    st = grammar.run(w.tokens, w.meta_len)
    assert st.bars == 6
    # after the prompt, the machine stands where it stands without the phase token (ids differ by the P tokens)
    a, b = grammar.run(w.tokens[:w.ctx_len], w.meta_len), RemiGrammar(plain).run(x.tokens[:x.ctx_len], x.meta_len)
    fields = ("state", "cur", "cur_min", "bar_start", "bar_len", "tpb", "note_end", "pedal", "bars")
    assert [getattr(a, f) for f in fields] == [getattr(b, f) for f in fields] and a.tokens == w.ctx_len
    with pytest.raises(GrammarError, match=r"at token 2: .* not a BarPhase token"):
        grammar.run([*w.tokens[:2], vocab.bar, *w.tokens[3:]], w.meta_len)
    with pytest.raises(GrammarError, match="at token 2"):  # a phased window read as if it had two meta tokens
        grammar.run(w.tokens, 2)
    with pytest.raises(GrammarError, match=f"at token {w.ctx_len + 1}"):  # a phase token inside the bars
        grammar.run([*w.tokens[:w.ctx_len + 1], vocab.phase_ids[0], *w.tokens[w.ctx_len + 1:]], w.meta_len)
    with pytest.raises(ValueError, match="0, 2 or 3"):
        grammar.run(w.tokens, 4)
    start = grammar.run(w.tokens[:w.ctx_len], w.meta_len)
    allowed = BatchedGrammar(grammar, start, batch_size=2, bars=2, max_new_tokens=200).allowed()
    assert allowed.any() and not allowed[:, list(vocab.phase_ids)].any()
    assert (grammar.cls[list(vocab.phase_ids)] == BARPHASE).all() and not grammar.next_class[:, BARPHASE].any()

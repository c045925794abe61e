"""The REMI grammar: accepts every real training window, mirrors the decoder's clock, and its batched form
allows exactly what the scalar reference allows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from rwkv_music.remi.grammar import (
    BAR,
    PAD,
    PITCH,
    S_DONE,
    BatchedGrammar,
    GrammarError,
    GrammarState,
    RemiGrammar,
)
from rwkv_music.remi.tokenizer import MidiRejected, build_tokenizer, encode_piano, load_piano_score
from rwkv_music.remi.windows import Vocab, WindowSpec, build_prompt, decode_window, make_windows
from rwkv_music.shards import iter_samples, read_manifest
from rwkv_music.shards.manifest import TOKENIZER


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def grammar(tok) -> RemiGrammar:
    return RemiGrammar(tok)


def _pieces(corpus: Path, tok) -> list[tuple[str, list[int]]]:
    out = []
    for f in sorted(corpus.glob("MIDIs_*/*.mid")):
        try:
            out.append((f.name, encode_piano(load_piano_score(f, tok), tok)))
        except MidiRejected:
            continue
    return out


def _onsets(g: RemiGrammar, tokens: list[int], meta_len: int) -> list[int]:
    """The machine's clock at every Pitch token."""
    st = g.initial() if meta_len else GrammarState(state=g.run([], 0).state)
    out = []
    for t in tokens:
        st = g.advance(st, t, strict=False)
        if g.cls[t] == PITCH:
            out.append(st.cur)
    return out


def test_every_real_training_window_is_accepted(built_shards: Path):
    """All samples of a real `musicprep build-shards` run of the test corpus, both splits."""
    from rwkv_music.remi.tokenizer import tokenizer_from_file

    tok = tokenizer_from_file(built_shards / TOKENIZER)
    g = RemiGrammar(tok)
    read_manifest(built_shards)
    n = 0
    for split in ("train", "val"):
        for s in iter_samples(built_shards, split):
            tokens = [int(t) for t in s["tokens"]]
            st = g.run(tokens[: s["ctx_len"]], s["meta_len"])  # GrammarError names the token if not
            assert g.next_class[st.state, BAR], "a prompt (context) must end where a Bar may follow"
            g.run(tokens[s["ctx_len"]:], st=st)
            n += 1
    assert n > 1000


def test_clock_matches_the_decoder(corpus_dir: Path, tok, grammar: RemiGrammar):
    """Note onsets computed by the machine equal those of miditok's decoder, for whole pieces and windows."""
    vocab = Vocab(tok)
    for name, ids in _pieces(corpus_dir, tok)[::3]:
        decoded = [n.time for n in tok.decode([ids]).tracks[0].notes]
        assert _onsets(grammar, ids, 0) == decoded, name
        for w in make_windows(ids, vocab, WindowSpec())[::25]:
            decoded = [n.time for n in decode_window(w.tokens, w.meta_len, tok, vocab).tracks[0].notes]
            assert _onsets(grammar, w.tokens, w.meta_len) == decoded, (name, w.window)


def test_rest_tokens_when_the_tokenizer_has_them(corpus_dir: Path):
    """Token classes come from the vocabulary: with REMI rests enabled, real streams still pass and the clock
    (rests start at the end of the last note) still matches the decoder."""
    tok = build_tokenizer({"use_rests": True})
    g = RemiGrammar(tok)
    assert (g.rest_units > 0).sum() > 0
    for name, ids in _pieces(corpus_dir, tok)[::4]:
        assert _onsets(g, ids, 0) == [n.time for n in tok.decode([ids]).tracks[0].notes], name
        for w in make_windows(ids, Vocab(tok), WindowSpec())[::10]:
            assert g.accepts(w.tokens, w.meta_len), (name, w.window)


def _ids(tok, *names: str) -> list[int]:
    return [tok.vocab[n] for n in names]


def test_rejects_undecodable_sequences(tok, grammar: RemiGrammar):
    head = ["TimeSig_4/4", "Tempo_121.29", "Bar_None", "TimeSig_4/4"]
    note = ["Pitch_60", "Velocity_63", "Duration_1.0.8"]
    good = _ids(tok, *head, "Position_0", *note, "Position_8", *note, "Bar_None", "TimeSig_4/4", "Position_4", *note)
    grammar.run(good, 2, strict=True)
    bad = {
        "pitch without velocity": [*head, "Position_0", "Pitch_60", "Duration_1.0.8"],
        "note before any position": [*head, *note],
        "position going back": [*head, "Position_8", *note, "Position_4", *note],
        "same position twice": [*head, "Position_8", *note, "Position_8", *note],
        "position past the bar (4/4 has 32)": [*head, "Position_32", *note],
        "bar without its time signature": [*head, "Position_0", *note, "Bar_None", "Position_0", *note],
        "tempo not at a position": [*head, "Position_0", *note, "Tempo_121.29"],
        "pedal on twice": [*head, "Position_0", "Pedal_0", "Position_4", "Pedal_0"],
        "missing meta": ["Bar_None", "TimeSig_4/4", "Position_0", *note],
        "special token": [*head, "Position_0", "BOS_None"],
    }
    for why, names in bad.items():
        with pytest.raises(GrammarError):
            grammar.run(_ids(tok, *names), 2)
        assert not grammar.accepts(_ids(tok, *names), 2), why
    meter_change = _ids(tok, *head, "Position_0", *note, "Bar_None", "TimeSig_3/4", "Position_0", *note)
    assert grammar.accepts(meter_change, 2)  # data mode: REMI writes meter changes after a Bar
    assert not grammar.accepts(meter_change, 2, strict=True)  # generation keeps the prompt's meter


def test_batched_allows_exactly_what_the_reference_allows(corpus_dir: Path, tok, grammar: RemiGrammar):
    """Random walks from real prompts: the batched mask equals the scalar one (budget large enough never to
    force), every walk is accepted by the reference in strict mode and decodes without losing a note."""
    vocab = Vocab(tok)
    ids = encode_piano(load_piano_score(corpus_dir / "MIDIs_one_track" / "Maestro_1.mid", tok), tok)
    cut = next(i for i in range(3000, len(ids)) if ids[i] == grammar.bar_id)  # a prompt is whole bars
    w = build_prompt(ids[:cut], vocab, 4, 2048)
    start = grammar.run(w.tokens, w.meta_len)
    B, bars = 6, 2
    bg = BatchedGrammar(grammar, start, B, bars=bars, max_new_tokens=10_000)
    gen = torch.Generator().manual_seed(0)
    refs = [start] * B
    seqs: list[list[int]] = [[] for _ in range(B)]
    for step in range(400):
        allowed = bg.allowed().numpy()
        for b in range(B):
            if refs[b].state == S_DONE:
                assert allowed[b].nonzero()[0].tolist() == [grammar.pad_id]
                continue
            ref = grammar.allowed(refs[b], strict=True)
            if step == 0:
                ref &= grammar.cls == BAR  # a continuation starts with a new bar
            assert np.array_equal(allowed[b], ref), (step, b)
        logits = torch.randn(B, grammar.vocab_size, generator=gen)
        logits[:, grammar.bar_id] += 3.0  # so that the walks end within the loop
        logits = logits.masked_fill(~torch.from_numpy(allowed), -1e9)
        tok_ = torch.distributions.Categorical(logits=logits).sample()
        bg.update(tok_)
        for b in range(B):
            if refs[b].state == S_DONE:
                continue
            t = int(tok_[b])
            if bool(bg.done[b]):  # the Bar that ends the sample
                assert t == grammar.bar_id
                refs[b] = GrammarState(state=S_DONE)
            else:
                refs[b] = grammar.advance(refs[b], t, strict=True)
                seqs[b].append(t)
        if bool(bg.done.all()):
            break
    assert bool(bg.done.all())
    for s in seqs:
        assert sum(1 for t in s if t == grammar.bar_id) == bars
        score = decode_window(w.tokens + s, w.meta_len, tok, vocab)
        assert score.note_num() == sum(1 for t in w.tokens + s if grammar.cls[t] == PITCH)


@pytest.mark.parametrize("budget", [5, 9, 40])
def test_budget_forcing_ends_every_sample_in_time(corpus_dir: Path, tok, grammar: RemiGrammar, budget: int):
    vocab = Vocab(tok)
    ids = encode_piano(load_piano_score(corpus_dir / "MIDIs_one_track" / "POP909_010.mid", tok), tok)
    w = build_prompt(ids, vocab, 2, 2048)
    start = grammar.run(w.tokens, w.meta_len)
    B, bars = 8, 2
    bg = BatchedGrammar(grammar, start, B, bars=bars, max_new_tokens=budget)
    gen = torch.Generator().manual_seed(budget)
    out = []
    for _ in range(budget):
        a = bg.allowed()
        assert a.any(dim=1).all()
        t = torch.distributions.Categorical(logits=torch.randn(B, grammar.vocab_size, generator=gen)
                                            .masked_fill(~a, -1e9)).sample()
        out.append(t)
        bg.update(t)
    assert bool(bg.done.all()) and (bg.bars == bars + 1).all()
    seqs = torch.stack(out, 1).tolist()
    for s in seqs:
        s = s[: [i for i, t in enumerate(s) if t == grammar.bar_id][bars]]
        grammar.run(s, st=start, strict=True)
        assert all(grammar.cls[t] != PAD for t in s)
    with pytest.raises(ValueError, match="max_new_tokens"):
        BatchedGrammar(grammar, start, 1, bars=bars, max_new_tokens=2 * bars)

"""One token classification (remi/windows.py) for the grammar, the windows' lookups and `eval`'s token types."""

from __future__ import annotations

from rwkv_music.remi.grammar import BAR, POSITION, TEMPO, TIMESIG, RemiGrammar
from rwkv_music.remi.tokenizer import build_tokenizer
from rwkv_music.remi.windows import CLASS_NAMES, OTHER, Vocab, token_class, token_classes
from rwkv_music.train.eval_data import token_types


def test_every_user_sees_the_same_classes():
    tok = build_tokenizer()
    cls = token_classes(tok.vocab)
    assert len(cls) == len(tok.vocab)
    grammar, vocab, types = RemiGrammar(tok), Vocab(tok), token_types(tok)
    assert grammar.cls.tolist() == cls.tolist() == vocab.cls.tolist()
    assert types == [CLASS_NAMES[int(c)] for c in cls]
    for c, ids in ((BAR, vocab.bar_ids), (TIMESIG, vocab.timesig_ids), (TEMPO, vocab.tempo_ids),
                   (POSITION, vocab.position_ids)):
        assert ids == {i for i, k in enumerate(cls.tolist()) if k == c} and ids
    for name, i in tok.vocab.items():  # a class is the name's prefix, where the prefix is a known one
        prefix = name.partition("_")[0]
        assert types[i] == (prefix if cls[i] != OTHER else "Other")
    assert {types[i] for i in range(len(types))} >= {"Bar", "Position", "Pitch", "Velocity", "Duration", "PAD"}


def test_token_class_by_name():
    assert token_class("PedalOff_0") != token_class("Pedal_0")  # the whole prefix counts, not its start
    assert token_class("Pitch_60") == token_class("Pitch_21") != token_class("Velocity_63")
    assert token_class("BOS_None") == token_class("Unknown") == OTHER

"""Processes that only tokenize (the build's workers, the CLI) skip miditok's torch import: same tokens, no torch."""

from __future__ import annotations

import json
import subprocess
import sys

from rwkv_music.pipeline.lean import skip_miditok_torch
from rwkv_music.remi.tokenizer import build_tokenizer, encode_piano, load_piano_score, tokenizer_hash

PROBE = """
import json, sys
from rwkv_music.pipeline.lean import skip_miditok_torch
skipped = skip_miditok_torch()
from rwkv_music.remi.tokenizer import build_tokenizer, encode_piano, load_piano_score, tokenizer_hash
tok = build_tokenizer()
ids = encode_piano(load_piano_score(sys.argv[1], tok), tok)
print(json.dumps({"skipped": skipped, "torch": "torch" in sys.modules, "hash": tokenizer_hash(tok), "ids": ids}))
"""


def test_tokenizing_without_miditok_torch_gives_the_same_tokens(corpus_dir):
    path = corpus_dir / "MIDIs_multitrack/Funkytown.mid"
    proc = subprocess.run([sys.executable, "-c", PROBE, str(path)], capture_output=True, text=True, timeout=300,
                          check=True)
    lean = json.loads(proc.stdout)
    tok = build_tokenizer()
    assert lean["skipped"] and not lean["torch"]
    assert lean["hash"] == tokenizer_hash(tok)
    assert lean["ids"] == encode_piano(load_piano_score(path, tok), tok)


def test_skip_is_a_no_op_once_miditok_is_loaded():
    import miditok  # noqa: F401  (loaded by this test module already)

    before = sys.modules.get("miditok.pytorch_data", "absent")
    assert skip_miditok_torch() is False
    assert sys.modules.get("miditok.pytorch_data", "absent") is before

"""Evaluation data: the windows of a split, which of them are scored, and the dev/test part of its pieces."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rwkv_music.remi.windows import CLASS_NAMES, Vocab, token_classes
from rwkv_music.shards import available_format, iter_samples, read_manifest

PIECE_PARTS = ("all", "dev", "test")


TEST_FRACTION = 0.5  # share of pieces in the test part; the rest is dev


def piece_part(piece_id: str) -> str:
    """'dev' or 'test': a fixed function of the piece's identity (the sha256 of its file, `piece_id`).

    Sampling settings can be tuned on the dev part of a split and reported on the test part; every window of a
    piece lands in the same part, and the parts never change with the seed, the build or the window count."""
    h = hashlib.sha256(b"rwkv-music eval part\0" + piece_id.encode()).digest()
    return "test" if int.from_bytes(h[:8], "big") / 2**64 < TEST_FRACTION else "dev"


def select_pieces(samples: Sequence[EvalSample], part: str) -> list[EvalSample]:
    """The windows of the pieces in `part` ('all' keeps everything)."""
    return list(samples) if part == "all" else [s for s in samples if piece_part(s.piece_id) == part]


@dataclass
class EvalSample:
    """One window of the split (the shard sample's fields, tokens as a list)."""

    tokens: list[int]
    meta_len: int
    ctx_len: int
    completion_len: int
    piece_id: str
    source: str
    window: int
    first_bar: int

    @classmethod
    def from_row(cls, row: dict) -> EvalSample:
        return cls([int(t) for t in row["tokens"]], int(row["meta_len"]), int(row["ctx_len"]),
                   int(row["completion_len"]), str(row["piece_id"]), str(row["source"]), int(row["window"]),
                   int(row["first_bar"]))


def load_split(shards: Path, split: str, fmt: str) -> list[EvalSample]:
    """Every window of one split (in manifest order)."""
    manifest = read_manifest(shards)
    fmt = available_format(manifest, fmt)
    return [EvalSample.from_row(r) for r in iter_samples(shards, split, fmt)]


def reservoir(shards: Path, split: str, fmt: str, k: int, seed: int) -> list[EvalSample]:
    """A uniform random sample of `k` windows of a split, in one streaming pass."""
    rng = np.random.default_rng(seed)
    fmt = available_format(read_manifest(shards), fmt)
    out: list[EvalSample] = []
    for n, row in enumerate(iter_samples(shards, split, fmt)):
        if len(out) < k:
            out.append(EvalSample.from_row(row))
        else:
            j = int(rng.integers(0, n + 1))
            if j < k:
                out[j] = EvalSample.from_row(row)
    return out


def spread_windows(samples: Sequence[EvalSample], n: int, seed: int) -> list[int]:
    """Indices of up to `n` windows spread over as many pieces as possible (round-robin over shuffled pieces,
    a random window within each), so one long piece cannot fill the sample."""
    rng = np.random.default_rng(seed)
    by_piece: dict[str, list[int]] = {}
    for i, s in enumerate(samples):
        by_piece.setdefault(s.piece_id, []).append(i)
    pieces = sorted(by_piece)
    rng.shuffle(pieces)
    pools = {p: list(rng.permutation(by_piece[p])) for p in pieces}
    out: list[int] = []
    while len(out) < n and any(pools.values()):
        for p in pieces:
            if pools[p] and len(out) < n:
                out.append(int(pools[p].pop()))
    return out


def count_bars(tokens: Sequence[int], vocab: Vocab) -> int:
    return sum(1 for t in tokens if t in vocab.bar_ids)


def token_types(tokenizer) -> list[str]:
    """The type of every token id (Bar, Pitch, ...): the remi layer's token class names."""
    return [CLASS_NAMES[int(c)] for c in token_classes(tokenizer.vocab)]

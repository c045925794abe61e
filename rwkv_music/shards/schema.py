"""The one sample schema shared by the Parquet and WebDataset shards (see docs/shard-format.md)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

FORMAT_VERSION = 1
META_TOKENIZER_HASH = b"rwkv_music.tokenizer_hash"
META_FORMAT_VERSION = b"rwkv_music.format_version"

SPLITS = ("train", "val")
FORMATS = ("parquet", "webdataset")
SUFFIX = {"parquet": ".parquet", "webdataset": ".tar"}

# Scalar fields in schema order; `tokens` comes first and is stored separately in WebDataset (.npy).
INT_FIELDS = ("meta_len", "ctx_len", "completion_len", "window", "first_bar")
STR_FIELDS = ("piece_id", "source")

ARROW_SCHEMA = pa.schema([
    pa.field("tokens", pa.list_(pa.int32()), nullable=False),
    pa.field("meta_len", pa.int32(), nullable=False),
    pa.field("ctx_len", pa.int32(), nullable=False),
    pa.field("completion_len", pa.int32(), nullable=False),
    pa.field("piece_id", pa.string(), nullable=False),
    pa.field("source", pa.string(), nullable=False),
    pa.field("window", pa.int32(), nullable=False),
    pa.field("first_bar", pa.int32(), nullable=False),
])


@dataclass(frozen=True)
class Sample:
    """One training window as stored in a shard."""

    tokens: np.ndarray  # int32
    meta_len: int
    ctx_len: int
    completion_len: int
    piece_id: str  # sha256 hex of the source file's bytes
    source: str  # path relative to the corpus, posix
    window: int  # index of the window within its piece
    first_bar: int  # piece bar index of the first context bar kept

    @property
    def key(self) -> str:
        return sample_key(self.piece_id, self.window)

    def to_dict(self) -> dict:
        d = {"tokens": self.tokens}
        d.update({f: getattr(self, f) for f in (*INT_FIELDS, *STR_FIELDS)})
        return d


def sample_key(piece_id: str, window: int) -> str:
    """WebDataset key: unique per (piece, window), no dots (webdataset splits names at the first dot)."""
    return f"{piece_id[:16]}-{window:06d}"


def shard_name(batch: int, part: int, fmt: str) -> str:
    """File name of part `part` of batch `batch`: deterministic, so a finished batch can be recognised."""
    return f"part-{batch:06d}-{part:02d}{SUFFIX[fmt]}"


def check_sample(s: Sample) -> None:
    """Invariants every stored sample satisfies; raises ValueError otherwise."""
    n = len(s.tokens)
    if not (0 <= s.meta_len <= s.ctx_len <= n) or s.ctx_len + s.completion_len != n:
        raise ValueError(f"inconsistent lengths in sample {s.key}: meta {s.meta_len}, ctx {s.ctx_len}, "
                         f"completion {s.completion_len}, tokens {n}")

"""The one sample schema shared by the Parquet and WebDataset shards (see docs/shard-format.md)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

# 2: tokens stored as uint16 when the vocabulary fits (else int32), WebDataset tars gzip-compressed (.tar.gz),
#    build-wide shards of exactly samples_per_shard samples. 1: int32 tokens, plain .tar. Readers take both.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
TOKEN_DTYPES = ("uint16", "int32")
META_TOKENIZER_HASH = b"rwkv_music.tokenizer_hash"
META_FORMAT_VERSION = b"rwkv_music.format_version"

SPLITS = ("train", "val")
FORMATS = ("parquet", "webdataset")
SUFFIX = {"parquet": ".parquet", "webdataset": ".tar.gz"}
OLD_SUFFIX = {"parquet": ".parquet", "webdataset": ".tar"}  # format version 1

# Scalar fields in schema order; `tokens` comes first and is stored separately in WebDataset (.npy).
INT_FIELDS = ("meta_len", "ctx_len", "completion_len", "window", "first_bar")
STR_FIELDS = ("piece_id", "source")



def token_dtype_for(vocab_size: int) -> str:
    """The narrowest stored token type that holds every id of a vocabulary of `vocab_size` tokens."""
    return "uint16" if vocab_size <= 1 << 16 else "int32"


def check_tokens(tokens: np.ndarray, dtype: str, key: str) -> np.ndarray:
    """`tokens` as `dtype` (little-endian); ValueError if an id does not fit (a vocabulary too large for it)."""
    if dtype not in TOKEN_DTYPES:
        raise ValueError(f"token dtype {dtype!r}: must be one of {TOKEN_DTYPES}")
    a = np.asarray(tokens)
    info = np.iinfo(dtype)
    if a.size and (int(a.min()) < info.min or int(a.max()) > info.max):
        raise ValueError(f"sample {key}: token ids {int(a.min())}..{int(a.max())} do not fit {dtype}")
    return np.ascontiguousarray(a, dtype=np.dtype(dtype).newbyteorder("<"))


def arrow_schema(token_dtype: str = "uint16") -> pa.Schema:
    """The Parquet schema of format version 2 with tokens stored as `token_dtype`."""
    return pa.schema([pa.field("tokens", pa.list_(pa.from_numpy_dtype(np.dtype(token_dtype))), nullable=False),
                      *_SCALAR_FIELDS])


_SCALAR_FIELDS = [
    pa.field("meta_len", pa.int32(), nullable=False),
    pa.field("ctx_len", pa.int32(), nullable=False),
    pa.field("completion_len", pa.int32(), nullable=False),
    pa.field("piece_id", pa.string(), nullable=False),
    pa.field("source", pa.string(), nullable=False),
    pa.field("window", pa.int32(), nullable=False),
    pa.field("first_bar", pa.int32(), nullable=False),
]
ARROW_SCHEMA = arrow_schema("uint16")


@dataclass(frozen=True)
class Sample:
    """One training window as stored in a shard."""

    tokens: np.ndarray  # int32 as read; stored as uint16 or int32 (token_dtype_for)
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


def part_stem(batch: int, part: int) -> str:
    """Name, without suffix, of staged part `part` of batch `batch`: deterministic, so a finished batch can be
    recognised."""
    return f"part-{batch:06d}-{part:02d}"


def shard_name(batch: int, part: int, fmt: str) -> str:
    return part_stem(batch, part) + SUFFIX[fmt]


def final_shard_stem(index: int) -> str:
    """Name, without suffix, of the `index`-th published shard of a split (in manifest order)."""
    return f"shard-{index:06d}"


def shard_stem(path: str) -> str:
    """`path` without its shard suffix (either format, either version)."""
    for suffix in sorted({*SUFFIX.values(), *OLD_SUFFIX.values()}, key=len, reverse=True):
        if path.endswith(suffix):
            return path[: -len(suffix)]
    raise ValueError(f"{path}: not a shard file name")

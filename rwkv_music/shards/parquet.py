"""Parquet shards: one row per sample, zstd, row groups of a few thousand rows, tokenizer hash in the schema."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rwkv_music.atomic import atomic_path

from .schema import (
    FORMAT_VERSION,
    INT_FIELDS,
    META_FORMAT_VERSION,
    META_TOKENIZER_HASH,
    READABLE_VERSIONS,
    Sample,
    arrow_schema,
    check_tokens,
)

ROW_GROUP_SIZE = 2048


def samples_to_table(samples: Sequence[Sample], tokenizer_hash: str, token_dtype: str = "uint16") -> pa.Table:
    schema = arrow_schema(token_dtype)
    lengths = np.fromiter((len(s.tokens) for s in samples), dtype=np.int64, count=len(samples))
    offsets = np.zeros(len(samples) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = (np.concatenate([check_tokens(s.tokens, token_dtype, s.key) for s in samples])
              if samples else np.zeros(0, dtype=token_dtype))
    token_type = schema.field("tokens").type.value_type
    columns = [pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, type=token_type))]
    for f in schema.names[1:]:
        typ = schema.field(f).type
        columns.append(pa.array([getattr(s, f) for s in samples], type=typ))
    meta = {META_TOKENIZER_HASH: tokenizer_hash.encode(), META_FORMAT_VERSION: str(FORMAT_VERSION).encode()}
    return pa.Table.from_arrays(columns, schema=schema.with_metadata(meta))


def write_parquet(path: str | os.PathLike, samples: Sequence[Sample], tokenizer_hash: str,
                  row_group_size: int = ROW_GROUP_SIZE, token_dtype: str = "uint16") -> None:
    """Write `samples` atomically (temp file + rename); the bytes depend only on the samples, the hash and the
    token type (uint16 when the vocabulary fits: schema.token_dtype_for)."""
    table = samples_to_table(samples, tokenizer_hash, token_dtype)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd", row_group_size=row_group_size)


def parquet_tokenizer_hash(path: str | os.PathLike) -> str | None:
    meta = pq.read_schema(path).metadata or {}
    h = meta.get(META_TOKENIZER_HASH)
    return h.decode() if h is not None else None


def parquet_format_version(pf: pq.ParquetFile, path) -> int:
    """The shard's format version (1 or 2); ValueError for a version this code cannot read."""
    raw = (pf.schema_arrow.metadata or {}).get(META_FORMAT_VERSION, b"1")
    try:
        version = int(raw)
    except ValueError:
        version = None
    if version not in READABLE_VERSIONS:
        raise ValueError(f"{path}: shard format version {raw.decode(errors='replace')}, this code reads "
                         f"{', '.join(map(str, READABLE_VERSIONS))}")
    return version


def iter_parquet_samples(path: str | os.PathLike, batch_size: int = ROW_GROUP_SIZE) -> Iterator[dict]:
    """Yield the samples of one shard in order, as dicts; `tokens` is an int32 numpy array (either version)."""
    pf = pq.ParquetFile(path)
    parquet_format_version(pf, path)
    for batch in pf.iter_batches(batch_size=batch_size):
        yield from _batch_rows(batch)


def _batch_rows(batch: pa.RecordBatch) -> Iterator[dict]:
    tokens = batch.column("tokens")
    offsets = tokens.offsets.to_numpy()
    values = tokens.values.to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
    scalars = {f: batch.column(f).to_pylist() for f in batch.schema.names if f != "tokens"}
    for i in range(batch.num_rows):
        row = {"tokens": values[offsets[i]:offsets[i + 1]].copy()}
        for f, col in scalars.items():
            row[f] = int(col[i]) if f in INT_FIELDS else col[i]
        yield row


def read_parquet_rows(path: str | os.PathLike, rows: Sequence[int]) -> list[dict]:
    """Random access to a few rows (for `musicprep sample`); reads only the row groups that hold them."""
    pf = pq.ParquetFile(path)
    parquet_format_version(pf, path)
    starts = np.cumsum([0] + [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)])
    out: dict[int, dict] = {}
    wanted = sorted(set(rows))
    for g in range(pf.num_row_groups):
        here = [r for r in wanted if starts[g] <= r < starts[g + 1]]
        if not here:
            continue
        table = pf.read_row_group(g)
        batch = table.combine_chunks().to_batches()[0]
        all_rows = list(_batch_rows(batch))
        for r in here:
            out[r] = all_rows[r - starts[g]]
    return [out[r] for r in rows]

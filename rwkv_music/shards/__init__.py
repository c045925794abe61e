"""The shard format: schema, Parquet and WebDataset writers/readers, manifest (see docs/shard-format.md)."""

from .manifest import (
    MANIFEST,
    REJECTS,
    TOKENIZER,
    ManifestError,
    available_format,
    iter_samples,
    iter_shard,
    read_manifest,
    shard_entries,
    verify_shards,
)
from .parquet import iter_parquet_samples, parquet_tokenizer_hash, read_parquet_rows, write_parquet
from .schema import ARROW_SCHEMA, FORMAT_VERSION, FORMATS, SPLITS, Sample, sample_key, shard_name
from .webdataset import iter_webdataset_samples, write_webdataset

__all__ = [
    "ARROW_SCHEMA",
    "FORMATS",
    "FORMAT_VERSION",
    "MANIFEST",
    "REJECTS",
    "SPLITS",
    "TOKENIZER",
    "ManifestError",
    "Sample",
    "available_format",
    "iter_parquet_samples",
    "iter_samples",
    "iter_shard",
    "iter_webdataset_samples",
    "parquet_tokenizer_hash",
    "read_manifest",
    "read_parquet_rows",
    "sample_key",
    "shard_entries",
    "shard_name",
    "verify_shards",
    "write_parquet",
    "write_webdataset",
]

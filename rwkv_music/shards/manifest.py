"""OUT/manifest.json: what a build holds (tokenizer, arguments, counts, every shard with its sha256)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from rwkv_music.atomic import sha256_file
from rwkv_music.errors import error_line

from .parquet import iter_parquet_samples
from .schema import FORMATS, READABLE_VERSIONS, SPLITS
from .webdataset import iter_webdataset_samples

MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.json"
REJECTS = "rejects.jsonl"


class ManifestError(ValueError):
    """The directory is not a finished build this code can read."""


def read_manifest(out: str | os.PathLike) -> dict:
    """Load OUT/manifest.json (as a plain dict) and check its format version (this one or an older readable one)."""
    import json

    path = Path(out) / MANIFEST
    if not path.is_file():
        raise ManifestError(f"{out}: no {MANIFEST} (not a finished musicprep build)")
    try:
        m = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ManifestError(f"{path} is not readable JSON ({e}): a damaged build; build it again") from None
    if not isinstance(m, dict):
        raise ManifestError(f"{path} is not a build manifest (a JSON {type(m).__name__}, not an object)")
    if m.get("format_version") not in READABLE_VERSIONS:
        raise ManifestError(f"{path}: format version {m.get('format_version')!r}, this code reads "
                            f"{', '.join(map(str, READABLE_VERSIONS))}")
    return m


def shard_entries(manifest: dict, split: str, fmt: str = "parquet") -> list[dict]:
    """The manifest's shard records of one split and format, in build order."""
    if split not in SPLITS or fmt not in FORMATS:
        raise ValueError(f"split must be one of {SPLITS}, format one of {FORMATS}")
    return [s for s in manifest["shards"] if s["split"] == split and s["format"] == fmt]


def available_format(manifest: dict, prefer: str = "parquet") -> str:
    """`prefer` if the build wrote it, else the other format."""
    fmts = manifest["args"]["formats"]
    return prefer if prefer in fmts else fmts[0]


def iter_shard(path: str | os.PathLike, fmt: str) -> Iterator[dict]:
    return iter_parquet_samples(path) if fmt == "parquet" else iter_webdataset_samples(path)


def unreadable_shard(path: str | os.PathLike, e: BaseException) -> str:
    """One line naming a shard a reader failed on and why (the first line of the reader's own message)."""
    return f"cannot read shard {path}: {error_line(e)}"


def iter_samples(out: str | os.PathLike, split: str, fmt: str = "parquet") -> Iterator[dict]:
    """Every sample of a split, shard after shard in manifest order."""
    out = Path(out)
    m = read_manifest(out)
    for entry in shard_entries(m, split, fmt):
        yield from iter_shard(out / entry["path"], fmt)


def verify_shards(out: str | os.PathLike) -> list[str]:
    """Problems found re-hashing every shard listed in the manifest (empty list: all good)."""
    out = Path(out)
    problems = []
    for entry in read_manifest(out)["shards"]:
        p = out / entry["path"]
        if not p.is_file():
            problems.append(f"{entry['path']}: missing")
        elif p.stat().st_size != entry["bytes"]:
            problems.append(f"{entry['path']}: {p.stat().st_size} bytes, manifest says {entry['bytes']}")
        elif sha256_file(p) != entry["sha256"]:
            problems.append(f"{entry['path']}: sha256 mismatch")
    return problems

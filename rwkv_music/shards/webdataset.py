"""WebDataset tar shards: `<key>.tokens.npy` (int32) and `<key>.json` (the other fields) per sample.

The tar is written with fixed metadata (mtime 0, uid/gid 0, mode 0644) so equal samples give equal bytes.
It is a plain tar that `webdataset.WebDataset(...).decode()` reads as-is.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Iterator, Sequence

import numpy as np

from .atomic import atomic_path
from .schema import INT_FIELDS, STR_FIELDS, Sample

TOKENS_EXT = "tokens.npy"
JSON_EXT = "json"


def _npy_bytes(tokens) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(tokens, dtype=np.int32), allow_pickle=False)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def sample_json(s: Sample) -> bytes:
    fields = {f: getattr(s, f) for f in (*INT_FIELDS, *STR_FIELDS)}
    return json.dumps(fields, sort_keys=True).encode()


def write_webdataset(path: str | os.PathLike, samples: Sequence[Sample]) -> None:
    """Write `samples` atomically as a WebDataset tar, in order."""
    with atomic_path(path) as tmp, tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        for s in samples:
            key = s.key
            _add(tar, f"{key}.{TOKENS_EXT}", _npy_bytes(s.tokens))
            _add(tar, f"{key}.{JSON_EXT}", sample_json(s))


def iter_webdataset_samples(path: str | os.PathLike) -> Iterator[dict]:
    """Yield the samples of one tar shard in order, as dicts with the same fields as the Parquet reader."""
    current_key, parts = None, {}
    with tarfile.open(path, "r") as tar:
        for member in tar:
            if not member.isfile():
                continue
            base = os.path.basename(member.name)
            key, _, ext = base.partition(".")
            if key != current_key:
                if current_key is not None:
                    yield _assemble(current_key, parts, path)
                current_key, parts = key, {}
            parts[ext] = tar.extractfile(member).read()
        if current_key is not None:
            yield _assemble(current_key, parts, path)


def _assemble(key: str, parts: dict, path) -> dict:
    if TOKENS_EXT not in parts or JSON_EXT not in parts:
        raise ValueError(f"{path}: sample {key} lacks {TOKENS_EXT} or {JSON_EXT}")
    row = {"tokens": np.load(io.BytesIO(parts[TOKENS_EXT]), allow_pickle=False).astype(np.int32, copy=False)}
    fields = json.loads(parts[JSON_EXT])
    for f in INT_FIELDS:
        row[f] = int(fields[f])
    for f in STR_FIELDS:
        row[f] = fields[f]
    return row

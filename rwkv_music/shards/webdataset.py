"""WebDataset tar shards: `<key>.tokens.npy` (int32) and `<key>.json` (the other fields) per sample.

The tar is a plain POSIX ustar archive with fixed metadata (mtime 0, uid/gid 0, mode 0644), so equal samples give
equal bytes; `webdataset.WebDataset(...).decode()` and `tarfile` read it as-is. Headers and .npy members are
assembled directly (not through `tarfile` and `np.save`, which cost more than the data at one member per window).
"""

from __future__ import annotations

import hashlib
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


BLOCK = 512
RECORD = 20 * BLOCK  # tar archives end padded to a whole record, as tarfile writes them


def _npy_bytes(tokens) -> bytes:
    """The .npy (format 1.0) bytes of a 1-D little-endian int32 array, exactly as np.save writes them."""
    a = np.ascontiguousarray(tokens, dtype="<i4")
    header = f"{{'descr': '<i4', 'fortran_order': False, 'shape': ({len(a)},), }}"
    pad = -(10 + len(header) + 1) % 64  # magic(6) + version(2) + length(2); header ends with "\n"
    header = (header + " " * pad + "\n").encode("latin1")
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + a.tobytes()


# The fixed fields of every member's ustar header: mode 0644, uid/gid 0, mtime 0, regular file, "ustar\x0000".
_MODE_IDS = b"0000644\x00" + b"0000000\x00" * 2
_MTIME = b"00000000000\x00"
_TAIL = b"0" + bytes(100) + b"ustar\x0000" + bytes(247)  # typeflag, linkname, magic+version, the rest empty
_FIXED_SUM = sum(_MODE_IDS) + sum(_MTIME) + sum(_TAIL) + 8 * ord(" ")  # checksum field counts as spaces


def _ustar_header(name: str, size: int) -> bytes:
    """One 512-byte POSIX ustar header (as tarfile writes for these fields), checksum computed from parts."""
    raw = name.encode("utf-8")
    if len(raw) > 100:
        raise ValueError(f"tar member name longer than 100 bytes: {name}")
    size_field = b"%011o\x00" % size
    chk = _FIXED_SUM + sum(raw) + sum(size_field)
    return raw + bytes(100 - len(raw)) + _MODE_IDS + size_field + _MTIME + b"%06o\x00 " % chk + _TAIL


def _member(name: str, data: bytes) -> bytes:
    return _ustar_header(name, len(data)) + data + b"\x00" * (-len(data) % BLOCK)


def sample_json(s: Sample) -> bytes:
    fields = {f: getattr(s, f) for f in (*INT_FIELDS, *STR_FIELDS)}
    return json.dumps(fields, sort_keys=True).encode()


def write_webdataset(path: str | os.PathLike, samples: Sequence[Sample]) -> str:
    """Write `samples` atomically as a WebDataset tar, in order; returns the file's sha256 (hex)."""
    digest = hashlib.sha256()
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        written = 0
        for s in samples:
            key = s.key
            chunk = _member(f"{key}.{TOKENS_EXT}", _npy_bytes(s.tokens)) + \
                    _member(f"{key}.{JSON_EXT}", sample_json(s))
            f.write(chunk)
            digest.update(chunk)
            written += len(chunk)
        end = 2 * BLOCK
        end += -(written + end) % RECORD
        f.write(b"\x00" * end)
        digest.update(b"\x00" * end)
    return digest.hexdigest()


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

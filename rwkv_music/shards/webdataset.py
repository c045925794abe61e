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
from json.encoder import encode_basestring_ascii as _json_str

import numpy as np

from rwkv_music.atomic import atomic_path

from .schema import INT_FIELDS, STR_FIELDS, Sample

TOKENS_EXT = "tokens.npy"
JSON_EXT = "json"


BLOCK = 512
RECORD = 20 * BLOCK  # tar archives end padded to a whole record, as tarfile writes them


def _npy_header(n: int) -> bytes:
    """The .npy (format 1.0) header of a 1-D little-endian int32 array of length n, exactly as np.save writes it."""
    header = f"{{'descr': '<i4', 'fortran_order': False, 'shape': ({n},), }}"
    pad = -(10 + len(header) + 1) % 64  # magic(6) + version(2) + length(2); header ends with "\n"
    header = (header + " " * pad + "\n").encode("latin1")
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header


# The fixed fields of every member's ustar header: mode 0644, uid/gid 0, mtime 0, regular file, "ustar\x0000".
_MODE_IDS = b"0000644\x00" + b"0000000\x00" * 2
_MTIME = b"00000000000\x00"
_TAIL = b"0" + bytes(100) + b"ustar\x0000" + bytes(247)  # typeflag, linkname, magic+version, the rest empty
_FIXED_SUM = sum(_MODE_IDS) + sum(_MTIME) + sum(_TAIL) + 8 * ord(" ")  # checksum field counts as spaces
_PADDING = [bytes(k) for k in range(BLOCK)]


def _ustar_header(name: bytes, size: int) -> bytes:
    """One 512-byte POSIX ustar header (as tarfile writes for these fields), checksum computed from parts."""
    if len(name) > 100:
        raise ValueError(f"tar member name longer than 100 bytes: {name.decode(errors='replace')}")
    size_field = b"%011o\x00" % size
    chk = _FIXED_SUM + sum(name) + sum(size_field)
    return b"".join((name.ljust(100, b"\x00"), _MODE_IDS, size_field, _MTIME, b"%06o\x00 " % chk, _TAIL))


def sample_json(s: Sample) -> bytes:
    """The sample's other fields as JSON: the bytes of json.dumps(fields, sort_keys=True), without its overhead."""
    return (f'{{"completion_len": {int(s.completion_len)}, "ctx_len": {int(s.ctx_len)}, '
            f'"first_bar": {int(s.first_bar)}, "meta_len": {int(s.meta_len)}, '
            f'"piece_id": {_json_str(s.piece_id)}, "source": {_json_str(s.source)}, '
            f'"window": {int(s.window)}}}').encode()


def _sample_parts(s: Sample) -> list:
    """The two tar members of one sample, as pieces for bytes.join (the tokens as a view, not copied)."""
    key = s.key.encode()
    a = np.ascontiguousarray(s.tokens, dtype="<i4")
    npy_head = _npy_header(len(a))
    npy_size = len(npy_head) + a.nbytes
    meta = sample_json(s)
    return [_ustar_header(key + b".tokens.npy", npy_size), npy_head, a.data, _PADDING[-npy_size % BLOCK],
            _ustar_header(key + b".json", len(meta)), meta, _PADDING[-len(meta) % BLOCK]]


def write_webdataset(path: str | os.PathLike, samples: Sequence[Sample]) -> str:
    """Write `samples` atomically as a WebDataset tar, in order; returns the file's sha256 (hex).

    The archive is assembled in memory (a shard is a few MB) and written and hashed in one piece.
    """
    parts: list = []
    for s in samples:
        parts += _sample_parts(s)
    body = b"".join(parts)
    end = 2 * BLOCK
    end = bytes(end + -(len(body) + end) % RECORD)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(body)
        f.write(end)
    digest = hashlib.sha256(body)
    digest.update(end)
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

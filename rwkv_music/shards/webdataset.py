"""WebDataset tar shards: `<key>.tokens.npy` (uint16, or int32 for a vocabulary over 65536 tokens) and
`<key>.json` (the other fields) per sample, the whole tar gzip-compressed (`.tar.gz`).

The tar is a plain POSIX ustar archive with fixed metadata (mtime 0, uid/gid 0, mode 0644), and the gzip
stream has mtime 0 and no file name, so equal samples give equal bytes; `webdataset.WebDataset(...).decode()`
and `tarfile` read it as-is (both open gzip transparently; the members keep the extensions webdataset decodes
by). Compressing the whole tar rather than each member lets gzip remove the 512-byte headers and the tokens
the overlapping windows share (see docs/shard-format.md for the measurement). Headers and .npy members are
assembled directly (not through `tarfile` and `np.save`, which cost more than the data at one member per window).
Format version 1 shards (int32 tokens, plain `.tar`) are read the same way.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import tarfile
from collections.abc import Iterator, Sequence
from json.encoder import encode_basestring_ascii as _json_str

import numpy as np

from rwkv_music.atomic import atomic_path

from .schema import INT_FIELDS, STR_FIELDS, Sample, check_tokens

TOKENS_EXT = "tokens.npy"
JSON_EXT = "json"


BLOCK = 512
RECORD = 20 * BLOCK  # tar archives end padded to a whole record, as tarfile writes them
GZIP_LEVEL = 1  # measured against 6 and 9 in docs/shard-format.md: 3-5x faster to write, still <= 3x Parquet
_DESCR = {"uint16": "<u2", "int32": "<i4"}


def _npy_header(n: int, dtype: str = "int32") -> bytes:
    """The .npy (format 1.0) header of a 1-D little-endian `dtype` array of length n, exactly as np.save writes it."""
    header = f"{{'descr': '{_DESCR[dtype]}', 'fortran_order': False, 'shape': ({n},), }}"
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


def _sample_parts(s: Sample, token_dtype: str) -> list:
    """The two tar members of one sample, as pieces for bytes.join (the tokens as a view, not copied)."""
    key = s.key.encode()
    a = check_tokens(s.tokens, token_dtype, s.key)
    npy_head = _npy_header(len(a), token_dtype)
    npy_size = len(npy_head) + a.nbytes
    meta = sample_json(s)
    return [_ustar_header(key + b".tokens.npy", npy_size), npy_head, a.data, _PADDING[-npy_size % BLOCK],
            _ustar_header(key + b".json", len(meta)), meta, _PADDING[-len(meta) % BLOCK]]


def tar_bytes(samples: Sequence[Sample], token_dtype: str = "uint16") -> bytes:
    """The uncompressed tar of `samples`, in order."""
    parts: list = []
    for s in samples:
        parts += _sample_parts(s, token_dtype)
    end = 2 * BLOCK
    size = sum(len(p) if isinstance(p, bytes) else p.nbytes for p in parts)
    parts.append(bytes(end + -(size + end) % RECORD))
    return b"".join(parts)


def write_webdataset(path: str | os.PathLike, samples: Sequence[Sample], token_dtype: str = "uint16",
                     level: int | None = GZIP_LEVEL) -> str:
    """Write `samples` atomically as a WebDataset tar, gzip-compressed (`level` None: a plain tar), in order;
    returns the file's sha256 (hex).

    The archive is assembled in memory (a shard is a few MB) and written and hashed in one piece.
    """
    data = tar_bytes(samples, token_dtype)
    if level is not None:
        data = gzip.compress(data, compresslevel=level, mtime=0)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
    return hashlib.sha256(data).hexdigest()


def iter_webdataset_samples(path: str | os.PathLike) -> Iterator[dict]:
    """Yield the samples of one tar shard (plain or gzip-compressed) in order, as dicts with the same fields as
    the Parquet reader; `tokens` is an int32 numpy array.

    The shard is read and decompressed whole and its ustar headers walked directly: `tarfile` and `np.load` cost
    about 0.1 and 0.4 ms per member, several times the decoding itself. Anything but the plain regular-file
    members we write (long-name or pax headers, other .npy layouts) goes through `tarfile` / `np.load`.
    """
    with open(path, "rb") as f:
        data = f.read()
    if data[:2] == GZIP_MAGIC:
        data = gzip.decompress(data)
    try:
        members = list(_ustar_members(data, path))
    except _NotPlain:
        members = list(_tarfile_members(data))
    current_key, parts = None, {}
    for name, body in members:
        key, _, ext = name.rpartition("/")[2].partition(".")
        if key != current_key:
            if current_key is not None:
                yield _assemble(current_key, parts, path)
            current_key, parts = key, {}
        parts[ext] = body
    if current_key is not None:
        yield _assemble(current_key, parts, path)


GZIP_MAGIC = b"\x1f\x8b"
_ZERO_BLOCK = bytes(BLOCK)
_NPY_HEADER = re.compile(rb"\{'descr': '(<u2|<i4|<u4|<i2|\|u1|\|i1|<i8|<u8)', 'fortran_order': False, "
                         rb"'shape': \((\d+),\), \}\s*$")


class _NotPlain(Exception):
    """The tar holds something our fast path does not read (tarfile will)."""


def _ustar_members(data: bytes, path) -> Iterator[tuple[str, memoryview]]:
    """(name, bytes) of each regular file of an uncompressed tar; ValueError for a truncated one, _NotPlain for
    anything else unexpected (tarfile then reads it, or says what is wrong)."""
    view = memoryview(data)
    off = 0
    while off + BLOCK <= len(data):
        header = data[off:off + BLOCK]
        if header == _ZERO_BLOCK:
            return
        try:
            checksum = int(header[148:156].rstrip(b"\x00 ") or b"-1", 8)
            size = int(header[124:136].rstrip(b"\x00 ") or b"0", 8)
        except ValueError as e:
            raise ValueError(f"{path}: damaged tar header at byte {off}") from e
        plain = header[156:157] in (b"0", b"\x00") and header[345:346] == b"\x00"  # regular file, no name prefix
        if not plain or checksum != sum(header[:148]) + 8 * 32 + sum(header[156:]):
            raise _NotPlain
        end = off + BLOCK + size
        if end > len(data):
            raise ValueError(f"{path}: truncated tar (member at byte {off} needs {end - len(data)} more bytes)")
        yield header[:100].rstrip(b"\x00").decode(), view[off + BLOCK:end]
        off = end + (-size % BLOCK)
    raise ValueError(f"{path}: truncated tar (no end-of-archive marker)")


def _tarfile_members(data: bytes) -> Iterator[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for member in tar:
            if member.isfile():
                yield member.name, tar.extractfile(member).read()


def _npy_tokens(buf: memoryview) -> np.ndarray:
    """A 1-d .npy array as int32 (a copy, so the shard's bytes can be freed)."""
    if bytes(buf[:8]) == b"\x93NUMPY\x01\x00":
        n = int.from_bytes(buf[8:10], "little")
        m = _NPY_HEADER.match(bytes(buf[10:10 + n]))
        if m:
            return np.frombuffer(buf, dtype=m.group(1).decode(), count=int(m.group(2)), offset=10 + n).astype(np.int32)
    return np.load(io.BytesIO(bytes(buf)), allow_pickle=False).astype(np.int32)


def _assemble(key: str, parts: dict, path) -> dict:
    if TOKENS_EXT not in parts or JSON_EXT not in parts:
        raise ValueError(f"{path}: sample {key} lacks {TOKENS_EXT} or {JSON_EXT}")
    row = {"tokens": _npy_tokens(parts[TOKENS_EXT])}
    fields = json.loads(bytes(parts[JSON_EXT]))
    for f in INT_FIELDS:
        row[f] = int(fields[f])
    for f in STR_FIELDS:
        row[f] = fields[f]
    return row

"""Find the corpus's MIDI files, hash their bytes, resolve exact duplicates, and cut deterministic batches."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

MIDI_SUFFIXES = (".mid", ".midi")
# Real MIDI files are kilobytes to a few megabytes; anything far larger is not worth parsing.
DEFAULT_MAX_FILE_BYTES = 64 << 20


class CorpusError(Exception):
    """The corpus cannot be built at all (missing, empty, no MIDI files)."""


@dataclass(frozen=True)
class Reject:
    """One rejected file: a line of rejects.jsonl (`{"message", "path", "reason"}`)."""

    path: str  # relative to the corpus, posix
    reason: str  # the class (docs/shard-format.md#rejectsjsonl)
    message: str  # what a person needs to know

    def to_json(self) -> dict:
        return {"path": self.path, "reason": self.reason, "message": self.message}


@dataclass(frozen=True)
class CorpusFile:
    rel: str  # posix path relative to the corpus
    size: int
    sha256: str  # of the file bytes; the piece_id of its samples


@dataclass(frozen=True)
class Batch:
    index: int
    files: tuple[CorpusFile, ...]

    def digest(self) -> str:
        """Identity of the batch's inputs, so a finished batch is reused only for the same files."""
        h = hashlib.sha256()
        for f in self.files:
            h.update(f"{f.rel}\0{f.sha256}\n".encode())
        return h.hexdigest()


@dataclass
class ScanResult:
    seen: int  # MIDI files found
    unique: list[CorpusFile]  # first occurrence of each distinct content, sorted by path
    duplicates: list[dict]  # {"source": rel, "same_as": rel of the kept copy}
    rejects: list[Reject]  # files that could not even be read


def find_midi(corpus: str | os.PathLike) -> list[str]:
    """Sorted posix paths (relative to `corpus`) of every .mid/.midi file below it, case-insensitively."""
    root = Path(corpus)
    if not root.exists():
        raise CorpusError(f"corpus {corpus} does not exist")
    if not root.is_dir():
        raise CorpusError(f"corpus {corpus} is not a directory")
    found = []
    # Symbolic links to directories are not followed (no loops); a directory (or a link to one) named like a
    # MIDI file is listed so that it is reported as a reject rather than silently skipped.
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in filenames + dirnames:
            if name.lower().endswith(MIDI_SUFFIXES):
                found.append(Path(dirpath, name).relative_to(root).as_posix())
    if not found:
        raise CorpusError(f"no .mid/.midi files found in {corpus}")
    return sorted(found)


def _hash_file(path: Path, limit: int) -> tuple[int, str]:
    """(size, sha256) read in chunks; raises OSError for unreadable paths and ValueError above `limit` bytes."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            size += len(block)
            if size > limit:
                raise ValueError(f"larger than {limit} bytes")
            h.update(block)
    return size, h.hexdigest()


def _examine(root: Path, rel: str, max_bytes: int) -> tuple[int, str] | Reject:
    """(size, sha256) of one corpus entry, or its reject record."""
    try:
        rel.encode("utf-8")
    except UnicodeEncodeError:  # Parquet strings must be UTF-8; keep the rest of the batch safe
        return Reject(os.fsencode(rel).decode("utf-8", "backslashreplace"), "bad-filename",
                      "the file name is not valid UTF-8")
    path = root / rel
    if path.is_dir():
        return Reject(rel, "not-a-file", "a directory named like a MIDI file")
    try:
        return _hash_file(path, max_bytes)
    except OSError as e:
        return Reject(rel, "read-error", f"{type(e).__name__}: {e}")
    except ValueError as e:
        return Reject(rel, "too-large", str(e))


def scan_corpus(corpus: str | os.PathLike, rels: list[str], max_bytes: int = DEFAULT_MAX_FILE_BYTES,
                threads: int = 8) -> ScanResult:
    """Hash every file; of byte-identical files the first in sorted path order is kept.

    Files are read by a few threads (hashing releases the GIL; on network file systems latency dominates);
    the results are consumed in path order, so the outcome does not depend on the threads.
    """
    from concurrent.futures import ThreadPoolExecutor

    root = Path(corpus)
    first_of: dict[str, str] = {}
    unique, duplicates, rejects = [], [], []
    def examined():  # in chunks, so that a million paths do not become a million pending futures
        with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
            for start in range(0, len(rels), 4096):
                chunk = rels[start:start + 4096]
                yield from zip(chunk, pool.map(lambda r: _examine(root, r, max_bytes), chunk), strict=True)

    for rel, got in examined():
        if isinstance(got, Reject):
            rejects.append(got)
            continue
        size, digest = got
        if digest in first_of:
            duplicates.append({"source": rel, "same_as": first_of[digest]})
            continue
        first_of[digest] = rel
        unique.append(CorpusFile(rel, size, digest))
    return ScanResult(len(rels), unique, duplicates, rejects)


def make_batches(files: list[CorpusFile], files_per_batch: int) -> list[Batch]:
    return [Batch(i, tuple(files[s:s + files_per_batch]))
            for i, s in enumerate(range(0, len(files), files_per_batch))]


def corpus_mix(files: list[CorpusFile], seed: int) -> list[CorpusFile]:
    """The files in an order drawn from `seed` and each file's content hash, not its path: a corpus is laid out
    by collection, and shards are cut from batches in batch order, so path order would give shards of one
    collection each. The order depends only on the files' bytes and the seed (not on their names or number)."""
    return sorted(files, key=lambda f: hashlib.sha256(f"{seed}/{f.sha256}".encode()).hexdigest())

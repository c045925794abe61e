"""Find the corpus's MIDI files, hash their bytes, resolve exact duplicates, and cut deterministic batches."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

MIDI_SUFFIXES = (".mid", ".midi")


class CorpusError(Exception):
    """The corpus cannot be built at all (missing, empty, no MIDI files)."""


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
    rejects: list[dict]  # files that could not even be read


def find_midi(corpus: str | os.PathLike) -> list[str]:
    """Sorted posix paths (relative to `corpus`) of every .mid/.midi file below it, case-insensitively."""
    root = Path(corpus)
    if not root.exists():
        raise CorpusError(f"corpus {corpus} does not exist")
    if not root.is_dir():
        raise CorpusError(f"corpus {corpus} is not a directory")
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in filenames:
            if name.lower().endswith(MIDI_SUFFIXES):
                found.append(Path(dirpath, name).relative_to(root).as_posix())
    if not found:
        raise CorpusError(f"no .mid/.midi files found in {corpus}")
    return sorted(found)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def scan_corpus(corpus: str | os.PathLike, rels: list[str]) -> ScanResult:
    """Hash every file; of byte-identical files the first in sorted path order is kept."""
    root = Path(corpus)
    first_of: dict[str, str] = {}
    unique, duplicates, rejects = [], [], []
    for rel in rels:
        try:
            rel.encode("utf-8")
        except UnicodeEncodeError:  # Parquet strings must be UTF-8; keep the rest of the batch safe
            rejects.append({"path": rel.encode("utf-8", "backslashreplace").decode(), "reason": "bad-filename",
                            "message": "the file name is not valid UTF-8"})
            continue
        try:
            data = (root / rel).read_bytes()
        except OSError as e:
            rejects.append({"path": rel, "reason": "read-error", "message": str(e)})
            continue
        digest = sha256_bytes(data)
        if digest in first_of:
            duplicates.append({"source": rel, "same_as": first_of[digest]})
            continue
        first_of[digest] = rel
        unique.append(CorpusFile(rel, len(data), digest))
    return ScanResult(len(rels), unique, duplicates, rejects)


def make_batches(files: list[CorpusFile], files_per_batch: int) -> list[Batch]:
    return [Batch(i, tuple(files[s:s + files_per_batch]))
            for i, s in enumerate(range(0, len(files), files_per_batch))]

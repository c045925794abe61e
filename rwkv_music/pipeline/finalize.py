"""Publish the staged shards under OUT/train and OUT/val as shards of exactly `samples_per_shard` samples.

Workers stage each batch's samples of a split in parts of `samples_per_shard` (the last part of a batch
usually shorter). Once the corpus-wide near-duplicates are known, the driver lays out the final shards of each
split, without reading a shard: in batch order, every full run of `samples_per_shard` kept samples of a batch
becomes a shard, and the batches' remainders are then merged, in batch order, into further full shards; only
the very last shard of a split may be shorter. A final shard that is exactly one staged part is published by a
hard link (no copy, same bytes); the others are written from the staged samples. The layout depends only on the
batch records, so builds stay byte-identical run to run and on any cluster.

Each final file appears through an atomic rename. `.build/final/published.json` records what each final file
was made from, so a re-run keeps the files it would only write again; a publication killed half-way is simply
completed by the next run.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from rwkv_music.atomic import default_file_mode, write_json_atomic

from ..shards.manifest import iter_shard
from ..shards.schema import SPLITS, SUFFIX, Sample, final_shard_stem, shard_stem
from .batch import BatchResult, write_shard

PUBLISHED = ".build/final/published.json"


@dataclass(frozen=True)
class Segment:
    """Rows [start, stop) of one staged shard (path relative to OUT, in the format the samples are read from)."""

    path: str
    start: int
    stop: int

    @property
    def rows(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class FinalShard:
    """One final shard of one split: its name stem and the staged rows it holds, in order."""

    split: str
    index: int
    segments: tuple[Segment, ...]

    @property
    def nsamples(self) -> int:
        return sum(s.rows for s in self.segments)

    def recipe(self, staged: dict[str, dict]) -> str:
        """Identity of the content (the staged files' hashes and the rows taken): equal recipes give equal bytes."""
        h = hashlib.sha256()
        for s in self.segments:
            h.update(f"{s.path}\0{staged[s.path]['sha256']}\0{s.start}\0{s.stop}\n".encode())
        return h.hexdigest()


def _kept_segments(result: BatchResult, split: str, fmt: str, dropped: set[str]) -> list[Segment]:
    """The batch's kept rows of `split` as segments of its staged `fmt` parts, in order.

    The staged rows of a split are the split's pieces' samples in file order, cut into parts (process_batch),
    so each piece's rows are known from the record without reading the shards.
    """
    parts = [s for s in result.shards if s["split"] == split and s["format"] == fmt]
    bounds, base = [], 0
    for p in parts:
        bounds.append((base, base + p["nsamples"], p["path"]))
        base += p["nsamples"]
    keep, row = [], 0
    for piece in (p for p in result.pieces if p["split"] == split):
        if piece["source"] not in dropped:
            keep.append((row, row + piece["samples"]))
        row += piece["samples"]
    if row != base:
        raise RuntimeError(f"batch {result.index}: its record lists {row} {split} samples, its staged {fmt} parts "
                           f"hold {base}; remove OUT/.build/batches/batch-{result.index:06d}.json and re-run")
    segments = []
    for lo, hi in keep:
        for start, stop, path in bounds:
            a, b = max(lo, start), min(hi, stop)
            if a < b:
                if segments and segments[-1].path == path and segments[-1].stop == a - start:
                    segments[-1] = Segment(path, segments[-1].start, b - start)
                else:
                    segments.append(Segment(path, a - start, b - start))
    return segments


def _take(segments: list[Segment], n: int) -> tuple[list[Segment], list[Segment]]:
    """The first `n` rows of `segments`, and the rest."""
    head, rest = [], list(segments)
    while n and rest:
        s = rest.pop(0)
        if s.rows <= n:
            head.append(s)
            n -= s.rows
        else:
            head.append(Segment(s.path, s.start, s.start + n))
            rest.insert(0, Segment(s.path, s.start + n, s.stop))
            n = 0
    return head, rest


def plan_shards(results: list[BatchResult], dropped: set[str], fmt: str, samples_per_shard: int) -> list[FinalShard]:
    """The final shards of both splits (see the module docstring); `results` in batch order."""
    plan = []
    for split in SPLITS:
        shards: list[tuple[Segment, ...]] = []
        remainders: list[Segment] = []
        for r in results:
            segs = _kept_segments(r, split, fmt, dropped)
            while sum(s.rows for s in segs) >= samples_per_shard:
                head, segs = _take(segs, samples_per_shard)
                shards.append(tuple(head))
            remainders += segs
        while remainders:
            head, remainders = _take(remainders, samples_per_shard)
            shards.append(tuple(head))
        plan += [FinalShard(split, i, segs) for i, segs in enumerate(shards)]
    return plan


def _link_atomic(src: Path, dst: Path) -> None:
    """`dst` becomes a hard link of `src` (a copy where the file system has none), through a rename."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.link.tmp")
    if tmp.exists():
        tmp.unlink()
    try:
        os.link(src, tmp)
    except OSError:  # file systems without hard links
        shutil.copyfile(src, tmp)
        os.chmod(tmp, default_file_mode())
    os.replace(tmp, dst)


def _read_segments(out: Path, segments: Iterable[Segment], fmt: str) -> Iterator[Sample]:
    cache: tuple[str, list[dict]] | None = None
    for s in segments:
        if cache is None or cache[0] != s.path:
            cache = (s.path, list(iter_shard(out / s.path, fmt)))
        yield from (Sample(**row) for row in cache[1][s.start:s.stop])


def _staged_entry(staged: dict[str, dict], seg: Segment, fmt: str) -> dict:
    """The staged entry, in format `fmt`, of the part `seg` reads."""
    return staged[shard_stem(seg.path) + SUFFIX[fmt]]


def _published(out: Path) -> dict[str, dict]:
    path = out / PUBLISHED
    try:
        rec = json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:
        return {}
    return {e["path"]: e for e in rec.get("shards", [])}


def publish(out: str | os.PathLike, results: list[BatchResult], dropped: set[str], formats: tuple[str, ...],
            samples_per_shard: int, thash: str, token_dtype: str, threads: int = 2) -> list[dict]:
    """Write the final shards (both splits, every format) and return their manifest entries, in order."""
    out = Path(out)
    fmt = "parquet" if "parquet" in formats else "webdataset"  # the staged format the samples are read from
    staged = {s["path"]: s for r in results for s in r.shards}
    before = _published(out)
    plan = plan_shards(results, dropped, fmt, samples_per_shard)

    def make(shard: FinalShard) -> list[dict]:
        recipe = shard.recipe(staged)
        stem = f"{shard.split}/{final_shard_stem(shard.index)}"
        rels = [stem + SUFFIX[f] for f in formats]
        old = [before.get(rel) for rel in rels]
        if all(e is not None and e.get("recipe") == recipe and (out / e["path"]).is_file()
               and (out / e["path"]).stat().st_size == e["bytes"] for e in old):
            return old
        seg = shard.segments[0]
        if len(shard.segments) == 1 and seg.start == 0 and seg.stop == staged[seg.path]["nsamples"]:
            entries = []
            for f, rel in zip(formats, rels, strict=True):
                src = _staged_entry(staged, seg, f)
                _link_atomic(out / src["path"], out / rel)
                entries.append({**src, "path": rel})
        else:
            samples = list(_read_segments(out, shard.segments, fmt))
            entries = write_shard(out, stem, shard.split, samples, formats, thash, token_dtype)
        return [{**e, "recipe": recipe} for e in entries]

    with ThreadPoolExecutor(max(1, threads), thread_name_prefix="publish") as pool:
        entries = [e for es in pool.map(make, plan) for e in es]
    keep = {e["path"] for e in entries}
    for split in SPLITS:  # shards of an earlier publication that are not part of this one
        for p in (out / split).iterdir() if (out / split).is_dir() else []:
            if f"{split}/{p.name}" not in keep and p.is_file():
                p.unlink()
    write_json_atomic(out / PUBLISHED, {"shards": entries})
    return [{k: v for k, v in e.items() if k != "recipe"} for e in entries]

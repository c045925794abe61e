"""Publish a batch's staged shards under OUT/train and OUT/val once the corpus-wide near-duplicates are known.

A batch without near-duplicates is published by hard-linking its staged files (no copy, same bytes); a batch
holding some is rewritten from its staged samples without them. Either way each final file appears through an
atomic rename, and a record (.build/final/) lets a re-run skip batches already published the same way.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from rwkv_music.atomic import write_json_atomic

from ..shards.manifest import iter_shard
from ..shards.schema import SPLITS, Sample
from .batch import STAGING_DIR, BatchResult, write_split_shards

FINAL_DIR = ".build/final"


def _record_path(out: Path, index: int) -> Path:
    return out / FINAL_DIR / f"batch-{index:06d}.json"


def _link_atomic(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.link.tmp")
    if tmp.exists():
        tmp.unlink()
    try:
        os.link(src, tmp)
    except OSError:  # file systems without hard links
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def _published(out: Path, index: int, digest: str, dropped: list[str]) -> list[dict] | None:
    path = _record_path(out, index)
    if not path.is_file():
        return None
    try:
        rec = json.loads(path.read_text())
    except ValueError:
        return None
    if rec.get("digest") != digest or rec.get("dropped") != dropped:
        return None
    for s in rec["shards"]:
        p = out / s["path"]
        if not p.is_file() or p.stat().st_size != s["bytes"]:
            return None
    return rec["shards"]


def publish_batch(out: str | os.PathLike, result: BatchResult, dropped: set[str], formats: tuple[str, ...],
                  samples_per_shard: int, thash: str) -> list[dict]:
    """Final manifest entries of one batch's shards, without the samples of the `dropped` sources."""
    out = Path(out)
    mine = sorted(p["source"] for p in result.pieces if p["source"] in dropped)
    done = _published(out, result.index, result.digest, mine)
    if done is not None:
        return done
    prefix = f"{STAGING_DIR}/"
    if not mine:
        entries = []
        for s in result.shards:
            final = s["path"][len(prefix):]
            _link_atomic(out / s["path"], out / final)
            entries.append({**s, "path": final})
    else:
        fmt = "parquet" if "parquet" in formats else "webdataset"
        entries = []
        for split in SPLITS:
            samples = [Sample(**row) for s in result.shards if s["split"] == split and s["format"] == fmt
                       for row in iter_shard(out / s["path"], fmt) if row["source"] not in dropped]
            entries += write_split_shards(out, "", result.index, split, samples, formats, samples_per_shard, thash)
    keep = {e["path"] for e in entries}
    for split in SPLITS:  # parts of an earlier publication of this batch that no longer exist
        for p in (out / split).glob(f"part-{result.index:06d}-*") if (out / split).is_dir() else []:
            if f"{split}/{p.name}" not in keep:
                p.unlink()
    write_json_atomic(_record_path(out, result.index), {"digest": result.digest, "dropped": mine, "shards": entries})
    return entries

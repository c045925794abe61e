"""`musicprep inspect`: a build's manifest summary and the length statistics of its samples."""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..shards.manifest import (
    REJECTS,
    available_format,
    iter_shard,
    read_manifest,
    shard_entries,
    unreadable_shard,
    verify_shards,
)
from ..shards.schema import SPLITS
from .build import summary_table


def split_lengths(out: str | os.PathLike, split: str, damaged: list[str] | None = None) -> dict[str, np.ndarray]:
    """Total, context and completion lengths of every sample of a split (Parquet: metadata columns only).

    A shard that cannot be read raises ValueError naming it; with a `damaged` list, its one-line message is
    appended there instead and the other shards still count (so one bad file does not hide the rest)."""
    out = Path(out)
    m = read_manifest(out)
    fmt = available_format(m)
    cols: dict[str, list] = {"length": [], "ctx_len": [], "completion_len": []}
    for e in shard_entries(m, split, fmt):
        try:
            got = _shard_lengths(out / e["path"], fmt)
        except Exception as err:  # pyarrow, tarfile, gzip, a missing file: whatever the damage, name the shard
            msg = unreadable_shard(out / e["path"], err)
            if damaged is None:
                raise ValueError(msg) from err
            damaged.append(msg)
            continue
        for k, v in got.items():
            cols[k].append(v)
    return {k: np.concatenate(v) if v else np.zeros(0, dtype=np.int64) for k, v in cols.items()}


def _shard_lengths(path: Path, fmt: str) -> dict[str, np.ndarray]:
    if fmt == "parquet":
        t = pq.read_table(path, columns=["tokens", "ctx_len", "completion_len"])
        return {"length": pc.list_value_length(t.column("tokens")).to_numpy(),
                "ctx_len": t.column("ctx_len").to_numpy(), "completion_len": t.column("completion_len").to_numpy()}
    rows = list(iter_shard(path, fmt))
    return {"length": np.array([len(r["tokens"]) for r in rows], dtype=np.int64),
            "ctx_len": np.array([r["ctx_len"] for r in rows], dtype=np.int64),
            "completion_len": np.array([r["completion_len"] for r in rows], dtype=np.int64)}


def _stats_line(name: str, x: np.ndarray) -> str:
    if len(x) == 0:
        return f"  {name:<15} (none)"
    q = np.percentile(x, [50, 90, 99])
    return (f"  {name:<15} min {x.min():>6}  p50 {q[0]:>8.0f}  p90 {q[1]:>8.0f}  p99 {q[2]:>8.0f}  "
            f"max {x.max():>6}  mean {x.mean():>8.1f}")


@dataclass
class Report:
    """What `musicprep inspect` prints, and what makes it exit 1: shards it could not read, --verify's findings."""

    text: str
    damaged: list[str] = field(default_factory=list)  # one line per shard that could not be read
    verify_problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.damaged and not self.verify_problems


def inspect_report(out: str | os.PathLike, verify: bool = False) -> Report:
    """The report; a damaged shard is left out of the statistics (and named in `damaged`), the rest still count."""
    out = Path(out)
    m = read_manifest(out)
    a = m["args"]
    lines = [
        f"build {out}",
        f"  corpus {a['corpus']}",
        f"  windows: {a['context_bars']} context + {a['completion_bars']} completion bars, stride {a['stride_bars']}, "
        f"max {a['max_seq_len']} tokens; formats {', '.join(a['formats'])}",
        f"  tokenizer {m['tokenizer']['hash'][:16]}",
        "",
        summary_table(m),
        "",
    ]
    tokens = m["counts"]["tokens"]
    per_token: dict[str, float] = {}
    for fmt in a["formats"]:
        for split in SPLITS:
            es = shard_entries(m, split, fmt)
            size = sum(e["bytes"] for e in es)
            bpt = f"{size / tokens[split]:>7.3f} bytes/token" if tokens[split] else ""
            lines.append(f"{fmt:<10} {split:<5} {len(es):>5} shard(s) {size / 1e6:>10.2f} MB {bpt}")
        size = sum(e["bytes"] for e in m["shards"] if e["format"] == fmt)
        if sum(tokens.values()):
            per_token[fmt] = size / sum(tokens.values())
            lines.append(f"{fmt:<10} all   {per_token[fmt]:>7.3f} bytes/token "
                         f"(tokens stored as {m.get('token_dtype', 'int32')})")
    if len(per_token) == 2:
        lines.append(f"webdataset / parquet bytes: {per_token['webdataset'] / per_token['parquet']:.2f}")
    damaged: list[str] = []
    for split in SPLITS:
        before = len(damaged)
        lens = split_lengths(out, split, damaged)
        left_out = f"; {len(damaged) - before} damaged shard(s) left out" if len(damaged) > before else ""
        lines.append(f"\n{split}: {len(lens['length'])} samples (tokens per sample){left_out}")
        if len(lens["length"]):
            at_max = int((lens["length"] >= a["max_seq_len"] - 16).sum())
            lines += [_stats_line(k, v) for k, v in lens.items()]
            lines.append(f"  within 16 tokens of max-seq-len: {at_max}")
    rejects_path = out / REJECTS
    if rejects_path.is_file():
        reasons = Counter(json.loads(line)["reason"] for line in rejects_path.read_text().splitlines() if line)
        if reasons:
            lines.append("\nrejects: " + ", ".join(f"{r} {n}" for r, n in reasons.most_common()))
    problems: list[str] = []
    if verify:
        problems = verify_shards(out)
        lines.append("\nverify: " + ("all shard sha256s match the manifest" if not problems
                                     else f"{len(problems)} problem(s)"))
        lines += [f"  {p}" for p in problems]
    return Report("\n".join(lines), damaged, problems)

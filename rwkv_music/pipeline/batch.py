"""The per-batch worker: files -> merged piano -> REMI ids -> windows -> split -> shards on disk.

Runs inside a Dask worker (or directly, in tests). It writes its shards itself, atomically, then a small
JSON record of what it did; a batch whose record exists (and whose inputs match) is finished.
"""

from __future__ import annotations

import functools
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from miditok import REMI

from ..shards.atomic import sha256_file, write_json_atomic
from ..shards.parquet import write_parquet
from ..shards.schema import SPLITS, Sample, shard_name
from ..shards.webdataset import write_webdataset
from .scan import Batch, CorpusFile
from .split import assign_split, note_content_hash
from .tokenizer import MidiRejected, encode_piano, load_piano_score, tokenizer_from_file, tokenizer_hash
from .windows import Vocab, WindowSpec, WindowStats, index_bars, make_windows

BATCH_DIR = ".build/batches"
COUNT_KEYS = ("files", "ok", "rejected", "too_short", "windows", "windows_dropped", "windows_truncated",
              "samples_train", "samples_val", "tokens_train", "tokens_val")


@dataclass(frozen=True)
class BatchTask:
    """Everything a worker needs; plain data, cheap to pickle."""

    batch: Batch
    corpus: str
    out: str
    tokenizer_path: str
    tokenizer_hash: str
    spec: WindowSpec
    formats: tuple[str, ...]
    samples_per_shard: int
    val_fraction: float
    seed: int


@dataclass
class BatchResult:
    index: int
    digest: str  # Batch.digest() of the inputs
    counts: dict = field(default_factory=lambda: dict.fromkeys(COUNT_KEYS, 0))
    shards: list[dict] = field(default_factory=list)  # manifest entries
    rejects: list[dict] = field(default_factory=list)  # {"path", "reason", "message"}
    timesig_changed: list[dict] = field(default_factory=list)  # {"source", "changed"}
    timings: dict = field(default_factory=dict)  # seconds per stage (not part of the output identity)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> BatchResult:
        return cls(**d)


def batch_record_path(out: str | Path, index: int) -> Path:
    return Path(out) / BATCH_DIR / f"batch-{index:06d}.json"


@functools.lru_cache(maxsize=4)
def _load_tokenizer(path: str, expected_hash: str) -> tuple[REMI, Vocab]:
    """One tokenizer per worker process (building it per file would dominate small files)."""
    tok = tokenizer_from_file(path)
    got = tokenizer_hash(tok)
    if got != expected_hash:
        raise RuntimeError(f"{path}: tokenizer hash {got[:12]} differs from the build's {expected_hash[:12]}")
    return tok, Vocab(tok)


@dataclass
class _Piece:
    split: str
    samples: list[Sample]


def _process_file(task: BatchTask, f: CorpusFile, tok: REMI, vocab: Vocab, result: BatchResult,
                  timings: dict) -> _Piece | None:
    """One file to its samples, or a reject recorded in `result` (None)."""

    def reject(reason: str, message: str) -> None:
        result.rejects.append({"path": f.rel, "reason": reason, "message": message})
        result.counts["rejected"] += 1

    t0 = time.perf_counter()
    try:
        data = (Path(task.corpus) / f.rel).read_bytes()
    except OSError as e:
        return reject("read-error", str(e))
    if not data:
        return reject("empty-file", "the file is 0 bytes")
    t1 = time.perf_counter()
    try:
        piano = load_piano_score(data, tok)
    except MidiRejected as e:
        return reject(e.reason, e.message)
    t2 = time.perf_counter()
    try:
        ids = encode_piano(piano, tok)
    except Exception as e:  # miditok raises assorted errors on odd content
        return reject("tokenize-error", f"{type(e).__name__}: {e}")
    t3 = time.perf_counter()
    stats = WindowStats()
    windows = make_windows(ids, vocab, task.spec, stats)
    t4 = time.perf_counter()
    for k, dt in (("read", t1 - t0), ("parse", t2 - t1), ("tokenize", t3 - t2), ("window", t4 - t3)):
        timings[k] = timings.get(k, 0.0) + dt
    if piano.time_signatures_changed:
        result.timesig_changed.append({"source": f.rel, "changed": piano.time_signatures_changed})
    result.counts["windows"] += len(windows) + stats.dropped
    result.counts["windows_dropped"] += stats.dropped
    result.counts["windows_truncated"] += stats.truncated
    if stats.too_short:
        result.counts["too_short"] += 1
        n_bars = index_bars(ids, vocab).n_bars
        need = task.spec.context_bars + task.spec.completion_bars
        return reject("too-short", f"{n_bars} bar(s), a window needs {need}")
    if not windows:
        return reject("no-windows", f"all {stats.dropped} window(s) exceed max-seq-len {task.spec.max_seq_len}")
    split = assign_split(note_content_hash(piano.score), task.val_fraction, task.seed)
    samples = [Sample(tokens=np.asarray(w.tokens, dtype=np.int32), meta_len=w.meta_len, ctx_len=w.ctx_len,
                      completion_len=w.completion_len, piece_id=f.sha256, source=f.rel, window=w.window,
                      first_bar=w.first_bar) for w in windows]
    result.counts["ok"] += 1
    return _Piece(split, samples)


def _write_split(task: BatchTask, split: str, samples: list[Sample], result: BatchResult) -> None:
    out = Path(task.out)
    n = task.samples_per_shard
    for part, start in enumerate(range(0, len(samples), n)):
        chunk = samples[start:start + n]
        for fmt in task.formats:
            rel = f"{split}/{shard_name(task.batch.index, part, fmt)}"
            path = out / rel
            if fmt == "parquet":
                write_parquet(path, chunk, task.tokenizer_hash)
            else:
                write_webdataset(path, chunk)
            result.shards.append({"path": rel, "split": split, "format": fmt, "nsamples": len(chunk),
                                  "bytes": path.stat().st_size, "sha256": sha256_file(path)})


def process_batch(task: BatchTask) -> BatchResult:
    """Build, write and record one batch. Per-file problems become rejects; the batch always completes."""
    t_start = time.perf_counter()
    tok, vocab = _load_tokenizer(task.tokenizer_path, task.tokenizer_hash)
    result = BatchResult(task.batch.index, task.batch.digest())
    timings: dict = {}
    by_split: dict[str, list[Sample]] = {s: [] for s in SPLITS}
    for f in task.batch.files:
        result.counts["files"] += 1
        try:
            piece = _process_file(task, f, tok, vocab, result, timings)
        except Exception as e:  # a bug or an unforeseen input must not take the other files down
            result.rejects.append({"path": f.rel, "reason": "internal-error", "message": f"{type(e).__name__}: {e}"})
            result.counts["rejected"] += 1
            continue
        if piece is not None:
            by_split[piece.split].extend(piece.samples)
    t_write = time.perf_counter()
    for split, samples in by_split.items():
        result.counts[f"samples_{split}"] = len(samples)
        result.counts[f"tokens_{split}"] = sum(len(s.tokens) for s in samples)
        _write_split(task, split, samples, result)
    timings["write"] = time.perf_counter() - t_write
    timings["total"] = time.perf_counter() - t_start
    result.timings = {k: round(v, 4) for k, v in timings.items()}
    write_json_atomic(batch_record_path(task.out, task.batch.index), result.to_json())
    return result


def load_finished(out: str | Path, batch: Batch) -> BatchResult | None:
    """The recorded result of `batch` if it finished with the same inputs and its shards are all present."""
    path = batch_record_path(out, batch.index)
    if not path.is_file():
        return None
    try:
        result = BatchResult.from_json(json.loads(path.read_text()))
    except (ValueError, TypeError):
        return None
    if result.digest != batch.digest():
        return None
    for s in result.shards:
        p = Path(out) / s["path"]
        if not p.is_file() or p.stat().st_size != s["bytes"]:
            return None
    return result

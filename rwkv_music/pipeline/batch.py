"""The per-batch worker: files -> merged piano -> filters -> REMI ids -> windows -> split -> staged shards.

Runs inside a Dask worker (or directly, in tests). It writes its shards itself, atomically, into the staging
area OUT/.build/staging/, then a small JSON record of what it did (with each piece's content fingerprints); a
batch whose record exists (and whose inputs match) is finished. The driver later decides which pieces are
near-duplicates and publishes the staged shards under train/ and val/ (finalize.py).
"""

from __future__ import annotations

import functools
import gc
import json
import os
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from miditok import REMI

from rwkv_music.atomic import sha256_file, write_json_atomic
from rwkv_music.remi.tokenizer import MidiRejected, encode_piano, load_piano_score, tokenizer_from_file, tokenizer_hash
from rwkv_music.remi.windows import Vocab, WindowSpan, WindowSpec, WindowStats, index_bars, window_spans

from ..shards.parquet import write_parquet
from ..shards.schema import SPLITS, SUFFIX, Sample, part_stem
from ..shards.webdataset import write_webdataset
from .config import Filters
from .dedup import minhash_signature
from .guard import FileWatchdog, mark_started, timeout_marker
from .scan import Batch, CorpusFile, Reject
from .split import assign_split, note_array, note_content_hash

BATCH_DIR = ".build/batches"
STAGING_DIR = ".build/staging"


@dataclass(frozen=True, kw_only=True)
class BatchSettings:
    """What every batch of one build shares: paths, tokenizer, windows, shard layout, filters, limits."""

    corpus: str  # absolute paths: the workers may run elsewhere, with another working directory
    out: str
    tokenizer_path: str
    tokenizer_hash: str
    spec: WindowSpec
    formats: tuple[str, ...]
    samples_per_shard: int
    val_fraction: float
    seed: int
    filters: Filters = field(default_factory=Filters)
    minhash: bool = False  # also compute each piece's MinHash signature
    file_timeout: float | None = None  # seconds per file before the worker gives up on it (guard.py)
    token_dtype: str = "uint16"  # how shards store token ids (schema.token_dtype_for the vocabulary)


@dataclass(frozen=True, kw_only=True)
class BatchTask:
    """Everything a worker needs for one batch; plain data, cheap to pickle."""

    batch: Batch
    settings: BatchSettings
    crashed: tuple[str, ...] = ()  # files found to kill the worker: rejected as "worker-crash" without processing
    probe: bool = False  # only process the files (to find a crashing one); write nothing
    attempt: str = ""  # the driver's name for this submission: marks it started (guard.mark_started)


@dataclass
class BatchCounts:
    """What one batch did, file by file (the `counts` of its record)."""

    files: int = 0
    ok: int = 0
    rejected: int = 0
    too_short: int = 0
    windows: int = 0
    windows_dropped: int = 0
    windows_truncated: int = 0
    samples_train: int = 0
    samples_val: int = 0
    tokens_train: int = 0
    tokens_val: int = 0
    tokens_encoded: int = 0

    def set_split(self, split: str, samples: int, tokens: int) -> None:
        if split == "train":
            self.samples_train, self.tokens_train = samples, tokens
        elif split == "val":
            self.samples_val, self.tokens_val = samples, tokens
        else:
            raise ValueError(f"unknown split {split!r}")


@dataclass
class BatchResult:
    index: int
    digest: str  # Batch.digest() of the inputs
    counts: BatchCounts = field(default_factory=BatchCounts)
    shards: list[dict] = field(default_factory=list)  # staged shards, manifest-style entries (paths relative to OUT)
    pieces: list[dict] = field(default_factory=list)  # per usable file: source, piece_id, content, split, counts
    rejects: list[Reject] = field(default_factory=list)
    timesig_changed: list[dict] = field(default_factory=list)  # {"source", "changed"}
    timings: dict = field(default_factory=dict)  # seconds per stage (not part of the output identity)
    peak_rss_mb: float = 0.0  # the worker process's peak resident memory after this batch
    started: float = 0.0  # wall clock (time.time()) when the worker began and ended the batch, and its process:
    ended: float = 0.0  # the build's stats show from them how long the workers waited (start-up, driver, tail)
    pid: int = 0

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> BatchResult:
        return cls(**{**d, "counts": BatchCounts(**d["counts"]), "rejects": [Reject(**r) for r in d["rejects"]]})

    def reject(self, path: str, reason: str, message: str) -> None:
        self.rejects.append(Reject(path, reason, message))
        self.counts.rejected += 1


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


def max_polyphony(notes: np.ndarray) -> int:
    """Most notes sounding at once, from (onset, duration, pitch) rows; a note ends before one starting then."""
    if not len(notes):
        return 0
    times = np.concatenate([notes[:, 0], notes[:, 0] + np.maximum(notes[:, 1], 1)])
    delta = np.concatenate([np.ones(len(notes), np.int64), -np.ones(len(notes), np.int64)])
    order = np.lexsort((delta, times))  # at equal times, ends (-1) before starts (+1)
    return int(np.cumsum(delta[order]).max())


def longest_silence(notes: np.ndarray) -> int:
    """Longest stretch (in the notes' time unit) with no note sounding, between the first and the last note."""
    if len(notes) < 2:
        return 0
    ends = np.maximum.accumulate(notes[:, 0] + notes[:, 1])  # rows are sorted by onset
    return int(max(0, (notes[1:, 0] - ends[:-1]).max()))


def span_arrays(arr: np.ndarray, spans: list[WindowSpan]) -> list[np.ndarray]:
    """Each window's tokens as an int32 array: its meta tokens followed by its slice of the piece's ids.

    Slicing one array of the piece (instead of building every overlapping window's token list, about 6x the
    piece with the default stride) is most of what makes windowing cheap.
    """
    return [np.concatenate((np.asarray(s.meta, dtype=np.int32), arr[s.start:s.end])) for s in spans]


def _check_filters(notes: np.ndarray, grid_per_quarter: int, filters: Filters) -> tuple[str, str] | None:
    n = len(notes)
    if n < filters.min_notes:
        return "too-few-notes", f"{n} note(s), at least {filters.min_notes} wanted"
    poly = max_polyphony(notes)
    if poly > filters.max_polyphony:
        return "polyphony-outlier", f"{poly} notes sound at once (limit {filters.max_polyphony})"
    span = (int((notes[:, 0] + notes[:, 1]).max()) - int(notes[:, 0].min())) / grid_per_quarter if n else 0.0
    density = n / max(span, 1.0)
    if density > filters.max_notes_per_beat:
        return "density-outlier", f"{density:.1f} notes per quarter note (limit {filters.max_notes_per_beat:g})"
    silence = longest_silence(notes) / grid_per_quarter
    if silence > filters.max_silence_beats:
        return "long-silence", f"{silence:g} quarter notes without a note (limit {filters.max_silence_beats:g})"
    return None


def _process_file(cfg: BatchSettings, f: CorpusFile, tok: REMI, vocab: Vocab, result: BatchResult,
                  timings: dict) -> _Piece | None:
    """One file to its samples, or a reject recorded in `result` (None)."""
    from .split import GRID_PER_QUARTER

    def reject(reason: str, message: str) -> None:
        result.reject(f.rel, reason, message)

    t0 = time.perf_counter()
    try:
        data = (Path(cfg.corpus) / f.rel).read_bytes()
    except OSError as e:
        return reject("read-error", str(e))
    if not data:
        return reject("empty-file", "the file is 0 bytes")
    t1 = time.perf_counter()
    try:
        piano = load_piano_score(data, tok)
    except MidiRejected as e:
        return reject(e.reason, e.message)
    notes = note_array(piano.score)
    bad = _check_filters(notes, GRID_PER_QUARTER, cfg.filters)
    if bad:
        return reject(*bad)
    t2 = time.perf_counter()
    try:
        ids = encode_piano(piano, tok)
    except Exception as e:  # miditok raises assorted errors on odd content
        return reject("tokenize-error", f"{type(e).__name__}: {e}")
    t3 = time.perf_counter()
    arr = np.array(ids, dtype=np.int32)  # the piece's tokens, converted once: bar index and window slices
    bars = index_bars(arr, vocab)
    if cfg.filters.min_bars and bars.n_bars < cfg.filters.min_bars:
        return reject("too-few-bars", f"{bars.n_bars} bar(s), at least {cfg.filters.min_bars} wanted")
    stats = WindowStats()
    windows = window_spans(bars, cfg.spec, stats)
    t4 = time.perf_counter()
    for k, dt in (("read", t1 - t0), ("parse", t2 - t1), ("tokenize", t3 - t2), ("window", t4 - t3)):
        timings[k] = timings.get(k, 0.0) + dt
    if piano.time_signatures_changed:
        result.timesig_changed.append({"source": f.rel, "changed": piano.time_signatures_changed})
    if stats.too_short:
        result.counts.too_short += 1
        need = cfg.spec.context_bars + cfg.spec.completion_bars
        return reject("too-short", f"{bars.n_bars} bar(s), a window needs {need}")
    if not windows:
        return reject("no-windows", f"all {stats.dropped} window(s) exceed max-seq-len {cfg.spec.max_seq_len}")
    t5 = time.perf_counter()
    content = note_content_hash(notes)
    split = assign_split(content, cfg.val_fraction, cfg.seed)
    samples = [Sample(tokens=tok_arr, meta_len=w.meta_len, ctx_len=w.ctx_len, completion_len=w.completion_len,
                      piece_id=f.sha256, source=f.rel, window=w.window, first_bar=w.first_bar)
               for w, tok_arr in zip(windows, span_arrays(arr, windows), strict=True)]
    piece = {"source": f.rel, "piece_id": f.sha256, "content": content, "split": split,
             "samples": len(samples), "tokens": sum(len(s.tokens) for s in samples),
             "windows": len(windows) + stats.dropped, "windows_dropped": stats.dropped,
             "windows_truncated": stats.truncated, "tokens_encoded": len(ids)}
    if cfg.minhash:
        piece["minhash"] = minhash_signature(notes)
    result.pieces.append(piece)
    timings["dedup"] = timings.get("dedup", 0.0) + time.perf_counter() - t5
    c = result.counts
    c.ok += 1
    c.windows += piece["windows"]
    c.windows_dropped += stats.dropped
    c.windows_truncated += stats.truncated
    c.tokens_encoded += len(ids)
    return _Piece(split, samples)


def write_shard(out: str | Path, stem: str, split: str, samples: list[Sample], formats: tuple[str, ...],
                thash: str, token_dtype: str) -> list[dict]:
    """Write `samples` as OUT/stem.<suffix> in every format; their manifest entries."""
    out = Path(out)
    entries = []
    for fmt in formats:
        rel = stem + SUFFIX[fmt]
        path = out / rel
        if fmt == "parquet":
            write_parquet(path, samples, thash, token_dtype=token_dtype)
            digest = sha256_file(path)
        else:
            digest = write_webdataset(path, samples, token_dtype)  # hashed as written, not read back
        entries.append({"path": rel, "split": split, "format": fmt, "nsamples": len(samples),
                        "bytes": path.stat().st_size, "sha256": digest})
    return entries


def write_split_shards(out: str | Path, prefix: str, batch_index: int, split: str, samples: list[Sample],
                       formats: tuple[str, ...], samples_per_shard: int, thash: str, token_dtype: str) -> list[dict]:
    """Write `samples` as parts of `samples_per_shard` under OUT/prefix/split/; their manifest entries."""
    entries = []
    for part, start in enumerate(range(0, len(samples), samples_per_shard)):
        stem = f"{prefix}{split}/{part_stem(batch_index, part)}"
        entries += write_shard(out, stem, split, samples[start:start + samples_per_shard], formats, thash,
                               token_dtype)
    return entries


def process_batch(task: BatchTask) -> BatchResult:
    """Build, stage and record one batch. Per-file problems become rejects; the batch always completes.

    The cyclic garbage collector is paused for the batch: miditok creates millions of short-lived objects, and
    the collector's repeated scans of them cost about a third of the tokenization time. The batch's garbage is
    collected once at its end, so memory stays bounded by one batch.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        with mark_started(task.settings.out, task.attempt):
            return _process_batch(task)
    finally:
        gc.collect(0)  # with collection paused nothing was promoted: the batch's objects are all in generation 0
        if was_enabled:
            gc.enable()


def _process_batch(task: BatchTask) -> BatchResult:
    started = time.time()
    t_start = time.perf_counter()
    cfg = task.settings
    tok, vocab = _load_tokenizer(cfg.tokenizer_path, cfg.tokenizer_hash)
    result = BatchResult(task.batch.index, task.batch.digest())
    timings: dict = {}
    by_split: dict[str, list[Sample]] = {s: [] for s in SPLITS}
    watchdog = FileWatchdog(cfg.out, cfg.file_timeout)
    for f in task.batch.files:
        result.counts.files += 1
        if f.rel in task.crashed:
            result.reject(f.rel, "worker-crash", "the worker process died on this file (after retries)")
            continue
        if timeout_marker(cfg.out, f.sha256).is_file():
            result.reject(f.rel, "timeout", f"processing took longer than {cfg.file_timeout} s")
            continue
        try:
            with watchdog.watch(f.rel, f.sha256):
                piece = _process_file(cfg, f, tok, vocab, result, timings)
        except Exception as e:  # a bug or an unforeseen input must not take the other files down
            result.reject(f.rel, "internal-error", f"{type(e).__name__}: {e}")
            continue
        if piece is not None:
            by_split[piece.split].extend(piece.samples)
    if task.probe:
        return result
    t_write = time.perf_counter()
    for split, samples in by_split.items():
        result.counts.set_split(split, len(samples), sum(len(s.tokens) for s in samples))
        result.shards += write_split_shards(cfg.out, f"{STAGING_DIR}/", task.batch.index, split, samples,
                                            cfg.formats, cfg.samples_per_shard, cfg.tokenizer_hash, cfg.token_dtype)
    timings["write"] = time.perf_counter() - t_write
    timings["total"] = time.perf_counter() - t_start
    result.timings = {k: round(v, 4) for k, v in timings.items()}
    result.peak_rss_mb = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    result.started, result.ended, result.pid = round(started, 4), round(time.time(), 4), os.getpid()
    write_json_atomic(batch_record_path(cfg.out, task.batch.index), result.to_json())
    return result


def load_finished(out: str | Path, batch: Batch) -> BatchResult | None:
    """The recorded result of `batch` if it finished with the same inputs and its staged shards are all present."""
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

"""Typed build configuration: what shapes the output (BuildConfig) and how the job runs (Runtime)."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rwkv_music.remi.windows import WindowSpec

from ..shards.schema import FORMAT_VERSION, FORMATS

# Files per Dask task. Fixed (never derived from --workers) so batch contents, shard names and shard
# bytes are the same whatever the cluster looks like.
DEFAULT_FILES_PER_BATCH = 16
NEAR_DEDUP = ("content", "minhash", "off")


@dataclass(frozen=True)
class Filters:
    """Quality filters applied to each merged piano piece (rejects with a reason, counted in the manifest)."""

    min_notes: int = 1  # fewer notes: "too-few-notes"
    min_bars: int = 0  # fewer bars: "too-few-bars" (a window's own need is always enforced: "too-short")
    max_polyphony: int = 64  # more notes sounding at once anywhere: "polyphony-outlier"
    max_notes_per_beat: float = 32.0  # more notes per quarter note on average: "density-outlier"
    max_silence_beats: float = 256.0  # a longer silence (quarter notes) inside the piece: "long-silence"

    def __post_init__(self):
        if self.min_notes < 0 or self.min_bars < 0 or self.max_polyphony < 1 or self.max_notes_per_beat <= 0 \
                or self.max_silence_beats <= 0:
            raise ValueError("filters: min-notes/min-bars must be >= 0, max-polyphony >= 1, max-notes-per-beat and "
                             "max-silence-beats > 0")


@dataclass(frozen=True)
class BuildConfig:
    """Everything that determines the bytes of the shards."""

    corpus: Path
    out: Path
    spec: WindowSpec = field(default_factory=WindowSpec)
    formats: tuple[str, ...] = FORMATS
    samples_per_shard: int = 4096
    val_fraction: float = 0.05
    seed: int = 0
    files_per_batch: int = DEFAULT_FILES_PER_BATCH
    tokenizer_overrides: dict | None = None
    filters: Filters = field(default_factory=Filters)
    near_dedup: str = "content"  # "content": note-level hash; "minhash": also MinHash over note n-grams; "off"
    minhash_threshold: float = 0.9  # estimated Jaccard similarity above which two pieces are near-duplicates

    def __post_init__(self):
        if self.near_dedup not in NEAR_DEDUP:
            raise ValueError(f"near_dedup must be one of {NEAR_DEDUP}")
        if not 0.0 < self.minhash_threshold <= 1.0:
            raise ValueError("minhash_threshold must be in (0, 1]")
        if not self.formats or any(f not in FORMATS for f in self.formats):
            raise ValueError(f"formats must be a non-empty subset of {FORMATS}")
        if self.samples_per_shard < 1:
            raise ValueError("samples_per_shard must be >= 1")
        if not 0.0 <= self.val_fraction <= 1.0:
            raise ValueError("val_fraction must be in [0, 1]")
        if self.files_per_batch < 1:
            raise ValueError("files_per_batch must be >= 1")

    def fingerprint(self, tokenizer_hash: str) -> dict:
        """The settings an existing OUT must share to be reused (paths normalised, no runtime options)."""
        return {
            "format_version": FORMAT_VERSION,
            "corpus": str(Path(self.corpus).resolve()),
            "tokenizer_hash": tokenizer_hash,
            **asdict(self.spec),
            "formats": list(self.formats),
            "samples_per_shard": self.samples_per_shard,
            "val_fraction": self.val_fraction,
            "seed": self.seed,
            "files_per_batch": self.files_per_batch,
            "filters": asdict(self.filters),
            "near_dedup": self.near_dedup,
            **({"minhash_threshold": self.minhash_threshold} if self.near_dedup == "minhash" else {}),
        }


@dataclass(frozen=True)
class Runtime:
    """How the build runs; none of this changes the output bytes."""

    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    scheduler: str | None = None  # address of an existing Dask scheduler
    scheduler_file: str | None = None  # or the JSON file an existing scheduler wrote (dask scheduler --scheduler-file)
    dashboard_address: str | None = "127.0.0.1:8787"  # loopback only; "0.0.0.0:8787" exposes it
    overwrite: bool = False
    progress: bool = True
    performance_report: str | None = ""  # HTML report path; "" = OUT/performance-report.html, None = none
    file_timeout: float | None = 30.0  # seconds one file may take in parse+tokenize+window; None = no limit
    retries: int = 1  # worker deaths a batch may cause before it is split to find the culprit file

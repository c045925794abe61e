"""Typed build configuration: what shapes the output (BuildConfig) and how the job runs (Runtime)."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..shards.schema import FORMAT_VERSION, FORMATS
from .windows import WindowSpec

# Files per Dask task. Fixed (never derived from --workers) so batch contents, shard names and shard
# bytes are the same whatever the cluster looks like.
DEFAULT_FILES_PER_BATCH = 16


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

    def __post_init__(self):
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
        }


@dataclass(frozen=True)
class Runtime:
    """How the build runs; none of this changes the output bytes."""

    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    scheduler: str | None = None  # address of an existing Dask scheduler
    dashboard_address: str | None = ":8787"
    overwrite: bool = False
    progress: bool = True
    performance_report: str | None = None  # path of a Dask performance report (HTML)

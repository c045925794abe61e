"""`musicprep`: build training shards from a MIDI corpus, inspect them, and listen to samples."""

from __future__ import annotations

import math
import os
import re
import sys
import time
from pathlib import Path

import click

from rwkv_music.remi.windows import WindowSpec

from ..shards.schema import FORMATS


class UsageFailure(click.ClickException):
    """A one-line error with exit code 2 (bad arguments or input; nothing was written)."""

    exit_code = 2


class BuildFailure(click.ClickException):
    """A one-line error with exit code 1: the build ran but produced nothing usable."""

    exit_code = 1


def _echo_err(msg: str) -> None:
    click.echo(msg, err=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="rwkv-music", prog_name="musicprep", message="%(prog)s %(version)s")
def main() -> None:
    """MIDI corpus -> Parquet/WebDataset training shards (see docs/pipeline.md)."""


@main.command("build-shards")
@click.argument("corpus", type=click.Path(path_type=Path))
@click.option("-o", "--out", required=True, type=click.Path(path_type=Path), help="Output directory.")
@click.option("--context-bars", default=4, show_default=True, type=int,
              help="Bars of context per window.")
@click.option("--completion-bars", default=2, show_default=True, type=int,
              help="Bars to complete per window.")
@click.option("--stride-bars", default=1, show_default=True, type=int,
              help="Bars between window starts.")
@click.option("--max-seq-len", default=2048, show_default=True, type=int,
              help="Longest window in tokens.")
@click.option("--format", "fmt", type=click.Choice(["both", *FORMATS]), default="both", show_default=True,
              help="Shard format(s) to write.")
@click.option("--samples-per-shard", default=4096, show_default=True, type=int,
              help="Most samples per shard file.")
@click.option("--val-fraction", default=0.05, show_default=True, type=float,
              help="Share of pieces in the val split.")
@click.option("--seed", default=0, show_default=True, type=int,
              help="Mixed into the split hash: another seed puts other pieces in val.")
@click.option("--workers", default=None, type=int, help="Dask worker processes [default: CPU count].")
@click.option("--scheduler", default=None, help="Address of an existing Dask scheduler (no LocalCluster).")
@click.option("--scheduler-file", default=None, type=click.Path(path_type=Path, dir_okay=False),
              help="Scheduler file of an existing Dask cluster (dask scheduler --scheduler-file).")
@click.option("--dashboard-address", default="127.0.0.1:8787", show_default=True,
              help="Dashboard address of the embedded cluster: this machine only by default; 0.0.0.0:8787 exposes it "
                   "to the network ('' disables it).")
@click.option("--tokenizer-config", type=click.Path(path_type=Path, dir_okay=False),
              help="JSON/TOML file of miditok TokenizerConfig overrides.")
@click.option("--bar-phase", default=0, show_default=True, type=click.IntRange(0, 64),
              help="Start every window with a BarPhase token: its first bar in the piece modulo N (8 for eight-bar "
                   "phrases), so the model knows where in a phrase it is. Adds N tokens to the vocabulary; "
                   "`musictrain complete --first-bar` sets it for a prompt. 0: off.")
@click.option("--files-per-batch", default=None, type=click.IntRange(min=1),
              help="Files per Dask task (fixed; part of the output identity) [default: 16].")
@click.option("--overwrite", is_flag=True, help="Replace an OUT built with a different configuration.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option("--performance-report", default=None,
              help="Dask's HTML performance report of the run [default: OUT/performance-report.html; '' = none].")
@click.option("--near-dedup", type=click.Choice(["content", "minhash", "off"]), default="content", show_default=True,
              help="Drop re-encoded copies (equal notes); 'minhash' also drops close variants.")
@click.option("--minhash-threshold", default=0.9, show_default=True, type=float,
              help="Estimated note 4-gram Jaccard similarity that makes two pieces near-duplicates.")
@click.option("--min-notes", default=1, show_default=True, type=int, help="Reject pieces with fewer notes.")
@click.option("--min-bars", default=0, show_default=True, type=int,
              help="Reject pieces with fewer bars (windows always need context + completion bars).")
@click.option("--max-polyphony", default=64, show_default=True, type=int,
              help="Reject pieces with more notes sounding at once.")
@click.option("--max-notes-per-beat", default=32.0, show_default=True, type=float,
              help="Reject pieces averaging more notes per quarter note.")
@click.option("--max-silence-beats", default=256.0, show_default=True, type=float,
              help="Reject pieces with a longer silence inside (quarter notes).")
@click.option("--file-timeout", default=30.0, show_default=True, type=float,
              help="Seconds one file may take before it is rejected as 'timeout' (0 = no limit).")
@click.option("--retries", default=1, show_default=True, type=click.IntRange(min=0),
              help="Worker deaths a batch may cause before it is split to isolate the file (embedded cluster).")
def build_shards_cmd(corpus: Path, out: Path, context_bars: int, completion_bars: int, stride_bars: int,
                     max_seq_len: int, fmt: str, samples_per_shard: int, val_fraction: float, seed: int,
                     workers: int | None, scheduler: str | None, scheduler_file: Path | None,
                     dashboard_address: str, tokenizer_config: Path | None, bar_phase: int,
                     files_per_batch: int | None,
                     overwrite: bool, no_progress: bool, performance_report: str | None, near_dedup: str,
                     minhash_threshold: float, min_notes: int, min_bars: int, max_polyphony: int,
                     max_notes_per_beat: float, max_silence_beats: float, file_timeout: float, retries: int) -> None:
    """Tokenize CORPUS (all .mid/.midi below it) into bar-aligned windows and write shards to OUT."""
    from .lean import skip_miditok_torch

    skip_miditok_torch()  # this process only tokenizes (see lean.py); a no-op if miditok is already loaded
    from rwkv_music.remi.tokenizer import load_tokenizer_overrides, with_bar_phase

    from .build import BuildError, NothingUsable, build_shards, summary_table
    from .config import DEFAULT_FILES_PER_BATCH, BuildConfig, Filters, Runtime
    from .driver import ClusterLost, SchedulerUnreachable, scheduler_file_address
    from .scan import CorpusError

    try:
        overrides = load_tokenizer_overrides(tokenizer_config) if tokenizer_config else None
        overrides = with_bar_phase(overrides, bar_phase)
        spec = WindowSpec(context_bars, completion_bars, stride_bars, max_seq_len)
        cfg = BuildConfig(corpus=corpus, out=out, spec=spec,
                          formats=FORMATS if fmt == "both" else (fmt,), samples_per_shard=samples_per_shard,
                          val_fraction=val_fraction, seed=seed,
                          files_per_batch=files_per_batch or DEFAULT_FILES_PER_BATCH, tokenizer_overrides=overrides,
                          filters=Filters(min_notes, min_bars, max_polyphony, max_notes_per_beat, max_silence_beats),
                          near_dedup=near_dedup, minhash_threshold=minhash_threshold)
        if workers is not None and workers < 1:
            raise ValueError("--workers must be >= 1")
        if scheduler and scheduler_file:
            raise ValueError("give --scheduler or --scheduler-file, not both")
        if scheduler_file:  # checked before anything is written (dask_client reads it again to connect)
            scheduler_file_address(scheduler_file)
        if dashboard_address and not re.fullmatch(r"(\[[0-9a-fA-F:.]*\]|[^:\s]*):\d{1,5}", dashboard_address):
            raise ValueError(f"--dashboard-address must be HOST:PORT (or '' for none), not {dashboard_address!r}")
        for name, v in (("--val-fraction", val_fraction), ("--minhash-threshold", minhash_threshold),
                        ("--max-notes-per-beat", max_notes_per_beat), ("--max-silence-beats", max_silence_beats),
                        ("--file-timeout", file_timeout)):
            if not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number, not {v}")
        if file_timeout < 0:
            raise ValueError("--file-timeout must be >= 0")
        rt = Runtime(workers=workers or os.cpu_count() or 1, scheduler=scheduler,
                     scheduler_file=str(scheduler_file) if scheduler_file else None,
                     dashboard_address=dashboard_address or None, overwrite=overwrite, progress=not no_progress,
                     performance_report="" if performance_report is None else (performance_report or None),
                     file_timeout=file_timeout or None, retries=retries)
    except (OSError, ValueError, SchedulerUnreachable) as e:
        raise UsageFailure(str(e)) from e
    t0 = time.perf_counter()
    try:
        manifest = build_shards(cfg, rt, log=_echo_err)
    except (CorpusError, BuildError, SchedulerUnreachable) as e:
        raise UsageFailure(str(e)) from e
    except NothingUsable as e:
        raise BuildFailure(str(e)) from e
    except ClusterLost as e:
        raise BuildFailure(f"{e}; finished batches are kept: run the same command again to resume") from e
    click.echo(summary_table(manifest))
    click.echo(f"wrote {out} in {time.perf_counter() - t0:.1f}s")


@main.command("inspect")
@click.argument("out", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--verify", is_flag=True, help="Re-hash every shard against the manifest.")
def inspect_cmd(out: Path, verify: bool) -> None:
    """Print a build's manifest summary and sample length statistics.

    A shard that cannot be read is named on stderr and left out of the statistics; the exit status is then 1
    (as it is when --verify finds a problem)."""
    from ..shards.manifest import ManifestError
    from .inspect import inspect_report

    try:
        report = inspect_report(out, verify=verify)
    except ManifestError as e:
        raise UsageFailure(str(e)) from e
    click.echo(report.text)
    for line in report.damaged:
        _echo_err(f"Error: {line}")
    if not report.ok:
        sys.exit(1)


@main.command("sample")
@click.argument("out", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("-n", "num", default=4, show_default=True, type=click.IntRange(min=1), help="Samples to draw.")
@click.option("-o", "--output", "dest", required=True, type=click.Path(path_type=Path, file_okay=False),
              help="Directory for the MIDI files and index.json.")
@click.option("--split", type=click.Choice(["train", "val"]), default="train", show_default=True,
              help="Split to draw from.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the draw.")
def sample_cmd(out: Path, num: int, dest: Path, split: str, seed: int) -> None:
    """Decode NUM random samples back to MIDI: context, completion and the joined window, per sample."""
    from ..shards.manifest import ManifestError
    from .listen import write_random_samples

    try:
        written = write_random_samples(out, dest, num, split=split, seed=seed)
    except (ManifestError, ValueError) as e:
        raise UsageFailure(str(e)) from e
    for line in written:
        click.echo(line)


if __name__ == "__main__":
    main()

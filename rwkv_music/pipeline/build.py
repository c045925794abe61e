"""`musicprep build-shards`: check inputs and OUT, scan, run the batches on Dask, write manifest and rejects."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from rwkv_music.atomic import write_bytes_atomic, write_json_atomic
from rwkv_music.remi.tokenizer import build_tokenizer, save_tokenizer, tokenizer_hash

from ..shards.manifest import MANIFEST, REJECTS, TOKENIZER
from ..shards.schema import FORMAT_VERSION, SPLITS, shard_stem, token_dtype_for
from .batch import BATCH_DIR, STAGING_DIR, BatchResult, BatchSettings, BatchTask, load_finished
from .config import BuildConfig, Runtime
from .dedup import find_near_duplicates
from .finalize import publish
from .scan import CorpusError, Reject, corpus_mix, find_midi, make_batches, scan_corpus

BUILD_CONFIG = ".build/config.json"
STATS = "stats.json"
PERFORMANCE_REPORT = "performance-report.html"
OWNED = ("train", "val", ".build", MANIFEST, REJECTS, TOKENIZER, STATS, PERFORMANCE_REPORT)
# Reject reasons that are quality filters (counted under counts.filtered) rather than unreadable input.
FILTER_REASONS = ("no-pitched-tracks", "no-notes", "too-few-notes", "too-few-bars", "too-short", "polyphony-outlier",
                  "density-outlier", "long-silence", "no-windows")


class BuildError(Exception):
    """A problem with the inputs or OUT that stops the build before anything is written."""


class NothingUsable(Exception):
    """Every file was rejected (or skipped): the build has no sample. Raised after rejects.jsonl is written,
    instead of publishing a manifest of an empty build that training would only fail on later."""


def _prepare_out(out: Path, fingerprint: dict, overwrite: bool) -> None:
    """Refuse an OUT built with other settings (or not by us) unless `overwrite`; then clear our files there."""
    if out.exists() and not out.is_dir():
        raise BuildError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        cfg_path = out / BUILD_CONFIG
        previous = json.loads(cfg_path.read_text()) if cfg_path.is_file() else None
        if previous != fingerprint:
            if not overwrite:
                what = "a build with a different configuration" if previous else "files from something else"
                diff = ""
                if previous:
                    keys = sorted(k for k in set(previous) | set(fingerprint) if previous.get(k) != fingerprint.get(k))
                    diff = f" (differs in: {', '.join(keys)})"
                raise BuildError(f"{out} already holds {what}{diff}; pass --overwrite to replace it")
            for name in OWNED:
                p = out / name
                if p.is_dir():
                    shutil.rmtree(p)
                elif p.exists():
                    p.unlink()
    for d in (*SPLITS, *(f"{STAGING_DIR}/{s}" for s in SPLITS)):  # leftovers of an interrupted write
        for tmp in (out / d).glob(".*.tmp") if (out / d).is_dir() else []:
            tmp.unlink()
    write_json_atomic(out / BUILD_CONFIG, fingerprint)


def _args_record(cfg: BuildConfig, rt: Runtime) -> dict:
    return {
        "corpus": str(cfg.corpus), "out": str(cfg.out), **asdict(cfg.spec), "formats": list(cfg.formats),
        "samples_per_shard": cfg.samples_per_shard, "val_fraction": cfg.val_fraction, "seed": cfg.seed,
        "files_per_batch": cfg.files_per_batch, "tokenizer_overrides": cfg.tokenizer_overrides,
        "filters": asdict(cfg.filters), "near_dedup": cfg.near_dedup, "minhash_threshold": cfg.minhash_threshold,
        "workers": rt.workers, "scheduler": rt.scheduler or rt.scheduler_file,
        "dashboard_address": rt.dashboard_address,
        "file_timeout": rt.file_timeout, "retries": rt.retries,
    }


def _start_cluster_early(out: Path, rt: Runtime) -> bool:
    """Start the embedded cluster before the scan, in the background, for a build that will run batches.

    A fresh OUT will; a resumed one may have nothing left to run, so its cluster is started after the scan,
    only if needed, as is a connection to an external scheduler (nothing to start).
    """
    if rt.scheduler or rt.scheduler_file:
        return False
    records = out / BATCH_DIR
    return not (records.is_dir() and any(records.iterdir()))


def build_shards(cfg: BuildConfig, rt: Runtime, log: Callable[[str], None] = print) -> dict:
    """Run a whole build; returns the manifest. Raises BuildError/CorpusError before writing anything."""
    t0, t0_clock = time.perf_counter(), time.time()
    rels = find_midi(cfg.corpus)  # CorpusError: missing, not a dir, no MIDI
    try:
        tok = build_tokenizer(cfg.tokenizer_overrides)
    except (ValueError, TypeError, KeyError) as e:
        raise BuildError(f"invalid tokenizer configuration: {e}") from e
    thash = tokenizer_hash(tok)
    token_dtype = token_dtype_for(len(tok.vocab))
    out = Path(cfg.out)
    _prepare_out(out, cfg.fingerprint(thash), rt.overwrite)
    save_tokenizer(tok, out / TOKENIZER)
    with contextlib.ExitStack() as stack:
        early = None
        if _start_cluster_early(out, rt):
            from .driver import cluster_in_background

            most_batches = -(-len(rels) // cfg.files_per_batch)  # before duplicates are known
            early = stack.enter_context(cluster_in_background(rt, min(rt.workers, most_batches)))
        t_scan = time.perf_counter()
        scan = scan_corpus(cfg.corpus, rels)
        batches = make_batches(corpus_mix(scan.unique, cfg.seed), cfg.files_per_batch)
        t_scan_done = t_run = time.perf_counter()

        results: dict[int, BatchResult] = {}
        ran: list[BatchResult] = []
        settings = BatchSettings(corpus=str(Path(cfg.corpus).resolve()), out=str(out.resolve()),
                                 tokenizer_path=str((out / TOKENIZER).resolve()), tokenizer_hash=thash, spec=cfg.spec,
                                 formats=tuple(cfg.formats), samples_per_shard=cfg.samples_per_shard,
                                 val_fraction=cfg.val_fraction, seed=cfg.seed, filters=cfg.filters,
                                 minhash=cfg.near_dedup == "minhash", file_timeout=rt.file_timeout,
                                 token_dtype=token_dtype)
        tasks = []
        for b in batches:
            done = load_finished(out, b)
            if done is not None:
                results[b.index] = done
            else:
                tasks.append(BatchTask(batch=b, settings=settings))
        if len(results):
            log(f"resuming: {len(results)} of {len(batches)} batch(es) already finished")
        failures: list[Reject] = []

        def on_result(r: BatchResult) -> None:
            results[r.index] = r
            ran.append(r)

        def on_failure(task: BatchTask, e: BaseException) -> None:
            failures.extend(Reject(f.rel, "batch-failed", f"{type(e).__name__}: {e}") for f in task.batch.files)

        if tasks:
            from .driver import run_tasks

            report = rt.performance_report
            if report == "":
                report = str(out / PERFORMANCE_REPORT)
            # Largest batches first, so that no long batch is left running alone at the end (the output does
            # not depend on the order).
            tasks.sort(key=lambda t: (-sum(f.size for f in t.batch.files), t.batch.index))
            run_tasks(tasks, rt, log, on_result, on_failure, report, early)
    t_done = time.perf_counter()

    ordered = [results[i] for i in sorted(results)]
    near = find_near_duplicates([p for r in ordered for p in r.pieces], cfg.near_dedup, cfg.minhash_threshold)
    dropped = set(near)
    shards = publish(out, ordered, dropped, tuple(cfg.formats), cfg.samples_per_shard, thash, token_dtype,
                     threads=min(rt.workers, os.cpu_count() or 1))
    manifest = _assemble_manifest(cfg, rt, tok, thash, scan, ordered, failures, near, shards)
    manifest["token_dtype"] = token_dtype
    rejects = sorted(scan.rejects + failures + [r for res in ordered for r in res.rejects], key=lambda r: r.path)
    write_bytes_atomic(out / REJECTS,
                       "".join(json.dumps(r.to_json(), sort_keys=True) + "\n" for r in rejects).encode())
    if not manifest["counts"]["files_ok"]:
        raise NothingUsable(_nothing_usable_message(manifest["counts"], out / REJECTS))
    write_json_atomic(out / MANIFEST, manifest)
    wall = {"prepare": t_scan - t0, "scan": t_scan_done - t_scan, "batches": t_done - t_run,
            "finish": time.perf_counter() - t_done}
    wall["total"] = time.perf_counter() - t0
    write_json_atomic(out / STATS, {**_stats(wall, ordered, len(tasks)), "workers": _worker_use(ran, t0_clock, wall)})
    return manifest


def _nothing_usable_message(counts: dict, rejects_path: Path) -> str:
    by_reason = sorted(counts["rejected_by_reason"].items(), key=lambda kv: (-kv[1], kv[0]))
    reasons = ", ".join(f"{r} {n}" for r, n in by_reason) or "none"
    skipped = counts["duplicates"] + counts["near_duplicates"]
    extra = f", {skipped} duplicate(s) skipped" if skipped else ""
    return (f"no usable MIDI file among {counts['files_seen']}: {counts['files_rejected']} rejected ({reasons})"
            f"{extra}; see {rejects_path}")


def _stats(wall: dict, results: list[BatchResult], ran: int) -> dict:
    """Where the time went: driver wall clock per phase, and worker seconds per stage summed over batches."""
    stages: dict[str, float] = {}
    for r in results:
        for k, v in r.timings.items():
            stages[k] = stages.get(k, 0.0) + v
    return {
        "wall_seconds": {k: round(v, 3) for k, v in wall.items()},
        "worker_seconds": {k: round(v, 3) for k, v in sorted(stages.items())},
        "batches": {"total": len(results), "ran": ran, "reused": len(results) - ran},
        "tokens_encoded": sum(r.counts.tokens_encoded for r in results),
        "worker_peak_rss_mb": max((r.peak_rss_mb for r in results), default=0.0),
        "per_batch": [{"index": r.index, "files": r.counts.files, **r.timings, "peak_rss_mb": r.peak_rss_mb}
                      for r in results],
    }


def _worker_use(ran: list[BatchResult], t0_clock: float, wall: dict) -> dict:
    """How the worker processes spent the build: when each began its first batch and ended its last (seconds
    after the build started) and how long it was busy; the rest is start-up, waiting and the driver's work."""
    per: dict[int, list[BatchResult]] = {}
    for r in ran:
        per.setdefault(r.pid, []).append(r)
    rows = sorted(({"first_start_s": round(min(r.started for r in rs) - t0_clock, 3),
                    "last_end_s": round(max(r.ended for r in rs) - t0_clock, 3),
                    "busy_s": round(sum(r.ended - r.started for r in rs), 3), "batches": len(rs)}
                   for rs in per.values()), key=lambda w: w["first_start_s"])
    busy = sum(w["busy_s"] for w in rows)
    return {"processes": len(rows), "busy_share": round(busy / (len(rows) * wall["total"]), 3) if rows else 0.0,
            "per_process": rows}


def _assemble_manifest(cfg: BuildConfig, rt: Runtime, tok, thash: str, scan, results: list[BatchResult],
                       failures: list[Reject], near: dict[str, str], shards: list[dict]) -> dict:
    """Everything in batch order, so the manifest does not depend on completion order. Counts cover the kept
    pieces only (near-duplicates are dropped after the batches ran)."""
    kept = [p for r in results for p in r.pieces if p["source"] not in near]
    rejects = scan.rejects + failures + [x for r in results for x in r.rejects]
    by_reason: dict[str, int] = {}
    for x in rejects:
        by_reason[x.reason] = by_reason.get(x.reason, 0) + 1
    counts = {
        "files_seen": scan.seen,
        "files_ok": len(kept),
        "files_rejected": len(rejects),
        "duplicates": len(scan.duplicates),
        "near_duplicates": len(near),
        "too_short": by_reason.get("too-short", 0),
        "filtered": {k: by_reason.get(k, 0) for k in FILTER_REASONS},
        "rejected_by_reason": dict(sorted(by_reason.items())),
        "time_signatures_changed": sum(1 for r in results for t in r.timesig_changed if t["source"] not in near),
        "windows": sum(p["windows"] for p in kept),
        "windows_dropped": sum(p["windows_dropped"] for p in kept),
        "windows_truncated": sum(p["windows_truncated"] for p in kept),
        "samples": {s: sum(p["samples"] for p in kept if p["split"] == s) for s in SPLITS},
        "tokens": {s: sum(p["tokens"] for p in kept if p["split"] == s) for s in SPLITS},
    }
    shards = sorted(shards, key=lambda s: (s["split"], s["format"], s["path"]))
    return {
        "format_version": FORMAT_VERSION,
        "tokenizer": {"hash": thash, "path": TOKENIZER, "config": tok.config.to_dict(serialize=True)},
        "config": cfg.fingerprint(thash),
        "args": _args_record(cfg, rt),
        "counts": counts,
        "duplicates": scan.duplicates,
        "near_duplicates": [{"source": s, "same_as": near[s]} for s in sorted(near)],
        "time_signatures_changed": [t for r in results for t in r.timesig_changed if t["source"] not in near],
        "shards": shards,
    }


def summary_table(manifest: dict) -> str:
    """A short human summary of a build."""
    c = manifest["counts"]
    rows = [
        ("files seen", c["files_seen"]), ("files ok", c["files_ok"]), ("files rejected", c["files_rejected"]),
        ("  of which too short", c["too_short"]), ("duplicates (skipped)", c["duplicates"]),
        ("near-duplicates (skipped)", c["near_duplicates"]),
        *((f"  filtered: {k}", v) for k, v in c["filtered"].items() if v and k != "too-short"),
        ("time signatures changed (files)", c["time_signatures_changed"]),
        ("windows dropped (too long)", c["windows_dropped"]), ("windows truncated", c["windows_truncated"]),
    ]
    for s in SPLITS:
        n_shards = len({shard_stem(e["path"]) for e in manifest["shards"] if e["split"] == s})
        rows.append((f"{s}: samples / tokens / shards", f"{c['samples'][s]} / {c['tokens'][s]} / {n_shards}"))
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    changed = manifest.get("time_signatures_changed", [])
    if changed:
        shown = ", ".join(f"{t['source']} ({t['changed']})" for t in changed[:10])
        more = f" and {len(changed) - 10} more (see manifest.json)" if len(changed) > 10 else ""
        lines.append(f"time signatures mapped to supported ones in: {shown}{more}")
    val_fraction = manifest["config"]["val_fraction"]
    for split, wanted in (("val", val_fraction > 0), ("train", val_fraction < 1)):
        if wanted and c["files_ok"] and not c["samples"][split]:
            lines.append(f"warning: the {split} split is empty ({c['files_ok']} usable piece(s), val-fraction "
                         f"{val_fraction}); change --val-fraction or --seed")
    return "\n".join(lines)


__all__ = ["BuildError", "CorpusError", "NothingUsable", "build_shards", "summary_table"]

"""Pipeline throughput: the whole `musicprep build-shards` against a plain per-core tokenization loop.

    python bench/pipeline.py                       # >= 800 files, reference loop, builds with 1 and 2 workers
    python bench/pipeline.py --workers 1,2,4 --transpose 14
    python bench/pipeline.py --rounds 3            # on a noisy shared VM: median of three rounds

Corpus: every usable file of the real test corpus plus its transpositions by -T..+T semitones (distinct pieces,
so near-dedup keeps them), written once with symusic into a temporary directory.

Reference (per core): one process, for each file: symusic parse + merge of the pitched tracks into the piano
track (load_piano_score) + miditok REMI encode (encode_piano). Nothing else: no windows, no writing.

Build: `musicprep build-shards` in a subprocess (scan, parse, filters, tokenize, window, dedup, split, Parquet and
WebDataset writing, manifest), LocalCluster with N single-thread workers. Its rate is the REMI tokens the workers
encoded divided by the build's own wall time (stats.json, including cluster start-up), and the ratio is that
rate over N x the reference rate. Peak RSS per worker is the largest ru_maxrss a worker reported.

The reference loop runs again after each round of builds: on a shared VM the machine's speed drifts by tens of
percent within minutes, so each build's ratio is taken against the faster of the reference measurements just
before and just after it (the conservative choice), and with `--rounds R` the median over the rounds is given.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import symusic

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from rwkv_music.pipeline.scan import find_midi  # noqa: E402
from rwkv_music.remi.tokenizer import MidiRejected, build_tokenizer, encode_piano, load_piano_score  # noqa: E402


def make_corpus(src: Path, dst: Path, transpose: int) -> int:
    """Transposed copies of every parseable file; returns the number of files written."""
    n = 0
    for rel in find_midi(src):
        try:
            score = symusic.Score(str(src / rel))
        except Exception:
            continue
        if not any(len(t.notes) for t in score.tracks if not t.is_drum):
            continue
        stem = rel.replace("/", "__").rsplit(".", 1)[0]
        for k in range(-transpose, transpose + 1):
            out = dst / f"{stem}__t{k:+03d}.mid"
            score.shift_pitch(k).dump_midi(str(out))
            n += 1
    return n


def reference_rate(corpus: Path, share: int = 0, of: int = 1, gc_paused: bool = False) -> dict:
    """Single-process loop: parse + merge + REMI encode every file (or every `of`-th from `share`); tokens/s.

    `gc_paused`: the same loop with Python's cyclic GC disabled, as the build's workers run (for context only;
    the goal is stated against the plain loop).
    """
    import gc

    tok = build_tokenizer()
    paths = [corpus / r for r in find_midi(corpus)][share::of]
    datas = [p.read_bytes() for p in paths]  # file reading is not part of the reference
    tokens = 0
    if gc_paused:
        gc.disable()
    t0 = time.perf_counter()
    for data in datas:
        with contextlib.suppress(MidiRejected):
            tokens += len(encode_piano(load_piano_score(data, tok), tok))
    dt = time.perf_counter() - t0
    gc.enable()
    return {"files": len(paths), "tokens": tokens, "seconds": round(dt, 2), "tokens_per_s": tokens / dt}


def _ref_share(args: tuple) -> dict:
    return reference_rate(*args)


def concurrent_reference_rate(corpus: Path, n: int) -> dict:
    """`n` reference loops at once, each on 1/n of the files: what n cores of this machine give together."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(n) as pool:
        parts = pool.map(_ref_share, [(corpus, i, n) for i in range(n)])
    tokens = sum(p["tokens"] for p in parts)
    slowest = max(p["seconds"] for p in parts)
    return {"loops": n, "tokens": tokens, "seconds": slowest, "tokens_per_s": tokens / slowest}


def build_rate(corpus: Path, out: Path, workers: int, fmt: str = "both") -> dict:
    if out.exists():
        shutil.rmtree(out)
    cmd = [sys.executable, "-m", "rwkv_music.pipeline.cli", "build-shards", str(corpus), "-o", str(out),
           "--workers", str(workers), "--no-progress", "--dashboard-address", "", "--performance-report", "",
           "--format", fmt]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    outer = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"build failed:\n{proc.stderr}")
    stats = json.loads((out / "stats.json").read_text())
    manifest = json.loads((out / "manifest.json").read_text())
    wall = stats["wall_seconds"]["total"]
    return {"workers": workers, "wall_s": wall, "process_wall_s": round(outer, 2),
            "tokens_encoded": stats["tokens_encoded"], "tokens_per_s": stats["tokens_encoded"] / wall,
            "files_ok": manifest["counts"]["files_ok"], "samples": sum(manifest["counts"]["samples"].values()),
            "worker_peak_rss_mb": stats["worker_peak_rss_mb"], "phases": stats["wall_seconds"],
            "worker_seconds": stats["worker_seconds"], "worker_use": stats.get("workers", {})}


def _print_build(r: dict) -> None:
    print(f"build, {r['workers']} worker(s): {r['tokens_encoded']} tokens in {r['wall_s']} s = "
          f"{r['tokens_per_s'] / 1e3:.0f}k tokens/s; peak RSS per worker {r['worker_peak_rss_mb']:.0f} MiB; "
          f"phases {r['phases']}; whole process {r['process_wall_s']} s")
    use = r["worker_use"]
    if use:
        first = min(p["first_start_s"] for p in use["per_process"])
        last = max(p["last_end_s"] for p in use["per_process"])
        print(f"  workers busy {use['busy_share']:.1%} of processes x wall; first batch began at {first:.2f} s, "
              f"last ended at {last:.2f} s of {r['wall_s']:.2f} s; worker seconds {r['worker_seconds']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, default=REPO.parent / "shared" / "corpus" / "miditok-tests")
    ap.add_argument("--transpose", type=int, default=14, help="copies at -T..+T semitones")
    ap.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    ap.add_argument("--format", default="both", choices=["both", "parquet", "webdataset"], help="shard formats")
    ap.add_argument("--rounds", type=int, default=1,
                    help="repeat the builds (each round followed by a reference loop); ratios' median reported")
    ap.add_argument("--work-dir", type=Path, default=None, help="keep the corpus and builds here")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    a = ap.parse_args()
    counts = [int(x) for x in a.workers.split(",")]

    work = a.work_dir or Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    corpus = work / "corpus"
    if corpus.exists():
        shutil.rmtree(corpus)
    corpus.mkdir(parents=True)
    n = make_corpus(a.corpus, corpus, a.transpose)
    print(f"corpus: {n} files in {corpus} ({sum(p.stat().st_size for p in corpus.iterdir()) / 2**20:.1f} MiB)")
    refs = [reference_rate(corpus)]
    print(f"reference loop (1 process): {refs[0]['tokens']} tokens in {refs[0]['seconds']} s = "
          f"{refs[0]['tokens_per_s'] / 1e3:.0f}k tokens/s per core")
    ref_nogc = reference_rate(corpus, gc_paused=True)
    print(f"  (for context: the same loop with the cyclic GC paused, as in the workers: "
          f"{ref_nogc['tokens_per_s'] / 1e3:.0f}k tokens/s)")
    concurrent = {}
    for w in counts:
        if w > 1:
            concurrent[w] = concurrent_reference_rate(corpus, w)
            print(f"reference loop, {w} processes at once: {concurrent[w]['tokens_per_s'] / 1e3:.0f}k tokens/s "
                  f"together ({concurrent[w]['tokens_per_s'] / (w * refs[0]['tokens_per_s']):.2f} x {w} single "
                  "loops)")
    rounds = []
    for k in range(a.rounds):
        builds = []
        for w in counts:
            r = build_rate(corpus, work / f"out-{w}", w, a.format)
            _print_build(r)
            builds.append(r)
        refs.append(reference_rate(corpus))
        before, after = refs[k]["tokens_per_s"], refs[k + 1]["tokens_per_s"]
        print(f"reference loop again: {after / 1e3:.0f}k tokens/s per core (before this round: {before / 1e3:.0f}k)")
        for r in builds:
            w = r["workers"]
            r["ratio_before"], r["ratio_after"] = r["tokens_per_s"] / (w * before), r["tokens_per_s"] / (w * after)
            r["ratio"] = min(r["ratio_before"], r["ratio_after"])
            print(f"round {k + 1}, {w} worker(s): ratio to {w} x reference = {r['ratio']:.2f} against the faster "
                  f"reference ({r['ratio_before']:.2f} before, {r['ratio_after']:.2f} after)")
        rounds.append(builds)
    for i, w in enumerate(counts):
        ratios = sorted(b[i]["ratio"] for b in rounds)
        print(f"{w} worker(s): median ratio {statistics.median(ratios):.2f} over {len(ratios)} round(s) "
              f"({', '.join(f'{x:.2f}' for x in ratios)})")
    for i in range(1, len(counts)):
        scale = statistics.median(b[i]["tokens_per_s"] / b[0]["tokens_per_s"] for b in rounds)
        print(f"scaling {counts[0]} -> {counts[i]} workers: {scale:.2f}x (median over rounds)")
    info = {"machine": f"{platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
            "python": platform.python_version(), "files": n, "format": a.format, "references": refs,
            "reference_gc_paused": ref_nogc, "concurrent_reference": concurrent, "rounds": rounds}
    if a.json:
        a.json.write_text(json.dumps(info, indent=2))
    if not a.work_dir:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()

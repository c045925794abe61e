"""Shard size and read speed of both formats: bytes per token on disk, and samples/s and tokens/s streamed back.

    python bench/shard_read.py                          # builds examples/demo-corpus into a temporary OUT
    python bench/shard_read.py --out OUT                # an existing build (both formats)
    python bench/shard_read.py --repeat 5               # best of 5 passes per format (default 3)

Reading is what training does per shard: `rwkv_music.shards.iter_shard` over every shard of both splits, in
manifest order, touching each sample's tokens (summed, so nothing is skipped lazily). Each format is read
`--repeat` times after one warm-up pass (the files are then in the page cache: this measures decoding, not the
disk); the best pass is reported. Also reads the tars through the `webdataset` library (`.decode()`), the way
third-party loaders would. Finally, for the train split, the size of the same samples as an uncompressed
tar (int32 and uint16 members) and gzip-compressed at levels 1, 6 and 9, with the compression speed: the
measurement behind the choice of format version 2. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _read_all(out: Path, entries: list[dict], fmt: str) -> tuple[int, int]:
    from rwkv_music.shards import iter_shard

    n = tokens = 0
    for e in entries:
        for s in iter_shard(out / e["path"], fmt):
            tokens += len(s["tokens"])
            n += int(s["tokens"].sum() >= 0)
    return n, tokens


def _read_wds_library(out: Path, entries: list[dict]) -> tuple[int, int]:
    import webdataset as wds

    n = tokens = 0
    for g in wds.WebDataset([str(out / e["path"]) for e in entries], shardshuffle=False).decode():
        tokens += len(g["tokens.npy"])
        n += 1
    return n, tokens


def _tar_variants(out: Path, entries: list[dict], fmt: str, tokens: int) -> dict:
    import gzip

    from rwkv_music.shards import Sample, iter_shard
    from rwkv_music.shards.webdataset import tar_bytes

    samples = [Sample(**r) for e in entries for r in iter_shard(out / e["path"], fmt)]
    got = {}
    for dtype in ("int32", "uint16"):
        raw = tar_bytes(samples, dtype)
        got[f"tar_{dtype}"] = {"bytes_per_token": round(len(raw) / tokens, 3)}
        for level in (1, 6, 9):
            t = time.perf_counter()
            packed = gzip.compress(raw, compresslevel=level, mtime=0)
            secs = time.perf_counter() - t
            got[f"tar_{dtype}_gzip{level}"] = {"bytes_per_token": round(len(packed) / tokens, 3),
                                               "compress_mb_per_s": round(len(raw) / secs / 1e6)}
    return got


def _best(fn, repeat: int) -> tuple[float, tuple[int, int]]:
    got = fn()  # warm-up (page cache, imports)
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        again = fn()
        times.append(time.perf_counter() - t)
        if again != got:
            raise RuntimeError(f"passes disagree: {got} vs {again}")
    return min(times), got


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, help="an existing build with both formats (default: build the demo corpus)")
    ap.add_argument("--corpus", type=Path, default=REPO / "examples" / "demo-corpus")
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="shard-read-") as tmp:
        out = a.out
        if out is None:
            out = Path(tmp) / "out"
            subprocess.run([sys.executable, "-m", "rwkv_music.pipeline.cli", "build-shards", str(a.corpus), "-o",
                            str(out), "--dashboard-address", "", "--no-progress", "--performance-report", ""],
                           check=True, capture_output=True)
        from rwkv_music.shards import read_manifest

        m = read_manifest(out)
        total_tokens = sum(m["counts"]["tokens"].values())
        result = {"machine": f"{platform.machine()}, {os.cpu_count()} CPU(s)",
                  "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                  "out": str(a.out or f"build of {a.corpus}"), "format_version": m["format_version"],
                  "token_dtype": m.get("token_dtype", "int32"), "tokens": total_tokens, "formats": {}}
        for fmt in m["args"]["formats"]:
            entries = [e for e in m["shards"] if e["format"] == fmt]
            size = sum(e["bytes"] for e in entries)
            secs, (n, tokens) = _best(lambda entries=entries, fmt=fmt: _read_all(out, entries, fmt), a.repeat)
            if tokens != total_tokens:
                raise RuntimeError(f"{fmt}: read {tokens} tokens, the manifest says {total_tokens}")
            row = {"shards": len(entries), "bytes": size, "bytes_per_token": round(size / tokens, 4),
                   "samples_per_s": round(n / secs), "tokens_per_s": round(tokens / secs),
                   "disk_mb_per_s": round(size / secs / 1e6, 2)}
            if fmt == "webdataset":
                secs_lib, _ = _best(lambda entries=entries: _read_wds_library(out, entries), a.repeat)
                row["webdataset_library_samples_per_s"] = round(n / secs_lib)
            result["formats"][fmt] = row
        first = m["args"]["formats"][0]
        train = [e for e in m["shards"] if e["split"] == "train" and e["format"] == first]
        result["train_tar_variants"] = _tar_variants(out, train, first, m["counts"]["tokens"]["train"])
        f = result["formats"]
        if len(f) == 2:
            result["webdataset_over_parquet_bytes"] = round(f["webdataset"]["bytes"] / f["parquet"]["bytes"], 2)
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

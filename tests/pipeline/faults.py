"""Test-only Dask worker preload: make a real worker die (SIGSEGV) or hang on the files named in an env var.

The crash-isolation tests start `musicprep build-shards` with DASK_DISTRIBUTED__WORKER__PRELOAD naming this file;
the pipeline loads it in every worker after its own start-up module (driver.worker_preloads), and it wraps the
per-file function of the batch loop. Production code has no fault branch: without this preload nothing changes.

RWKV_MUSIC_TEST_FAULTS="crash:NAME[,hang:NAME...]": on reaching a file whose base name is NAME, the worker
kills itself with SIGSEGV ("crash") or sleeps forever inside the per-file timeout's watch ("hang").
"crash-fail-start" and "crash-slow-start" crash too, after leaving a note (in RWKV_MUSIC_TEST_FAULTS_DIR) that
makes the next worker process's start fail (its nanny then gives up: the cluster is left without workers) or
take SLOW_START_S longer.
"""

from __future__ import annotations

import functools
import os
import signal
import time
from pathlib import Path

from rwkv_music.pipeline import batch

FAULTS_ENV = "RWKV_MUSIC_TEST_FAULTS"
FAULTS_DIR_ENV = "RWKV_MUSIC_TEST_FAULTS_DIR"
SLOW_START_S = 5.0


def _next_start_note() -> Path:
    return Path(os.environ[FAULTS_DIR_ENV]) / "next-worker-start"


def _start_fault() -> None:
    """Run while the worker process starts (this preload is imported then): act on a note a crash left."""
    if FAULTS_DIR_ENV not in os.environ:
        return
    note = _next_start_note()
    try:
        kind = note.read_text()
    except FileNotFoundError:
        return
    note.unlink()
    if kind == "fail":
        raise RuntimeError("test fault: this worker process fails to start")
    time.sleep(SLOW_START_S)


def _faults() -> dict[str, str]:
    spec = os.environ.get(FAULTS_ENV, "")
    return {name: kind for kind, _, name in (item.partition(":") for item in spec.split(",") if item)}


def _with_faults(process_file, faults: dict[str, str]):
    @functools.wraps(process_file)
    def wrapped(cfg, f, *args, **kwargs):
        kind = faults.get(f.rel.rsplit("/", 1)[-1])
        if kind in ("crash-fail-start", "crash-slow-start"):
            _next_start_note().write_text(kind.removeprefix("crash-").removesuffix("-start"))
            kind = "crash"
        if kind == "crash":
            os.kill(os.getpid(), signal.SIGSEGV)
        elif kind == "hang":
            while True:
                time.sleep(3600)
        return process_file(cfg, f, *args, **kwargs)

    return wrapped


_start_fault()
batch._process_file = _with_faults(batch._process_file, _faults())

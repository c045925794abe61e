"""Test-only Dask worker preload: make a real worker die (SIGSEGV) or hang on the files named in an env var.

The crash-isolation tests start `musicprep build-shards` with DASK_DISTRIBUTED__WORKER__PRELOAD naming this file;
the pipeline loads it in every worker after its own start-up module (driver.worker_preloads), and it wraps the
per-file function of the batch loop. Production code has no fault branch: without this preload nothing changes.

RWKV_MUSIC_TEST_FAULTS="crash:NAME[,hang:NAME...]": on reaching a file whose base name is NAME, the worker
kills itself with SIGSEGV ("crash") or sleeps forever inside the per-file timeout's watch ("hang").
"crash-fail-start" and "crash-slow-start" crash too, after leaving a note (in RWKV_MUSIC_TEST_FAULTS_DIR) that
makes the next worker process's start fail (its nanny then gives up: the cluster is left without workers) or
take SLOW_START_S longer; each start made to fail adds a line to FAILED_STARTS in that folder.

Dask runs a preload given as a .py file twice in each worker process (distributed.utils.import_file:
`importlib.reload(importlib.import_module(name))`), so everything here must hold when executed twice: the
per-file function is wrapped once (around the original, not around the first wrapper), and the start-up note
is consumed by the first execution.
"""

from __future__ import annotations

import functools
import os
import signal
import threading
import time
from pathlib import Path

from rwkv_music.pipeline import batch

FAULTS_ENV = "RWKV_MUSIC_TEST_FAULTS"
FAULTS_DIR_ENV = "RWKV_MUSIC_TEST_FAULTS_DIR"
SLOW_START_S = 5.0
FAILED_STARTS = "failed-starts"
START_FAULTS = {"crash-fail-start": "fail", "crash-slow-start": "slow"}


def _next_start_note() -> Path:
    return Path(os.environ[FAULTS_DIR_ENV]) / "next-worker-start"


def _leave_start_note(kind: str) -> None:
    """Write the note whole or not at all (a reader never sees it empty or half-written)."""
    note = _next_start_note()
    tmp = note.with_name(f"{note.name}.{os.getpid()}.tmp")
    tmp.write_text(kind)
    os.replace(tmp, note)


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
        with open(note.with_name(FAILED_STARTS), "a") as log:
            log.write(f"{os.getpid()}\n")
        raise RuntimeError("test fault: this worker process fails to start")
    if kind != "slow":
        raise ValueError(f"test fault: unknown start note {kind!r}")
    time.sleep(SLOW_START_S)


def _faults() -> dict[str, str]:
    spec = os.environ.get(FAULTS_ENV, "")
    return {name: kind for kind, _, name in (item.partition(":") for item in spec.split(",") if item)}


def _crash() -> None:
    """Die of SIGSEGV here, as a native crash in this thread would.

    os.kill(os.getpid(), ...) sends a process-directed signal, which the kernel may deliver to another of the
    worker's threads (its event loop, the stop-queue watcher) while this one runs on for a moment, into the
    file's real processing; pthread_kill directs the signal at this thread, which never returns from it."""
    signal.pthread_kill(threading.get_ident(), signal.SIGSEGV)
    raise RuntimeError("test fault: SIGSEGV did not end the worker process")


def _with_faults(process_file, faults: dict[str, str]):
    @functools.wraps(process_file)
    def wrapped(cfg, f, *args, **kwargs):
        kind = faults.get(f.rel.rsplit("/", 1)[-1])
        if kind in START_FAULTS:
            _leave_start_note(START_FAULTS[kind])
            kind = "crash"
        if kind == "crash":
            _crash()
        elif kind == "hang":
            while True:
                time.sleep(3600)
        return process_file(cfg, f, *args, **kwargs)

    wrapped.without_faults = process_file
    return wrapped


_start_fault()
batch._process_file = _with_faults(getattr(batch._process_file, "without_faults", batch._process_file), _faults())

"""Keep one pathological file from stalling or killing a batch: a per-file timeout and started-markers.

The timeout cannot interrupt native code (symusic, numpy) from Python, so when a file overruns, the watchdog
records the file as timed out (a marker under OUT/.build/timeouts/) and ends the worker process. Dask reschedules
the batch; the new attempt sees the marker and rejects the file as `timeout` without touching it.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path

from rwkv_music.atomic import write_json_atomic

TIMEOUT_DIR = ".build/timeouts"
STARTED_DIR = ".build/started"
TIMEOUT_EXIT_CODE = 75


def timeout_marker(out: str | os.PathLike, sha256: str) -> Path:
    return Path(out) / TIMEOUT_DIR / f"{sha256}.json"


def started_marker(out: str | os.PathLike, key: str, pid: int) -> Path:
    return Path(out) / STARTED_DIR / f"{key}.{pid}"


@contextlib.contextmanager
def mark_started(out: str | os.PathLike, key: str) -> Iterator[None]:
    """Keep OUT/.build/started/KEY.PID while task KEY runs in this process.

    Dask fails every task assigned to a worker that dies, the one it was running and any waiting in its queue
    alike. The marker tells the driver which of them had started there; a task that never started is innocent
    and is simply submitted again, instead of being searched (and its files rejected) as a crasher.
    """
    if not key:
        yield
        return
    path = started_marker(out, key, os.getpid())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


class FileWatchdog:
    """`with watchdog.watch(rel, sha256):` around one file's work; overrunning `timeout` s ends the process."""

    def __init__(self, out: str | os.PathLike, timeout: float | None):
        self.out = out
        self.timeout = timeout

    @contextlib.contextmanager
    def watch(self, rel: str, sha256: str) -> Iterator[None]:
        if not self.timeout:
            yield
            return
        timer = threading.Timer(self.timeout, self._expire, (rel, sha256))
        timer.daemon = True
        timer.start()
        try:
            yield
        finally:
            timer.cancel()

    def _expire(self, rel: str, sha256: str) -> None:
        write_json_atomic(timeout_marker(self.out, sha256), {"path": rel, "timeout_s": self.timeout})
        os._exit(TIMEOUT_EXIT_CODE)

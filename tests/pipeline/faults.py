"""Test-only Dask worker preload: make a real worker die (SIGSEGV) or hang on the files named in an env var.

The crash-isolation tests start `musicprep build-shards` with DASK_DISTRIBUTED__WORKER__PRELOAD naming this file;
the pipeline loads it in every worker after its own start-up module (driver.worker_preloads), and it wraps the
per-file function of the batch loop. Production code has no fault branch: without this preload nothing changes.

RWKV_MUSIC_TEST_FAULTS="crash:NAME[,hang:NAME...]": on reaching a file whose base name is NAME, the worker
kills itself with SIGSEGV ("crash") or sleeps forever inside the per-file timeout's watch ("hang").
"""

from __future__ import annotations

import functools
import os
import signal
import time

from rwkv_music.pipeline import batch

FAULTS_ENV = "RWKV_MUSIC_TEST_FAULTS"


def _faults() -> dict[str, str]:
    spec = os.environ.get(FAULTS_ENV, "")
    return {name: kind for kind, _, name in (item.partition(":") for item in spec.split(",") if item)}


def _with_faults(process_file, faults: dict[str, str]):
    @functools.wraps(process_file)
    def wrapped(cfg, f, *args, **kwargs):
        kind = faults.get(f.rel.rsplit("/", 1)[-1])
        if kind == "crash":
            os.kill(os.getpid(), signal.SIGSEGV)
        elif kind == "hang":
            while True:
                time.sleep(3600)
        return process_file(cfg, f, *args, **kwargs)

    return wrapped


batch._process_file = _with_faults(batch._process_file, _faults())

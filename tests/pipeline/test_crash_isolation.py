"""A worker that dies on one file (segfault) or hangs on one (timeout) costs only that file, in a real build.

The crash and the hang come from a test-only Dask worker preload (tests/pipeline/faults.py, loaded through
Dask's own `distributed.worker.preload` setting): the worker really receives SIGSEGV, or really stops making
progress, on a real file; no valid MIDI file does that reliably.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from rwkv_music.shards import iter_samples, read_manifest

FAULTS_PRELOAD = Path(__file__).with_name("faults.py")

FILES = ["POP909_008", "POP909_010", "POP909_022", "POP909_191", "Maestro_3", "Maestro_4"]


def test_crashing_and_hanging_files_are_rejected_alone(corpus_dir: Path, tmp_path: Path):
    root = tmp_path / "corpus"
    root.mkdir()
    for name in FILES:
        shutil.copy(corpus_dir / "MIDIs_one_track" / f"{name}.mid", root / f"{name}.mid")
    out = tmp_path / "out"
    # batches of 4 (sorted): [Maestro_3, Maestro_4, POP909_008, POP909_010], [POP909_022, POP909_191].
    # One worker: Dask queues several of these small task groups on it at once, so its death also fails tasks
    # that were only waiting (batch 1; the probe of POP909_010 behind the one of POP909_008). Those must be
    # re-run, not convicted.
    env = {**os.environ, "DASK_DISTRIBUTED__WORKER__PRELOAD": json.dumps([str(FAULTS_PRELOAD)]),
           "RWKV_MUSIC_TEST_FAULTS": "crash:POP909_008.mid,hang:POP909_191.mid"}
    cmd = [sys.executable, "-m", "rwkv_music.pipeline.cli", "build-shards", str(root), "-o", str(out),
           "--dashboard-address", "", "--no-progress", "--performance-report", "", "--workers", "1",
           "--files-per-batch", "4", "--val-fraction", "0", "--retries", "0", "--file-timeout", "3"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    rejects = {r["path"]: r for r in map(json.loads, (out / "rejects.jsonl").read_text().splitlines())}
    assert {p: r["reason"] for p, r in rejects.items()} == {"POP909_008.mid": "worker-crash",
                                                            "POP909_191.mid": "timeout"}, (rejects, proc.stderr)
    assert "worker-crash" in proc.stderr and "POP909_008.mid" in proc.stderr
    sources = {r["source"] for r in iter_samples(out, "train")}
    assert sources == {f"{n}.mid" for n in FILES} - set(rejects)
    c = read_manifest(out)["counts"]
    assert c["files_ok"] == 4 and c["rejected_by_reason"] == {"timeout": 1, "worker-crash": 1}
    # the started-markers of the attempts that died were cleared; finished attempts remove their own
    assert not list((out / ".build" / "started").glob("*"))


def _build_with_faults(corpus_dir: Path, tmp_path: Path, names: list[str], faults: str,
                       extra_env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess, Path]:
    root = tmp_path / "corpus"
    root.mkdir()
    for name in names:
        shutil.copy(corpus_dir / "MIDIs_one_track" / f"{name}.mid", root / f"{name}.mid")
    out = tmp_path / "out"
    notes = tmp_path / "faults"
    notes.mkdir()
    env = {**os.environ, "DASK_DISTRIBUTED__WORKER__PRELOAD": json.dumps([str(FAULTS_PRELOAD)]),
           "RWKV_MUSIC_TEST_FAULTS": faults, "RWKV_MUSIC_TEST_FAULTS_DIR": str(notes), **(extra_env or {})}
    cmd = [sys.executable, "-m", "rwkv_music.pipeline.cli", "build-shards", str(root), "-o", str(out),
           "--dashboard-address", "", "--no-progress", "--performance-report", "", "--workers", "1",
           "--files-per-batch", "4", "--val-fraction", "0", "--retries", "0"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env), out


def _assert_only_rejected(out: Path, names: list[str], crasher: str, stderr: str) -> None:
    rejects = {r["path"]: r["reason"] for r in map(json.loads, (out / "rejects.jsonl").read_text().splitlines())}
    assert rejects == {crasher: "worker-crash"}, (rejects, stderr)
    assert {r["source"] for r in iter_samples(out, "train")} == {f"{n}.mid" for n in names} - {crasher}


def test_cluster_left_without_workers_is_restarted(corpus_dir: Path, tmp_path: Path):
    """Each time the crasher kills the worker, the next worker process fails to start, so its nanny gives up and
    closes: the LocalCluster has no worker and nothing of Dask's starts one. The driver's watchdog starts the
    worker processes again, and the build ends as if the file had only crashed its worker.

    That failed start is either the nanny's own restart of the worker or one the watchdog started; and a worker
    the watchdog starts can take the crasher before its nanny has finished starting, which closes that nanny
    too (the watchdog then logs that starting failed, and starts the workers once more). So there is at least
    one "gave up" revival per failed start, not exactly one."""
    names = ["POP909_008", "POP909_010", "Maestro_3"]
    proc, out = _build_with_faults(corpus_dir, tmp_path, names, "crash-fail-start:POP909_008.mid")
    assert proc.returncode == 0, proc.stderr
    failed_starts = (tmp_path / "faults" / "failed-starts").read_text().splitlines()
    assert failed_starts, ("no worker start was made to fail: the fault did not take effect", proc.stderr)
    revivals = proc.stderr.count("no worker alive (its worker nanny gave up restarting it)")
    assert revivals >= len(failed_starts), (revivals, failed_starts, proc.stderr)
    _assert_only_rejected(out, names, "POP909_008.mid", proc.stderr)


def test_restarting_nanny_is_not_closed_by_the_cluster(corpus_dir: Path, tmp_path: Path):
    """Dask's LocalCluster closes a worker's nanny for good when, `distributed.deploy.lost-worker-timeout` after
    the worker left, no worker of its name is registered: a nanny still restarting a worker the crasher killed.
    Here every restart after a crash takes 5 s longer and the user's setting says 1 s (the default 15 s gave the
    hangs on a loaded machine): the embedded cluster must ignore it, so its nanny restarts the worker itself and
    the driver never has to (no "no worker alive" from the watchdog)."""
    names = ["POP909_008", "POP909_010", "Maestro_3"]
    proc, out = _build_with_faults(corpus_dir, tmp_path, names, "crash-slow-start:POP909_008.mid",
                                   {"DASK_DISTRIBUTED__DEPLOY__LOST_WORKER_TIMEOUT": "1s"})
    assert proc.returncode == 0, proc.stderr
    assert "no worker alive" not in proc.stderr, proc.stderr
    _assert_only_rejected(out, names, "POP909_008.mid", proc.stderr)

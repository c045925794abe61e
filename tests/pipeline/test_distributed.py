"""Real processes: a build killed with SIGKILL and resumed, its live dashboard, and a build on an existing
Dask cluster (`dask scheduler` + two `dask worker`s); both must give the session build's exact shard bytes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from rwkv_music.shards import read_manifest, verify_shards

DASK = Path(sys.executable).parent / "dask"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _same_shards(a: Path, b: Path) -> None:
    ea = {(e["path"], e["sha256"]) for e in read_manifest(a)["shards"]}
    eb = {(e["path"], e["sha256"]) for e in read_manifest(b)["shards"]}
    assert ea == eb and ea
    for path, _ in ea:
        assert (a / path).read_bytes() == (b / path).read_bytes()


def _cmd(corpus: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "rwkv_music.pipeline.cli", "build-shards", str(corpus), "-o", str(out),
            "--no-progress", *extra]


def _listening(pid: int) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket in LISTEN state held by process `pid` or any of its descendants."""
    import psutil

    found = set()
    root = psutil.Process(pid)
    for p in [root, *root.children(recursive=True)]:
        try:
            conns = p.net_connections(kind="tcp") if hasattr(p, "net_connections") else p.connections(kind="tcp")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        found |= {(c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN}
    return found


def _wait_for_line(proc: subprocess.Popen, lines: list[str], text: str, deadline: float) -> str:
    while not any(text in line for line in lines):
        assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)
        time.sleep(0.1)
    return next(line for line in lines if text in line)


def _readable(path: Path) -> None:
    if path.suffix == ".parquet":
        pq.read_table(path)
    else:
        with tarfile.open(path) as t:
            t.getmembers()


def test_kill_9_then_rerun_completes_identically_and_dashboard_is_live(corpus_dir, built_shards, built_shards_args,
                                                                        tmp_path):
    out = tmp_path / "out"
    args = list(built_shards_args)
    args[args.index("--workers") + 1] = "1"  # one worker: the second batch is still running when we kill
    # The default dashboard address (no --dashboard-address): 127.0.0.1:8787, or another port on 127.0.0.1 when
    # 8787 is taken on this machine.
    proc = subprocess.Popen(_cmd(corpus_dir, out, *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 120
        url = _wait_for_line(proc, lines, "dashboard: http", deadline).split("dashboard: ")[1].strip()
        assert url.startswith("http://127.0.0.1:") and url.endswith("/status")
        port = int(url.split(":")[2].split("/")[0])
        with urllib.request.urlopen(url, timeout=30) as r:
            page = r.read().decode()
        assert r.status == 200 and "Dask" in page
        # What the build's processes really listen on: the dashboard on loopback, and nothing on a wildcard or
        # an outside address (scheduler and workers included).
        listening = _listening(proc.pid)
        assert ("127.0.0.1", port) in listening
        assert {ip for ip, _ in listening} == {"127.0.0.1"}, listening
        records = out / ".build/batches"
        while not (records.is_dir() and any(records.glob("batch-*.json"))):
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (out / "manifest.json").exists()
    for d in ("train", "val", ".build/staging/train", ".build/staging/val"):  # nothing half-written under a real name
        for p in (out / d).glob("[!.]*") if (out / d).is_dir() else []:
            _readable(p)

    again = subprocess.run(_cmd(corpus_dir, out, *args, "--dashboard-address", ""), capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stderr
    assert "resuming: 1 of 2 batch(es) already finished" in again.stderr
    assert verify_shards(out) == []
    _same_shards(built_shards, out)
    report = (out / "performance-report.html").read_text()
    assert "<html" in report.lower() and "Dask Performance Report" in report


def test_dashboard_on_all_interfaces_only_when_asked(corpus_dir, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in ("POP909_008", "Maestro_3"):
        (corpus / f"{name}.mid").write_bytes((corpus_dir / "MIDIs_one_track" / f"{name}.mid").read_bytes())
    port = _free_port()
    proc = subprocess.Popen(_cmd(corpus, tmp_path / "out", "--workers", "1", "--val-fraction", "0",
                                 "--performance-report", "", "--dashboard-address", f"0.0.0.0:{port}"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    reader.start()
    try:
        _wait_for_line(proc, lines, "dashboard: http", time.monotonic() + 120)
        os.killpg(proc.pid, signal.SIGSTOP)  # hold the build (and its sockets) where it is while we look
        listening = _listening(proc.pid)
        assert ("0.0.0.0", port) in listening, listening
        assert {ip for ip, p in listening if p != port} == {"127.0.0.1"}, listening  # the rest stays local
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.fixture
def dask_cluster(tmp_path):
    """`dask scheduler` and two single-thread `dask worker` processes on 127.0.0.1; yields the scheduler file."""
    sched_file = tmp_path / "scheduler.json"
    procs = [subprocess.Popen([str(DASK), "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                               "--scheduler-file", str(sched_file)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)]
    try:
        deadline = time.monotonic() + 60
        while not sched_file.exists():
            assert time.monotonic() < deadline and procs[0].poll() is None
            time.sleep(0.1)
        for name in ("w1", "w2"):
            procs.append(subprocess.Popen([str(DASK), "worker", "--scheduler-file", str(sched_file), "--nthreads",
                                           "1", "--no-dashboard", "--name", name, "--host", "127.0.0.1"],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                          start_new_session=True))
        from distributed import Client

        with Client(scheduler_file=str(sched_file), timeout=60) as c:
            c.wait_for_workers(2, timeout=60)
        yield sched_file
    finally:  # each process group holds a nanny and the worker it spawned: end them all, no graceful shutdown
        for p in reversed(procs):
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def test_existing_cluster_build_is_byte_identical(dask_cluster, corpus_dir, built_shards, built_shards_args,
                                                   tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(_cmd(corpus_dir, out, *built_shards_args, "--scheduler-file", str(dask_cluster),
                               "--performance-report", ""), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "(2 worker(s))" in proc.stderr
    _same_shards(built_shards, out)


def test_build_without_bokeh_finishes_without_the_report(corpus_dir, tmp_path):
    """bokeh is what Dask draws the performance report with; a machine without it still gets its shards."""
    shadow = tmp_path / "no-bokeh" / "bokeh"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('bokeh is hidden for this test')\n")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in ("POP909_008", "Maestro_3"):
        (corpus / f"{name}.mid").write_bytes((corpus_dir / "MIDIs_one_track" / f"{name}.mid").read_bytes())
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(shadow.parent),
                                                                     os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(_cmd(corpus, out, "--dashboard-address", "", "--workers", "1", "--val-fraction", "0"),
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "performance report skipped: bokeh is not installed" in proc.stderr
    assert not (out / "performance-report.html").exists()
    assert verify_shards(out) == [] and read_manifest(out)["counts"]["files_ok"] == 2

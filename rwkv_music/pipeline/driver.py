"""Run batch tasks on Dask: an embedded LocalCluster (processes, one thread each) or an existing scheduler.

A batch whose worker keeps dying (segfault, OOM kill, timeout watchdog) raises KilledWorker once Dask's retry
limit is spent. The driver then re-runs halves of the batch as "probe" tasks (no output) until each culprit file
is alone, and finally re-runs the whole batch with the culprits rejected as `worker-crash`, so the batch's
output is what it would be had those files simply been unreadable. Dask fails the tasks merely queued on a dying
worker too; those never started there (no started-marker, guard.mark_started) and are just submitted again.

An embedded cluster is watched while the driver waits (_Watchdog): should it be left without any worker (its
nanny gave up restarting one, or none came back for WORKERLESS_GRACE_S), the driver starts the worker processes
again; the tasks wait at the scheduler meanwhile. When that does not help MAX_REVIVALS times in a row, the
build stops with ClusterLost (finished batches are kept; the same command resumes) instead of waiting forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .batch import BatchResult, BatchTask, process_batch
from .config import Runtime
from .guard import STARTED_DIR, started_marker
from .scan import Batch

WORKER_PRELOAD = "rwkv_music.pipeline.worker"
# Resubmissions of a task that a dying worker failed before it started; a bound, so that a cluster whose every
# worker keeps dying still ends (the task is then searched like one that did start).
MAX_REQUEUES = 20
# The embedded cluster's SpecCluster closes a worker's nanny for good when, `lost-worker-timeout` after that
# worker left the scheduler, no worker of the same name is registered at that instant: a nanny still restarting
# its worker (a few seconds each time on a loaded machine, and a crashing file kills worker after worker) is
# then closed, and nothing starts another. The nanny restarts its worker itself; never let the cluster close it.
LOST_WORKER_TIMEOUT = "36500 days"
# How long the embedded cluster may have no worker registered, while a nanny still claims to be starting one,
# before the driver starts the worker processes again (a worker restart takes a few seconds).
WORKERLESS_GRACE_S = 60.0
# Starts of the worker processes in a row, without any task completing in between, before the build gives up.
MAX_REVIVALS = 3
# Bound on each step of such a start (closing the old nannies, starting new ones).
REVIVE_TIMEOUT_S = 60.0
WATCH_INTERVAL_S = 0.1


class ClusterLost(RuntimeError):
    """The embedded cluster kept ending up without workers, and starting them again did not help."""


def _cluster_config(rt: Runtime) -> dict:
    # The scheduler runs in this process, so its settings are ours: the retry limit, and queueing tasks at the
    # scheduler rather than on the workers, so that fewer innocent tasks wait on a worker that dies (Dask
    # applies it only to large groups of tasks: run_tasks resubmits the rest). The workers' statistical
    # profiler samples the running task's stack every 10 ms by default, taking the GIL from tokenization each
    # time; every 100 ms still fills the performance report's profile tab for a build of minutes. And the
    # cluster must not close a nanny that is restarting its worker (LOST_WORKER_TIMEOUT).
    return {"distributed.scheduler.allowed-failures": rt.retries, "distributed.scheduler.worker-saturation": 1.0,
            "distributed.worker.profile.interval": "100ms",
            "distributed.deploy.lost-worker-timeout": LOST_WORKER_TIMEOUT}


def worker_preloads() -> list[str]:
    """Our worker start-up module, then any preload the user configured for Dask workers
    (`distributed.worker.preload`, e.g. DASK_DISTRIBUTED__WORKER__PRELOAD='["mymodule"]'), which an explicit
    `preload=` would otherwise replace."""
    import dask

    extra = dask.config.get("distributed.worker.preload", None) or []
    return [WORKER_PRELOAD, *([extra] if isinstance(extra, str) else extra)]


def _local_cluster(rt: Runtime, n_workers: int):
    from distributed import LocalCluster

    return LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                        dashboard_address=rt.dashboard_address or None, silence_logs=logging.CRITICAL,
                        preload=worker_preloads())


@contextlib.contextmanager
def cluster_in_background(rt: Runtime, n_workers: int) -> Iterator[Callable[[], object]]:
    """Start the embedded LocalCluster in a thread now; yields a function that waits for it and returns it.

    Its worker processes start, and import what a batch needs (worker.py), while the driver goes on scanning
    and hashing the corpus. The cluster is closed on exit (after its start finished, should that still run).
    """
    import dask

    with dask.config.set(_cluster_config(rt)), ThreadPoolExecutor(1, thread_name_prefix="cluster-start") as pool:
        started = pool.submit(_local_cluster, rt, n_workers)
        try:
            yield started.result
        finally:
            if started.exception() is None:
                started.result().close()


class SchedulerUnreachable(Exception):
    """--scheduler / --scheduler-file name no scheduler this process can connect to (a usage error)."""


def scheduler_file_address(path: str | os.PathLike) -> str:
    """The scheduler address a `dask scheduler --scheduler-file` wrote; SchedulerUnreachable if there is none.

    Read here, not by distributed.Client: it waits, without end, for a missing file to appear."""
    import json

    p = Path(path)
    if not p.exists():
        raise SchedulerUnreachable(f"--scheduler-file {p} does not exist: start the scheduler first (`dask "
                                   f"scheduler --scheduler-file {p}`, and its workers), then run the build")
    try:
        d = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        why = f"{type(e).__name__}: {' '.join(str(e).split())}"
        raise SchedulerUnreachable(f"--scheduler-file {p} is not a Dask scheduler file ({why})") from None
    address = d.get("address") if isinstance(d, dict) else None
    if not isinstance(address, str) or not address:
        raise SchedulerUnreachable(f"--scheduler-file {p} is not a Dask scheduler file (no \"address\")")
    return address


@contextlib.contextmanager
def dask_client(rt: Runtime, log: Callable[[str], None], n_tasks: int | None = None,
                cluster: Callable[[], object] | None = None) -> Iterator[object]:
    """A connected distributed.Client; the embedded cluster (never more workers than tasks) is torn down on exit.

    `cluster`: a function returning an embedded cluster already started (cluster_in_background), which the
    caller closes.
    """
    import dask
    from distributed import Client

    if rt.scheduler or rt.scheduler_file:
        address = rt.scheduler or scheduler_file_address(rt.scheduler_file)
        try:
            client = Client(address)  # bounded: distributed.comm.timeouts.connect (30 s by default)
        except (OSError, ValueError, TimeoutError) as e:  # a malformed address, or nothing listening there
            where = rt.scheduler or f"of {rt.scheduler_file}"
            raise SchedulerUnreachable(f"cannot connect to the Dask scheduler {where}: {e}") from None
        with client:
            n = len(client.scheduler_info(n_workers=-1)["workers"])
            log(f"Dask scheduler {client.scheduler.address} ({n} worker(s)); dashboard: {client.dashboard_link}")
            yield client
        return
    with contextlib.ExitStack() as stack:
        if cluster is not None:
            local = cluster()
        else:
            stack.enter_context(dask.config.set(_cluster_config(rt)))
            local = stack.enter_context(_local_cluster(rt, max(1, min(rt.workers, n_tasks)) if n_tasks
                                                        else rt.workers))
        client = stack.enter_context(Client(local))
        link = client.dashboard_link if rt.dashboard_address else "(disabled)"
        log(f"Dask LocalCluster: {len(local.workers)} worker process(es); dashboard: {link}")
        yield client


@contextlib.contextmanager
def _report(path: str | None, log: Callable[[str], None]) -> Iterator[None]:
    """Dask's HTML performance report (task stream, worker profiles) when asked for.

    The report is a by-product: when it cannot be made (bokeh missing, a scheduler without it), the build
    still finishes and says why there is no report, instead of failing after all the work is done.
    """
    if not path:
        yield
        return
    try:
        import bokeh  # noqa: F401  (the scheduler renders the report with it)
    except ImportError:
        log("Dask performance report skipped: bokeh is not installed (pip install bokeh)")
        yield
        return
    from distributed import performance_report

    report = performance_report(filename=str(path))
    report.__enter__()
    try:
        yield
    except BaseException:
        with contextlib.suppress(Exception):
            report.__exit__(*sys.exc_info())
        raise
    try:
        report.__exit__(None, None, None)
    except Exception as e:
        log(f"Dask performance report not written: {type(e).__name__}: {' '.join(str(e).split())[:200]}")
        return
    log(f"Dask performance report: {path}")


async def _restart_workers(cluster) -> None:
    """Close the embedded cluster's nannies (bounded; a stuck worker process is killed) and start new ones."""
    for name, nanny in list(cluster.workers.items()):
        try:
            await asyncio.wait_for(nanny.close(), REVIVE_TIMEOUT_S)
        except Exception:
            pid = nanny.pid
            if pid:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
        cluster.workers.pop(name, None)
    await asyncio.wait_for(cluster._correct_state(), REVIVE_TIMEOUT_S)  # starts a nanny for each worker spec


class _Watchdog:
    """Keeps an embedded LocalCluster from being left without workers while the driver waits on it.

    A nanny restarts its worker process whenever it dies; but a nanny can give up (its worker failed to start)
    or be closed, and then nothing else starts a worker: the tasks would wait at the scheduler forever. `check`
    (called while no result is ready) starts the worker processes again when every nanny is gone, or when no
    worker has been registered for `grace` seconds; `progress` (a task completed) resets the count of such
    starts, and more than `max_revivals` in a row raise ClusterLost.
    """

    def __init__(self, cluster, log: Callable[[str], None], grace: float = WORKERLESS_GRACE_S,
                 max_revivals: int = MAX_REVIVALS):
        self.cluster, self.log, self.grace, self.max_revivals = cluster, log, grace, max_revivals
        self.last_worker = time.monotonic()
        self.revivals = 0

    def progress(self) -> None:
        self.revivals = 0

    def check(self) -> None:
        from distributed.core import Status

        now = time.monotonic()
        if self.cluster.scheduler.workers:
            self.last_worker = now
            return
        nannies = list(self.cluster.workers.values())
        gave_up = all(n.status in (Status.closing, Status.closed, Status.failed, Status.closing_gracefully)
                      for n in nannies)
        waited = now - self.last_worker
        if not gave_up and waited < self.grace:
            return
        why = ("its worker nanny gave up restarting it" if nannies else "its worker nanny was closed") if gave_up \
            else f"none registered for {waited:.0f} s"
        if self.revivals >= self.max_revivals:
            raise ClusterLost(f"the embedded Dask cluster was left without workers ({why}) and starting them "
                              f"again did not help {self.revivals} time(s) in a row")
        self.revivals += 1
        self.log(f"Dask LocalCluster: no worker alive ({why}); starting its worker process(es) again")
        try:
            self.cluster.sync(_restart_workers, self.cluster)
        except Exception as e:
            self.log(f"Dask LocalCluster: starting the worker process(es) failed: {type(e).__name__}: "
                     f"{' '.join(str(e).split())[:200]}")
        self.last_worker = time.monotonic()


def _completed(ac, watchdog: _Watchdog | None) -> Iterator[object]:
    """The futures of `ac` as they complete; while none is ready, the watchdog looks at the cluster."""
    if watchdog is None:
        yield from ac
        return
    while not ac.is_empty():
        if ac.has_ready():
            yield next(ac)
            continue
        watchdog.check()
        time.sleep(WATCH_INTERVAL_S)


def _result(fut, watchdog: _Watchdog | None):
    """fut.result(), the watchdog looking at the cluster meanwhile: a finished task whose worker died before the
    driver fetched its result is computed again, which needs a worker."""
    if watchdog is None:
        return fut.result()
    while True:
        try:
            return fut.result(timeout=WATCH_INTERVAL_S * 10)
        except TimeoutError:
            if fut.done():  # the task itself raised TimeoutError
                raise
            watchdog.check()


@dataclasses.dataclass
class _Hunt:
    """The search for the files that kill the workers running one batch."""

    task: BatchTask
    pending: int = 0
    culprits: list[str] = dataclasses.field(default_factory=list)
    rerun: bool = False


def _halves(task: BatchTask, files: tuple) -> list[BatchTask]:
    mid = len(files) // 2
    return [dataclasses.replace(task, batch=Batch(task.batch.index, part), probe=True)
            for part in (files[:mid], files[mid:])]


def _started_on(task: BatchTask, err: BaseException) -> bool:
    """Whether `task` had started on the worker whose death failed it (KilledWorker names that worker)."""
    pid = getattr(getattr(err, "last_worker", None), "pid", None)
    if pid is None:
        return True  # no way to tell: treat it as a possible culprit, as Dask does
    return started_marker(task.settings.out, task.attempt, pid).exists()


def _clear_markers(task: BatchTask) -> None:
    """Remove the markers a failed attempt left (one per worker it started on and that died under it)."""
    for p in (Path(task.settings.out) / STARTED_DIR).glob(f"{task.attempt}.*"):
        p.unlink(missing_ok=True)


def run_tasks(tasks: list[BatchTask], rt: Runtime, log: Callable[[str], None],
              on_result: Callable[[BatchResult], None], on_failure: Callable[[BatchTask, BaseException], None],
              performance_report: str | None = None, cluster: Callable[[], object] | None = None) -> None:
    """Submit every task; report each result (or failure) as it completes, in completion order.

    `cluster`: an embedded cluster started ahead (see dask_client)."""
    from distributed import KilledWorker, as_completed
    from tqdm import tqdm

    total_files = sum(len(t.batch.files) for t in tasks)
    with dask_client(rt, log, len(tasks), cluster) as client, _report(performance_report, log), \
            tqdm(total=total_files, unit="file", file=sys.stderr, disable=not rt.progress, desc="build-shards") as bar:
        serial = iter(range(1 << 62))

        def submit(task: BatchTask, kind: str, hunt: _Hunt | None = None, requeues: int = 0):
            tag = "probe" if task.probe else "batch"
            key = f"musicprep-{tag}-{task.batch.index:06d}-{task.batch.digest()[:12]}-{next(serial)}"
            task = dataclasses.replace(task, attempt=key)
            fut = client.submit(process_batch, task, key=key, pure=False, retries=0)
            owner[fut.key] = (kind, task, hunt, requeues)
            ac.add(fut)

        owner: dict[str, tuple[str, BatchTask, _Hunt | None, int]] = {}
        ac = as_completed()
        embedded = getattr(client, "cluster", None)  # None on an external scheduler: its workers are not ours
        watchdog = _Watchdog(embedded, log) if embedded is not None else None
        for t in tasks:
            submit(t, "batch")

        def start_hunt(task: BatchTask) -> None:
            files = tuple(f for f in task.batch.files if f.rel not in task.crashed)
            hunt = _Hunt(task)
            log(f"batch {task.batch.index}: workers died on it; searching its {len(files)} file(s) for the cause")
            if len(files) == 1:
                hunt.culprits.append(files[0].rel)
                finish_hunt(hunt)
                return
            for half in _halves(task, files):
                hunt.pending += 1
                submit(half, "probe", hunt)

        def finish_hunt(hunt: _Hunt) -> None:
            hunt.rerun = True
            crashed = tuple(sorted(set(hunt.task.crashed) | set(hunt.culprits)))
            log(f"batch {hunt.task.batch.index}: rejecting {len(hunt.culprits)} file(s) as worker-crash: "
                f"{', '.join(hunt.culprits) or '(none found)'}")
            submit(dataclasses.replace(hunt.task, crashed=crashed), "rerun", hunt)

        for fut in _completed(ac, watchdog):
            if watchdog is not None:
                watchdog.progress()
            kind, task, hunt, requeues = owner.pop(fut.key)
            try:
                res = _result(fut, watchdog)
                err = None
            except Exception as e:
                res, err = None, e
            finally:
                fut.release()
            if isinstance(err, KilledWorker):
                started = _started_on(task, err)
                _clear_markers(task)
                if not started and requeues < MAX_REQUEUES:
                    what = "probe of batch" if task.probe else "batch"
                    log(f"{what} {task.batch.index}: its worker died before it started; submitted again")
                    submit(task, kind, hunt, requeues + 1)
                    continue
            if kind == "probe":
                hunt.pending -= 1
                if isinstance(err, KilledWorker):
                    if len(task.batch.files) == 1:
                        hunt.culprits.append(task.batch.files[0].rel)
                    else:
                        for half in _halves(task, task.batch.files):
                            hunt.pending += 1
                            submit(half, "probe", hunt)
                if hunt.pending == 0:
                    finish_hunt(hunt)
                continue
            if isinstance(err, KilledWorker) and kind == "batch":
                start_hunt(task)
                continue
            if err is not None:
                on_failure(hunt.task if hunt else task, err)
            else:
                on_result(res)
            bar.update(len(task.batch.files))

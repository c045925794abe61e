"""Run batch tasks on Dask: an embedded LocalCluster (processes, one thread each) or an existing scheduler."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable, Iterator

from .batch import BatchResult, BatchTask, process_batch
from .config import Runtime


@contextlib.contextmanager
def dask_client(rt: Runtime, log: Callable[[str], None], n_tasks: int | None = None) -> Iterator[object]:
    """A connected distributed.Client; the embedded cluster (never more workers than tasks) is torn down on exit."""
    from distributed import Client, LocalCluster

    if rt.scheduler:
        with Client(rt.scheduler) as client:
            log(f"Dask scheduler {rt.scheduler}; dashboard: {client.dashboard_link}")
            yield client
        return
    n_workers = max(1, min(rt.workers, n_tasks)) if n_tasks else rt.workers
    with LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                      dashboard_address=rt.dashboard_address or None, silence_logs=logging.ERROR) as cluster, \
            Client(cluster) as client:
        link = client.dashboard_link if rt.dashboard_address else "(disabled)"
        log(f"Dask LocalCluster: {n_workers} worker process(es); dashboard: {link}")
        yield client


@contextlib.contextmanager
def _report(rt: Runtime, log: Callable[[str], None]) -> Iterator[None]:
    """Dask's HTML performance report (task stream, worker profiles) when asked for."""
    if not rt.performance_report:
        yield
        return
    from distributed import performance_report

    with performance_report(filename=str(rt.performance_report)):
        yield
    log(f"Dask performance report: {rt.performance_report}")


def run_tasks(tasks: list[BatchTask], rt: Runtime, log: Callable[[str], None],
              on_result: Callable[[BatchResult], None], on_failure: Callable[[BatchTask, BaseException], None]) -> None:
    """Submit every task; report each result (or failure) as it completes, in completion order."""
    from distributed import as_completed
    from tqdm import tqdm

    total_files = sum(len(t.batch.files) for t in tasks)
    with dask_client(rt, log, len(tasks)) as client, _report(rt, log), \
            tqdm(total=total_files, unit="file", file=sys.stderr, disable=not rt.progress, desc="build-shards") as bar:
        keys = [f"musicprep-batch-{t.batch.index:06d}-{t.batch.digest()[:12]}" for t in tasks]
        futures = client.map(process_batch, tasks, key=keys, pure=False, retries=0)
        owner = {f.key: t for f, t in zip(futures, tasks, strict=True)}
        for fut in as_completed(futures):
            task = owner[fut.key]
            try:
                on_result(fut.result())
            except Exception as e:
                on_failure(task, e)
            bar.update(len(task.batch.files))
            fut.release()

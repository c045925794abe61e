"""Stopping `musictrain fit` on SIGINT / SIGTERM without losing the run.

The first signal only sets a flag: the trainer finishes the optimiser step it is in, writes a checkpoint and
exits with 128 + the signal number (130 for SIGINT, 143 for SIGTERM). A second signal raises `StopNow` at
once (the checkpoint being written, if any, is removed; the previous one stays). Under torchrun the flag is
all-reduced after every step (see `Trainer.stop_signal`), so every rank stops at the same step.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

SIGNALS = (signal.SIGINT, signal.SIGTERM)


def exit_code(signum: int) -> int:
    """The shell's code for a process ended by `signum`: 130 for SIGINT, 143 for SIGTERM."""
    return 128 + signum


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


class StopNow(BaseException):
    """A second signal: stop at once. A BaseException, so no `except Exception` on the way swallows it."""

    def __init__(self, signum: int):
        super().__init__(f"stopped at once by a second signal ({signal_name(signum)})")
        self.signum = signum


@dataclass
class StopRequest:
    """What the signal handler saw; the trainer reads `signum` once per step."""

    signum: int | None = None
    # torchrun's agent forwards the signal it gets to every worker, and a Ctrl-C in the terminal has already
    # reached each worker: under torchrun a repeat of the first signal within `echo_s` is that echo, not a
    # second request.
    under_torchrun: bool = False
    echo_s: float = 2.0
    pid: int = 0  # the process that installed the handler
    _first_at: float = 0.0

    def handle(self, signum: int, frame: object = None) -> None:
        if os.getpid() != self.pid:  # a forked DataLoader worker: the trainer process decides
            return
        now = time.monotonic()
        if self.signum is None:
            self.signum, self._first_at = signum, now
            return
        if self.under_torchrun and signum == self.signum and now - self._first_at < self.echo_s:
            return
        raise StopNow(signum)


@contextlib.contextmanager
def graceful_stop() -> Iterator[StopRequest]:
    """Catch SIGINT and SIGTERM for the block (main thread only; elsewhere signals keep their handlers)."""
    req = StopRequest(under_torchrun="TORCHELASTIC_RUN_ID" in os.environ, pid=os.getpid())
    if threading.current_thread() is not threading.main_thread():
        yield req
        return
    old = {s: signal.signal(s, req.handle) for s in SIGNALS}
    try:
        yield req
    finally:
        for s, h in old.items():
            signal.signal(s, h)

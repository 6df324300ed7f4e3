"""Stopping cleanly: SIGTERM, SIGINT and SIGUSR1 (Slurm's time warning) let the batch in flight
finish and be committed, then the job exits; a second SIGINT aborts at once."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager

from bulkinfer.observe.progress import log

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class StopFlag:
    signum: int | None = None


@contextmanager
def stop_signals() -> Iterator[StopFlag]:
    flag = StopFlag()
    previous = {}

    def handler(signum, frame):
        if flag.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        flag.signum = signum
        log(
            f"{signal.Signals(signum).name} received: finishing the batch in flight, then stopping",
            event="signal",
            signal=signal.Signals(signum).name,
        )

    for sig in STOP_SIGNALS:
        previous[sig] = signal.signal(sig, handler)
    try:
        yield flag
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def stopped(signum: int) -> int:
    """Say why the run stopped; the exit code a shell gives a process ended by that signal."""
    name = signal.Signals(signum).name
    log(
        f"stopped by {name}: the batch in flight was written; rerun the same command to resume",
        event="signal",
        level="warning",
        signal=name,
        exit_code=128 + signum,
    )
    return 128 + signum

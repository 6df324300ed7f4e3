"""How a run ends early. Stopping cleanly: SIGTERM, SIGINT and SIGUSR1 (Slurm's time warning) let the batch in flight
finish and be committed, then the job exits; a second SIGINT aborts at once. A failed write
ends the run with one line; a shard that dies leaves failed.json for `bulkinfer status`.

One Ctrl-C can arrive twice: the terminal sends it to the whole process group, and a `--gpus`
launcher passes what it receives on to its workers. A signal within REPEAT_SECONDS of the first
is taken as that same stop; a SIGINT after that aborts."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bulkinfer.console import resume_advice
from bulkinfer.errors import OutputFolderError, StopRequested, WriteError, first_line
from bulkinfer.io.atomic import write_json_atomic
from bulkinfer.io.layout import OutputLayout
from bulkinfer.observe.progress import log
from bulkinfer.process import deferred_past_import, interrupts_outside_imports

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
REPEAT_SECONDS = 1.0


class StopFlag:
    signum: int | None = None
    at: float = 0.0


@contextmanager
def stop_signals() -> Iterator[StopFlag]:
    flag = StopFlag()
    previous = {}
    if threading.current_thread() is not threading.main_thread():
        yield flag  # signals reach the main thread only: the process's handlers stay
        return

    def handler(signum, frame):
        now = time.monotonic()
        if flag.signum is not None:
            if signum == signal.SIGINT and now - flag.at > REPEAT_SECONDS:
                raise KeyboardInterrupt
            return  # the same stop, delivered twice
        flag.signum, flag.at = signum, now
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


class AtOnce:
    """Outside the batch loop no batch is in flight: SIGTERM or SIGUSR1 stops the run at once
    (`StopRequested`; every write there is atomic and committed parts stay, as after a kill),
    with the line and exit code of a stopped run. While the outputs are written (`finish`),
    SIGUSR1, the time-limit warning, lets them finish instead. SIGINT stays KeyboardInterrupt."""

    def __init__(self, overwrite: bool = False) -> None:
        self.finishing = False
        self.signum: int | None = None
        self.overwrite = overwrite  # the run was asked to start afresh
        self.interrupted = False  # a Ctrl-C whose KeyboardInterrupt a callback dropped

    @property
    def when(self) -> str:
        return "while the outputs are written" if self.finishing else "before its first batch"

    def handler(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.finishing and signum == signal.SIGUSR1:
            log(f"{name} received {self.when}: finishing them", event="signal", signal=name)
            return
        if self.signum is None:  # the same stop delivered twice is one stop
            if deferred_past_import(signum, frame):
                return
            self.signum = signum
            raise StopRequested(signum)

    def check(self) -> None:
        """Raise the stop again where the handler's raise was lost: a signal can land in code
        whose exceptions Python prints and drops (a weakref or import-lock callback). So can
        Ctrl-C's KeyboardInterrupt, which then ran the whole job."""
        if self.interrupted:
            self.interrupted = False
            raise KeyboardInterrupt
        if self.signum is not None and not self.finishing:
            raise StopRequested(self.signum)

    def finish(self) -> None:
        self.finishing = True

    def stopped(self) -> int:
        """Say why the run stopped; the exit code a shell gives a process ended by it. Slurm's
        time-limit warning (SIGUSR1) before the first batch means the start-up outlasts the
        limit less the grace period: said, and the sbatch script does not requeue a task that
        committed nothing (a fresh start would stop there again)."""
        name = signal.Signals(self.signum).name
        advice = (
            "; if it is Slurm's time-limit warning, the task's start-up outlasts its time "
            "limit less the grace period: give it more time (--time) or less warning (--grace)"
            if self.signum == signal.SIGUSR1 and not self.finishing
            else ""
        )
        log(
            f"stopped by {name} {self.when}; committed work is kept: "
            f"{resume_advice(self.overwrite)}{advice}",
            event="signal",
            level="warning",
            signal=name,
            exit_code=128 + self.signum,
        )
        return 128 + self.signum


@contextmanager
def stops_at_once(overwrite: bool = False) -> Iterator[AtOnce]:
    """`AtOnce`'s handler for SIGTERM and SIGUSR1 for the duration (from the main thread only:
    a job run from another thread keeps the process's handlers); `overwrite`: the run's own
    --overwrite, which its resume advice leaves out."""
    at_once = AtOnce(overwrite)
    if threading.current_thread() is not threading.main_thread():
        yield at_once
        return
    previous = {
        sig: signal.signal(sig, at_once.handler) for sig in (signal.SIGTERM, signal.SIGUSR1)
    }
    hook = sys.unraisablehook

    def quiet(unraisable) -> None:  # a stop dropped in a callback: `check` raises it again
        if isinstance(unraisable.exc_value, KeyboardInterrupt):
            at_once.interrupted = True
        elif not isinstance(unraisable.exc_value, StopRequested):
            hook(unraisable)

    sys.unraisablehook = quiet
    try:
        with interrupts_outside_imports():
            yield at_once
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
        sys.unraisablehook = hook


def stopped(signum: int, overwrite: bool = False) -> int:
    """Say why the run stopped; the exit code a shell gives a process ended by that signal."""
    name = signal.Signals(signum).name
    log(
        f"stopped by {name}: the batch in flight was written; {resume_advice(overwrite)}",
        event="signal",
        level="warning",
        signal=name,
        exit_code=128 + signum,
    )
    return 128 + signum


@contextmanager
def failure_recorded(layout: OutputLayout):
    """A run that dies of an error leaves failed.json in its folder (a shard's, or the job's),
    so `bulkinfer status` says it failed and why, not that it is pending. A refusal to touch
    the folder (OutputFolderError) leaves it as it was."""
    layout.failed.unlink(missing_ok=True)
    try:
        yield
    except Exception as exc:
        if layout.root.exists() and not isinstance(exc, OutputFolderError):
            error = {"error": f"{type(exc).__name__}: {first_line(exc)}"}
            with contextlib.suppress(OSError):  # a full disk: the error is what the user must see
                write_json_atomic(layout.failed, error)
        raise


# A full disk, a quota, a read-only or oversized file system: a write failed wherever it was.
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}
# Permissions: a write failure when the path is ours (reading an input can fail with these too).
ACCESS_ERRNOS = {errno.EACCES, errno.EPERM}


@contextmanager
def writes_reported(layout: OutputLayout):
    """A failed write (disk full, quota, read-only, permissions) ends the run with one line and
    exit 74, wherever it happened: a part, the manifest, a spill file, the outputs, the stats,
    the summary, the responses or the report. What was committed before it stays valid, so a
    rerun resumes once the cause is fixed. (A write to an open file fails without a file name:
    then the output folder is named.)"""
    try:
        yield
    except OSError as exc:
        message = write_failure(exc, layout.root)
        if message is None:
            raise
        raise WriteError(f"{message}; fix that and rerun to resume") from None


def write_failure(exc: OSError, root: Path) -> str | None:
    """The one line for an OSError that is a failed write, or None when it is something else."""
    where = exc.filename
    ours = where is not None and _inside(Path(where), root)
    if exc.errno in WRITE_ERRNOS or (exc.errno in ACCESS_ERRNOS and ours):
        place = where if where is not None else f"under {root}"
        return f"cannot write {place}: {exc.strerror or os.strerror(exc.errno)}"
    if ours:  # any other failure on a path of ours (e.g. a folder where a file should be)
        return f"cannot write {where}: {exc.strerror or exc}"
    return None


def _inside(path: Path, root: Path) -> bool:
    try:
        return path.resolve().is_relative_to(root.resolve())
    except (OSError, RuntimeError):
        return False

"""Whose process this is: bulkinfer's own (the console script, `python -m bulkinfer`) or the
program of someone calling the library (a notebook, a script). Only in its own may bulkinfer
change the process as a whole (mark unused modules absent, set environment variables, exit
without the interpreter's teardown), and only there is the process's age at a run's start the
time its imports took. And the names that tell this process's temporary files from those of
other processes and hosts (`host_tag`, `pid_alive`), so a killed one's can be tidied away.
In a caller's program, a Ctrl-C waits until the import under way is done
(`interrupts_outside_imports`)."""

from __future__ import annotations

import functools
import os
import signal
import socket
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

OWN = False


def claim() -> None:
    """Called by the command line's entry point: the process is the command's, unless an
    IPython kernel runs it (`%run -m bulkinfer run job.yaml` in a notebook)."""
    global OWN
    OWN = "IPython" not in sys.modules
    if OWN:
        # the Rust tokenizer keeps its threads in processes this one forks (the compiler's
        # workers), without a warning in each
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")


def host_tag() -> str:
    """This host's name, as a folder name may hold it (no dashes: they separate the fields)."""
    return "".join(c if c.isalnum() else "_" for c in socket.gethostname()) or "host"


def pid_alive(pid: int) -> bool:
    """Whether a process of this host has this id (another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


IMPORT_RETRY_SECONDS = 0.05


def _importing(frame) -> bool:
    """Whether the main thread is inside an import (its stack holds the import machinery)."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def deferred_past_import(signum: int, frame) -> bool:
    """Whether the signal landed inside an import (`frame`: the main thread's, as a handler gets
    it) and was sent again to arrive in a moment, by then most likely outside it. An exception
    raised there leaves the module half made in sys.modules (numpy's, torch's, accelerate's):
    every later run in the process (a notebook's next cell) failed on it; and one raised inside
    a module a C++ extension is importing (torch's) cannot pass back through it: the process
    aborts."""
    if not _importing(frame):
        return False
    again = threading.Timer(IMPORT_RETRY_SECONDS, os.kill, (os.getpid(), signum))
    again.daemon = True
    _resent[signum] = again
    again.start()
    return True


_resent: dict[int, threading.Timer] = {}  # by signal: the latest signal sent again


def _interrupt_outside_imports(signum, frame) -> None:
    """Ctrl-C as Python's own handler answers it, but never inside an import."""
    if not deferred_past_import(signum, frame):
        _resent.pop(signum, None)
        raise KeyboardInterrupt


@contextmanager
def interrupts_outside_imports() -> Iterator[None]:
    """`_interrupt_outside_imports` answers SIGINT for the duration, where Python's own handler
    did (a caller's own handler stays, as do those of threads other than the main one). A
    Ctrl-C still deferred when the body ends, or dropped where Python drops exceptions (a
    finalizer's callback), is raised as the body ends: never carried into the caller's next
    statement, nor lost."""
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield
        return
    dropped = []
    hook = sys.unraisablehook

    def kept(unraisable) -> None:
        # a hook of the caller's, or a run's own (job/exits.py, which raises it again at its
        # next check), takes it as it did; Python's own would print it as a crash, and drop it
        if isinstance(unraisable.exc_value, KeyboardInterrupt) and hook is sys.__unraisablehook__:
            dropped.append(unraisable)
        else:
            hook(unraisable)

    signal.signal(signal.SIGINT, _interrupt_outside_imports)
    sys.unraisablehook = kept
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        sys.unraisablehook = hook
        again = _resent.pop(signal.SIGINT, None)
        if again is not None:
            again.cancel()
    if dropped or again is not None:
        raise KeyboardInterrupt


def imports_uninterrupted(function):
    """A library entry point whose imports (the first call's load torch and transformers) a
    Ctrl-C never cuts short; see `interrupts_outside_imports`."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with interrupts_outside_imports():
            return function(*args, **kwargs)

    return wrapper

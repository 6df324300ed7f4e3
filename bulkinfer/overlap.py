"""Host work that runs beside the model, each kind on one background thread.

Loading safetensors weights, Parquet encoding, fsync and the Rust tokenizer all release the GIL,
so a plain thread keeps them off the device's critical path. Whatever a thread raises is raised
again in the caller, unchanged, so the CLI renders it as it would have inline.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

from bulkinfer import process
from bulkinfer.errors import StopRequested, UserError
from bulkinfer.observe.progress import log


class Background:
    """`call(*args)` running on a daemon thread; `result()` waits for it and returns its value
    or raises its exception."""

    def __init__(self, call: Callable, *args, name: str):
        self._value: Any = None
        self._error: BaseException | None = None
        # the call's end, set by the thread itself: a join interrupted by a signal marks a
        # thread still running as stopped (CPython, issue 90882), so is_alive() cannot tell
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(call, args), name=name, daemon=True)
        self._thread.start()

    def _run(self, call: Callable, args: tuple) -> None:
        try:
            self._value = call(*args)
        except BaseException as exc:  # raised again by result(), in the caller's thread
            self._error = exc
        finally:
            self._done.set()

    def join(self) -> None:
        self._thread.join()

    def running(self) -> bool:
        return not self._done.is_set()

    def wait(self, seconds: float) -> bool:
        """Wait up to `seconds` for the call to end; whether it has."""
        return self._done.wait(seconds)

    def wait_and_drop(self) -> None:
        """Wait for the call to end, then let go of what it made (a traceback kept by a
        notebook holds this object)."""
        self._done.wait()
        self._value = self._error = None

    def result(self) -> Any:
        self.join()
        if self._error is not None:
            raise self._error
        return self._value


@contextmanager
def in_background(call: Callable, *args, name: str) -> Iterator[Background]:
    """`call(*args)` on a thread while the body runs. Leaving the body waits for the thread, so
    nothing is left loading behind an error: when the body fails, its error is the one raised
    and the call's outcome is dropped. Where the process is the command's, which is ending (the
    thread is a daemon, and the command exits without the interpreter's teardown), a stop
    (Ctrl-C, or SIGTERM before the first batch) and a user's error (a refused folder, a bad
    input row) do not wait: the message comes at once, not after the weights have loaded. A
    Ctrl-C in someone's program (a notebook) does, so that a run started next does not load its
    weights beside these (a second Ctrl-C leaves at once); a SIGTERM there does not (a
    scheduler's grace period is short)."""
    background = Background(call, *args, name=name)
    try:
        yield background
    except KeyboardInterrupt:
        if not process.OWN:
            if background.running():
                log(f"stopping: waiting for {name} to end (a second Ctrl-C leaves it running)")
            background.wait_and_drop()
        raise
    except StopRequested:
        raise
    except UserError:
        if not process.OWN:  # (its traceback, kept by a notebook, must not keep the weights)
            background.wait_and_drop()
        raise
    except BaseException:
        background.join()
        raise
    background.join()


def timed(call: Callable, *args) -> tuple[Any, float]:
    """`call(*args)` and the seconds it took."""
    start = time.perf_counter()
    value = call(*args)
    return value, time.perf_counter() - start


class SerialThread:
    """Runs calls on one background thread in the order given, one at a time: handing over a
    call waits until the one before it has ended. So the caller is never more than one call
    ahead, and the first failure is raised in the caller, unchanged, by the next `submit`,
    `check` or `wait`."""

    def __init__(self, name: str):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._pending: Future | None = None

    def submit(self, call: Callable, *args) -> None:
        self.wait()
        self._pending = self._pool.submit(call, *args)

    def check(self) -> None:
        """Raise the error of a call that has already failed; never blocks."""
        if self._pending is not None and self._pending.done():
            self.wait()

    def wait(self) -> None:
        """Block until the call in hand has ended; raise its error."""
        if self._pending is None:
            return
        error = self._pending.exception()  # a Ctrl-C here leaves the call in hand, for close()
        self._pending = None
        if error is not None:
            raise error

    def close(self, failing: BaseException | None = None) -> None:
        """Wait for the call in hand and end the thread, on every exit path. While the caller
        is already failing (`failing`), that error stays the one raised; the call's own error
        is attached to it as a note."""
        try:
            if failing is None:
                self.wait()
            elif self._pending is not None and (error := self._pending.exception()):
                failing.add_note(
                    f"the background call also failed: {type(error).__name__}: {error}"
                )
        finally:
            self._pending = None
            self._pool.shutdown(wait=True)

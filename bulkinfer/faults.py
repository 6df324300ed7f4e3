"""Fault injection for the crash tests: die with SIGKILL at a named point of the write path,
or fail a write as a full disk would.

`BULKINFER_KILL_AT=part_written:2` kills the process the second time a part file is in place
but not yet in the manifest; `temp_written:1` kills the first all-or-nothing write before its
rename; `overwrite_removed:1` kills a replacement after it removed one path of the old job.
Unset (always, in real runs), `checkpoint` costs one dict lookup.
"""

from __future__ import annotations

import errno
import os
import signal
import sys

_counts: dict[str, int] = {}


def checkpoint(point: str) -> None:
    target = os.environ.get("BULKINFER_KILL_AT")
    if not target:
        return
    name, _, nth = target.partition(":")
    if name != point:
        return
    _counts[point] = _counts.get(point, 0) + 1
    if _counts[point] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)


def write_attempt(path) -> None:
    """`BULKINFER_FAIL_WRITE=3` makes the third durable write fail as a full disk would."""
    target = os.environ.get("BULKINFER_FAIL_WRITE")
    if not target:
        return
    _counts["write"] = _counts.get("write", 0) + 1
    if _counts["write"] >= int(target):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def slow_batch() -> None:
    """`BULKINFER_SLOW_BATCH_SECONDS=0.3` stretches every batch, so a test can preempt mid-run."""
    _sleep_for("BULKINFER_SLOW_BATCH_SECONDS")


def slow_load() -> None:
    """`BULKINFER_SLOW_LOAD_SECONDS=2` stretches the weights' loading, so a test can stop a run
    while it loads."""
    _sleep_for("BULKINFER_SLOW_LOAD_SECONDS")


def slow_hash() -> None:
    """`BULKINFER_SLOW_HASH_SECONDS=7` stretches the hash of the model's files (a run's
    fingerprint), as a large model's first run takes minutes over it."""
    _sleep_for("BULKINFER_SLOW_HASH_SECONDS")


def slow_step() -> None:
    """`BULKINFER_SLOW_STEP_SECONDS=0.05` stretches every report of a generation stream (every
    few decode steps), so a test gets batches slower than checkpoint.every_seconds."""
    _sleep_for("BULKINFER_SLOW_STEP_SECONDS")


def _sleep_for(variable: str) -> None:
    delay = os.environ.get(variable)
    if delay:
        import time

        time.sleep(float(delay))


def out_of_memory(padded_tokens: int) -> None:
    """`BULKINFER_OOM_ABOVE_TOKENS=N`: a model call over N padded tokens fails as a GPU out of
    memory would, so the split-and-shrink path runs on a CPU."""
    limit = os.environ.get("BULKINFER_OOM_ABOVE_TOKENS")
    if limit and padded_tokens > int(limit):
        import torch

        raise torch.OutOfMemoryError(f"injected: {padded_tokens} padded tokens > {limit}")


def failing_row(rows) -> None:
    """`BULKINFER_FAIL_ROW=N`: a model call holding input row N fails (not for lack of
    memory), so the bisection down to the row that fails runs."""
    target = os.environ.get("BULKINFER_FAIL_ROW")
    if target and int(target) in {int(r) for r in rows}:
        raise RuntimeError(f"injected: a model call holding row {target} failed")


def size_setting(name: str, default: int) -> int:
    """A block size the scale tests shrink so a few hundred rows cross every boundary
    (BULKINFER_CHUNK_ROWS, BULKINFER_SPILL_FILE_ROWS, BULKINFER_BUCKET_ROWS,
    BULKINFER_OUTPUT_FILE_ROWS); unset, the default. Read once, at import."""
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    if not value.isdigit() or int(value) < 1:  # a spec error's line and exit code
        print(
            f"bulkinfer: error: {name}={value!r}: expected a whole number above 0", file=sys.stderr
        )
        raise SystemExit(2)
    return int(value)

"""Fault injection for the crash tests: die with SIGKILL at a named point of the write path.

`BULKINFER_KILL_AT=part_written:2` kills the process the second time a part file is in place
but not yet in the manifest. Unset (always, in real runs), `checkpoint` costs one dict lookup.
"""

from __future__ import annotations

import os
import signal

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

"""First-fit allocation of contiguous token regions in the KV pool.

Each generating row reserves prompt + max_new slots when it starts and returns them when it
ends, so a row never has to grow (no copy, no page table) and any freed region can take the
next prompt that fits. Pure Python on a few hundred intervals: microseconds per call.
"""

from __future__ import annotations

import bisect


class RegionAllocator:
    """Free intervals [start, end) of a pool of `size` slots, kept sorted and coalesced."""

    def __init__(self, size: int, reserved: int = 0):
        self.size = size
        self.free: list[tuple[int, int]] = [(reserved, size)] if size > reserved else []

    def allocate(self, length: int) -> int | None:
        """Start of a free region of `length` slots, or None when none is that large."""
        for i, (start, end) in enumerate(self.free):
            if end - start >= length:
                if end - start == length:
                    del self.free[i]
                else:
                    self.free[i] = (start + length, end)
                return start
        return None

    def release(self, start: int, length: int) -> None:
        end = start + length
        i = bisect.bisect_left(self.free, (start, end))
        if i < len(self.free) and self.free[i][0] == end:
            end = self.free.pop(i)[1]
        if i > 0 and self.free[i - 1][1] == start:
            start = self.free.pop(i - 1)[0]
            i -= 1
        self.free.insert(i, (start, end))

    @property
    def largest(self) -> int:
        return max((end - start for start, end in self.free), default=0)

    @property
    def available(self) -> int:
        return sum(end - start for start, end in self.free)

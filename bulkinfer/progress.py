"""Progress: a tqdm bar on a terminal, periodic plain log lines elsewhere (a Slurm log file)."""

from __future__ import annotations

import sys
import time

from tqdm import tqdm


def log(message: str) -> None:
    print(f"[bulkinfer] {message}", file=sys.stderr, flush=True)


class Progress:
    """Rows done out of total, with tokens/s and an ETA, in whichever form suits the stream."""

    def __init__(self, total: int, done: int, log_every: float):
        self.total = total
        self.done = done
        self.tokens = 0
        self.start = time.monotonic()
        self.start_done = done
        self.log_every = log_every
        self.last_log = self.start
        self.bar = None
        if sys.stderr.isatty():
            self.bar = tqdm(total=total, initial=done, unit="row", dynamic_ncols=True, smoothing=0.1)

    def update(self, rows: int, tokens: int) -> None:
        self.done += rows
        self.tokens += tokens
        elapsed = max(time.monotonic() - self.start, 1e-9)
        if self.bar is not None:
            self.bar.set_postfix_str(f"{self.tokens / elapsed:,.0f} tok/s", refresh=False)
            self.bar.update(rows)
            return
        now = time.monotonic()
        if now - self.last_log >= self.log_every or self.done >= self.total:
            self.last_log = now
            rate = (self.done - self.start_done) / elapsed
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            log(
                f"{self.done:,}/{self.total:,} rows ({self.done / max(self.total, 1):.0%}), "
                f"{self.tokens / elapsed:,.0f} tok/s, {rate:,.1f} rows/s, ETA {_clock(eta)}"
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _clock(seconds: float) -> str:
    if seconds == float("inf"):
        return "unknown"
    seconds = int(seconds)
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"

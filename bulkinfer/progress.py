"""Progress: a tqdm bar on a terminal, periodic plain log lines elsewhere (a Slurm log file).

The ETA counts planned work (padded tokens plus tokens to generate), not rows: batches run
longest first, so rows early on cost many times what rows at the end do.
"""

from __future__ import annotations

import sys
import time

from tqdm import tqdm

from bulkinfer.plan import Batch


def log(message: str) -> None:
    print(f"[bulkinfer] {message}", file=sys.stderr, flush=True)


def _cost(batch: Batch, new_tokens_per_row: int) -> int:
    return len(batch.rows) * (batch.longest + new_tokens_per_row)


class Progress:
    """Rows done out of total, with tokens/s and an ETA, in whichever form suits the stream."""

    def __init__(
        self, batches: list[Batch], todo: list[Batch], new_tokens_per_row: int, log_every: float
    ):
        self.new_tokens_per_row = new_tokens_per_row
        self.total = sum(len(b.rows) for b in batches)
        self.done = self.total - sum(len(b.rows) for b in todo)
        self.cost_left = sum(_cost(b, new_tokens_per_row) for b in todo)
        self.cost_done = 0
        self.tokens = 0
        self.start = time.monotonic()
        self.log_every = log_every
        self.last_log = self.start
        self.bar = None
        if sys.stderr.isatty():
            self.bar = tqdm(total=self.total, initial=self.done, unit="row", dynamic_ncols=True)

    def update(self, batch: Batch, tokens: int) -> None:
        self.done += len(batch.rows)
        self.tokens += tokens
        cost = _cost(batch, self.new_tokens_per_row)
        self.cost_done += cost
        self.cost_left -= cost
        elapsed = max(time.monotonic() - self.start, 1e-9)
        eta = self.cost_left * elapsed / self.cost_done if self.cost_done else float("inf")
        if self.bar is not None:
            self.bar.set_postfix_str(
                f"{self.tokens / elapsed:,.0f} tok/s, ETA {_clock(eta)}", refresh=False
            )
            self.bar.update(len(batch.rows))
            return
        now = time.monotonic()
        if now - self.last_log >= self.log_every or self.done >= self.total:
            self.last_log = now
            log(
                f"{self.done:,}/{self.total:,} rows ({self.done / max(self.total, 1):.0%}), "
                f"{self.tokens / elapsed:,.0f} tok/s, ETA {_clock(eta)}"
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _clock(seconds: float) -> str:
    if seconds == float("inf"):
        return "unknown"
    seconds = int(seconds)
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"

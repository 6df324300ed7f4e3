"""Progress and log lines: a tqdm bar on a terminal, periodic plain lines elsewhere (a Slurm log),
or one JSON object per line for log collectors (`--log-format json`, BULKINFER_LOG_FORMAT=json).

The ETA counts planned work (padded tokens plus tokens to generate), not rows: batches run
longest first, so rows early on cost many times what rows at the end do.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from datetime import datetime, timezone

from tqdm import tqdm

from bulkinfer.planner import Batch

LOG_FORMATS = ("plain", "json")
LOG_FORMAT_ENV = "BULKINFER_LOG_FORMAT"
# Fields every JSON line of this process carries (the shard, once known).
_context: dict = {}


def log_format() -> str:
    """`plain` unless BULKINFER_LOG_FORMAT says `json` (the CLI option sets that variable, so
    worker processes started by `--gpus` log the same way)."""
    value = os.environ.get(LOG_FORMAT_ENV, "plain").strip().lower()
    return value if value in LOG_FORMATS else "plain"


def route_library_output_to_json() -> None:
    """In JSON mode stderr must hold JSON lines only: Python warnings and log records become
    events, and libraries' progress bars (tqdm, Hugging Face downloads) and advisory messages
    are turned off (an explicit setting of those variables is kept)."""
    import warnings

    for name, value in (
        ("TQDM_DISABLE", "1"),
        ("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
        ("TRANSFORMERS_VERBOSITY", "error"),
        ("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1"),
    ):
        os.environ.setdefault(name, value)

    def show_warning(message, category, filename, lineno, file=None, line=None):
        log(str(message), event="warning", level="warning", category=category.__name__)

    warnings.showwarning = show_warning
    root = logging.getLogger()
    if not any(isinstance(h, _JsonLogHandler) for h in root.handlers):
        root.handlers = [_JsonLogHandler()]


class _JsonLogHandler(logging.Handler):
    """Each log record of WARNING or above becomes a `log` event; libraries' info chatter stays
    out."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)

    def emit(self, record: logging.LogRecord) -> None:
        log(record.getMessage(), event="log", level=record.levelname.lower(), logger=record.name)


def set_log_context(**fields) -> None:
    _context.update(fields)


def log(message: str, event: str = "info", level: str = "info", json_only: bool = False, **fields):
    """One log line on stderr. `event` names what happened (start, progress, checkpoint, resume,
    signal, finish, error, ...) for collectors; `json_only` lines are too frequent for a plain log.
    """
    if log_format() == "json":
        record = {"ts": _now(), "level": level, "event": event, "message": message}
        record.update(_context)
        record.update(fields)
        print(json.dumps(record, default=str, ensure_ascii=False), file=sys.stderr, flush=True)
    elif not json_only:
        print(f"[bulkinfer] {message}", file=sys.stderr, flush=True)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


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
        if sys.stderr.isatty() and log_format() == "plain":
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
                f"{self.tokens / elapsed:,.0f} tok/s, ETA {_clock(eta)}",
                event="progress",
                rows_done=self.done,
                rows_total=self.total,
                tokens_done=self.tokens,
                tokens_per_second=round(self.tokens / elapsed, 2),
                elapsed_seconds=round(elapsed, 3),
                eta_seconds=None if eta == float("inf") else round(eta, 1),
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _clock(seconds: float) -> str:
    if seconds == float("inf"):
        return "unknown"
    seconds = int(seconds)
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"

"""Progress and log lines: a tqdm bar on a terminal, periodic plain lines elsewhere (a Slurm log),
or one JSON object per line for log collectors (`--log-format json`, BULKINFER_LOG_FORMAT=json).

The ETA counts planned work in tokens (prompts plus the new tokens rows may take), not rows:
batches run longest first, so rows early on cost many times what rows at the end do.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import threading
import time
from datetime import datetime, timezone

import numpy as np

from bulkinfer import process
from bulkinfer.console import speaker
from bulkinfer.planner import Batch

# U+2028 and U+2029 escaped in JSON log lines (valid JSON either way): log tools that split on
# Unicode line breaks would cut a record at them
LINE_SEPARATORS = str.maketrans({"\u2028": "\\u2028", "\u2029": "\\u2029"})
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


def log(
    message: str, event: str | None = None, level: str = "info", json_only: bool = False, **fields
):
    """One log line on stderr. `event` names what happened (start, progress, checkpoint, resume,
    signal, finish, error, ...) for collectors, the level where nothing more fitting names it
    (`info`, `warning`); `json_only` lines are too frequent for a plain log.
    """
    if log_format() == "json":
        record = {"ts": _now(), "level": level, "event": event or level, "message": message}
        record.update(_context)
        record.update(fields)
        line = json.dumps(record, default=str, ensure_ascii=False).translate(LINE_SEPARATORS)
        _emit(line, sys.stderr)
    elif not json_only:
        line = f"{_plain_prefix()} {message}"
        bar = _live_bar
        if bar is None:
            _emit(line, sys.stderr)
        else:  # the bar cleared, the line written, the bar drawn again below it
            with bar.external_write_mode(file=sys.stderr):
                _emit(line, sys.stderr)


def _plain_prefix() -> str:
    """`[bulkinfer]`; a `--gpus` worker's lines, which share a terminal with its siblings',
    name its shard: `[bulkinfer 1/4]`."""
    return f"[{speaker()}]"


def _emit(line: str, stream) -> None:
    """A line on a stream whose reader may go away (`bulkinfer run job.yaml 2>&1 | head`): the
    job goes on, its later lines unheard, where the first write to the closed pipe stopped it
    with the outputs unwritten."""
    if stream is None or stream in _gone:
        return
    try:
        with _writing:  # one write a line: lines from two threads never share one
            stream.write(line + "\n")
            stream.flush()
    except BrokenPipeError:
        _gone.add(stream)
        if process.OWN:  # Python's own writes at exit go nowhere too; a library caller's stay
            with contextlib.suppress(OSError, ValueError):
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, stream.fileno())
                os.close(devnull)


# reentrant: a signal handler that logs runs on the thread it interrupts, which may hold it
_writing = threading.RLock()
_live_bar = None  # a run's tqdm bar on the terminal, while it is drawn
_gone: set = set()  # streams whose reader went away: bulkinfer writes no more to them


def say(text: str) -> None:
    """Lines on stdout (the end-of-run summary) that never fail the run: a character the
    stream's encoding lacks is shown escaped, as Python shows it on stderr, and a closed stdout
    gets nothing. The outputs are on disk by then."""
    stream = sys.stdout
    try:
        _emit(text, stream)
    except UnicodeEncodeError:
        encoding = stream.encoding or "ascii"
        _emit(text.encode(encoding, "backslashreplace").decode(encoding), stream)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Progress:
    """Rows and tokens done, tokens/s and one ETA: a tqdm bar on a terminal (rows, with
    bulkinfer's ETA and no estimate of tqdm's own), else a line every `log_every` seconds.

    The ETA counts planned work in tokens, not rows: each row's prompt plus the new tokens it
    may take, times its n sequences (`row_work`, indexed by input row). Rows early on can cost
    many times what rows at the end do. A generation stream reports within a batch: every new
    token counts as work done as it comes, a prompt once its row has started, and a row, once
    finished, counts its planned work in full (its unused tokens are work that will not be
    done).
    """

    def __init__(
        self,
        batches: list[Batch],
        todo: list[Batch],
        row_work: np.ndarray,
        log_every: float,
        token_kind: str = "new",
    ):
        self.row_work = row_work
        self.counted = np.zeros(len(row_work), dtype=bool)  # rows whose work is done
        self.total = sum(len(b.rows) for b in batches)
        self.done = self.total - sum(len(b.rows) for b in todo)
        self.done_before = self.done  # rows committed by earlier runs of a resumed job
        self.work_left = sum(int(row_work[b.rows].sum()) for b in todo)
        self.work_done = 0
        self.in_flight = 0  # tokens made by rows not finished yet
        self.tokens = 0
        self.token_kind = token_kind
        self.start = time.monotonic()
        self.log_every = log_every
        self.last_log = self.start
        self.last_draw = self.start
        self.logged = (self.done, self.tokens)
        self.bar = None
        self.closed = False
        if sys.stderr.isatty() and log_format() == "plain":
            # imported here: tqdm reads TQDM_DISABLE as it is imported, which JSON mode sets
            # (route_library_output_to_json) for libraries' bars, transformers' GGUF one among them
            from tqdm import tqdm

            self.bar = tqdm(
                total=self.total,
                initial=self.done,
                unit="row",
                dynamic_ncols=True,
                bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} rows [{elapsed}{postfix}]",
            )
            _bar_drawn(self.bar)

    def advance(
        self, new_tokens: int, finished: np.ndarray, finished_tokens: int, prompt_tokens: int = 0
    ) -> None:
        """A generation stream's report: `new_tokens` made by rows in flight since the last,
        `prompt_tokens` of the sequences started meanwhile (work done, as their new tokens
        are), and the rows that finished (`finished_tokens`: their prompt and new tokens)."""
        self.tokens += new_tokens
        self.in_flight += new_tokens + prompt_tokens
        rows = self._count(finished)
        self.in_flight = max(0, self.in_flight - finished_tokens)
        self.done += rows
        self._show(rows)

    def update(self, batch: Batch, tokens: int) -> None:
        """A whole batch done (the batch-at-a-time loop); `tokens` of the kind shown."""
        rows = self._count(batch.rows)
        self.tokens += tokens
        self.done += rows
        self._show(rows)

    def _count(self, rows: np.ndarray) -> int:
        """These rows' planned work done, once a row (one finished in a stream that failed runs
        again in the batch-at-a-time loop, and was counted past the job's rows); returns how
        many were not counted before."""
        rows = np.asarray(rows, dtype=np.int64)
        rows = rows[~self.counted[rows]]
        self.counted[rows] = True
        work = int(self.row_work[rows].sum())
        self.work_done += work
        self.work_left -= work
        return len(rows)

    def eta_seconds(self) -> float:
        done = self.work_done + self.in_flight
        left = max(0, self.work_left - self.in_flight)
        if done <= 0:
            return float("inf")
        return left * (time.monotonic() - self.start) / done

    def _show(self, rows: int) -> None:
        now = time.monotonic()
        if self.bar is not None:
            if rows or now - self.last_draw >= 1.0:
                self.last_draw = now
                self.bar.set_postfix_str(self._figures(now), refresh=False)
                self.bar.update(rows) if rows else self.bar.refresh()
        elif now - self.last_log >= self.log_every:
            self._log(now)

    def _figures(self, now: float) -> str:
        rate = self.tokens / max(now - self.start, 1e-9)
        eta = _clock(self.eta_seconds())
        # a resumed run's tokens are its own, where its rows count the earlier runs' too
        this_run = " this run" if self.done_before else ""
        return f"{self.tokens:,} {self.token_kind} tokens{this_run}, {rate:,.0f} tok/s, ETA {eta}"

    def _log(self, now: float) -> None:
        self.last_log = now
        self.logged = (self.done, self.tokens)
        elapsed = max(now - self.start, 1e-9)
        eta = self.eta_seconds()
        before = f", {self.done_before:,} before" if self.done_before else ""
        log(
            f"{self.done:,}/{self.total:,} rows ({self.done / max(self.total, 1):.0%}{before}), "
            + self._figures(now),
            event="progress",
            rows_done=self.done,
            rows_total=self.total,
            rows_done_before=self.done_before,
            tokens_done=self.tokens,
            token_kind=self.token_kind,
            tokens_per_second=round(self.tokens / elapsed, 2),
            elapsed_seconds=round(elapsed, 3),
            eta_seconds=None if eta == float("inf") else round(eta, 3),
        )

    def close(self) -> None:
        """The bar closed, or the last line logged (once, where it says something new)."""
        if self.closed:
            return
        self.closed = True
        if self.bar is not None:
            _bar_drawn(None)
            self.bar.close()
        elif self.logged != (self.done, self.tokens):
            self._log(time.monotonic())


def _bar_drawn(bar) -> None:
    """Lines logged while a bar is drawn go above it, not onto its line."""
    global _live_bar
    _live_bar = bar


def _clock(seconds: float) -> str:
    if seconds == float("inf"):
        return "unknown"
    seconds = int(seconds)
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


@contextlib.contextmanager
def no_library_bars():
    """transformers' progress bars off while weights load or a GGUF file converts (a job logs
    its own progress; a bar's carriage returns garble a piped log), and as they were
    afterwards: a notebook that runs a job keeps its own bars."""
    from huggingface_hub import utils as hub
    from transformers.utils import logging as hf_logging

    was_on, hub_off = hf_logging.is_progress_bar_enabled(), hub.are_progress_bars_disabled()
    hf_logging.disable_progress_bar()  # (the hub's bars too)
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()  # (the hub's bars too)
        if hub_off != hub.are_progress_bars_disabled():
            (hub.disable_progress_bars if hub_off else hub.enable_progress_bars)()

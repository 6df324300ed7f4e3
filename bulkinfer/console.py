"""The console script: `bulkinfer.cli.entry`, with a Ctrl-C that lands while the command line's
own modules are still importing answered as any other (one line, exit 130, a JSON `signal`
event with --log-format json), not a traceback; so are SIGTERM and SIGUSR1 (one line, exit
128 + the signal) until a command sets its own handlers (a run's, once it takes its folder),
rather than a silent death by the signal."""

from __future__ import annotations

import os
import signal
import sys

# set in the environment of a `--gpus` launcher's workers: a worker the stop ends while it
# starts dies by the signal, saying nothing, and the launcher says it once for them all
WORKER_ENV = "BULKINFER_LAUNCHED_WORKER"


def launched_worker() -> bool:
    """Whether this process is a `--gpus` launcher's worker: its lines share the launcher's
    terminal with its siblings', and the launcher prints the merged job's summary."""
    return os.environ.get(WORKER_ENV) == "1"


def speaker() -> str:
    """Who a plain line is from: `bulkinfer`, or in a `--gpus` worker, whose lines share the
    launcher's terminal with its siblings', `bulkinfer 1/4` (its `--shard`)."""
    args = sys.argv[1:]
    if launched_worker() and "--shard" in args[:-1]:
        return f"bulkinfer {args[args.index('--shard') + 1]}"
    return "bulkinfer"


def entry() -> None:
    if not launched_worker():
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, _stop_now)
    try:
        from bulkinfer.cli import entry as command
    except KeyboardInterrupt:
        say_interrupted()
    command()


def _stop_now(signum, frame) -> None:
    """A stop where the command has no handler of its own (a run commits parts only under
    its own): the process ends at once, as the signal itself would end it, but saying so.
    os._exit, not an exception: one raised inside an import that a C extension runs (torch's)
    aborts the process."""
    name = signal.Signals(signum).name
    message = f"stopped by {name}"
    args = sys.argv[1:]
    if "run" in args:  # (after the global options, --log-format's)
        message += f"; committed work is kept: {resume_advice('--overwrite' in args)}"
    _say(message, "warning", name, 128 + signum)
    os._exit(128 + signum)


def resume_advice(overwrite: bool) -> str:
    """How to resume a stopped run: its own command, less an --overwrite (which would start the
    job afresh, dropping what this run committed)."""
    if overwrite:
        return "rerun it without --overwrite to resume (with it, the job starts afresh)"
    return "rerun the same command to resume"


def say_interrupted(message: str = "interrupted") -> None:
    """What bulkinfer.cli says of a Ctrl-C, with the standard library alone (nothing of
    bulkinfer's may have imported yet, or an import the Ctrl-C cut short cannot run again:
    numpy's)."""
    _say(message, "error", "SIGINT", 130)
    sys.exit(130)


def _say(message: str, level: str, signal_name: str, code: int) -> None:
    """One line on stderr (a JSON `signal` event with --log-format json)."""
    import json
    from datetime import datetime, timezone

    if log_format_asked(sys.argv[1:]) == "json":
        now = datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        record = {"ts": now, "level": level, "event": "signal", "message": message}
        record.update(signal=signal_name, exit_code=code)
        sys.stderr.write(json.dumps(record) + "\n")
    else:
        sys.stderr.write(f"{speaker()}: {message}\n")
    sys.stderr.flush()


def log_format_asked(args: list[str]) -> str:
    """The log format a command line asks for (--log-format, else BULKINFER_LOG_FORMAT),
    before the option is read."""
    import os

    asked = "json" if "--log-format=json" in args else None
    if "--log-format" in args[:-1]:
        asked = args[args.index("--log-format") + 1]
    return asked or os.environ.get("BULKINFER_LOG_FORMAT", "plain").strip().lower()

"""The console script: `bulkinfer.cli.entry`, with a Ctrl-C that lands while the command line's
own modules are still importing answered as any other (one line, exit 130, a JSON `signal`
event with --log-format json), not a traceback."""

from __future__ import annotations

import sys


def entry() -> None:
    try:
        from bulkinfer.cli import entry as command
    except KeyboardInterrupt:
        say_interrupted()
    command()


def say_interrupted(message: str = "interrupted") -> None:
    """What bulkinfer.cli says of a Ctrl-C, with the standard library alone (nothing of
    bulkinfer's may have imported yet, or an import the Ctrl-C cut short cannot run again:
    numpy's)."""
    import json
    from datetime import datetime, timezone

    if log_format_asked(sys.argv[1:]) == "json":
        now = datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        record = {"ts": now, "level": "error", "event": "signal", "message": message}
        record.update(signal="SIGINT", exit_code=130)
        sys.stderr.write(json.dumps(record) + "\n")
    else:
        sys.stderr.write(f"bulkinfer: {message}\n")
    sys.exit(130)


def log_format_asked(args: list[str]) -> str:
    """The log format a command line asks for (--log-format, else BULKINFER_LOG_FORMAT),
    before the option is read."""
    import os

    asked = "json" if "--log-format=json" in args else None
    if "--log-format" in args[:-1]:
        asked = args[args.index("--log-format") + 1]
    return asked or os.environ.get("BULKINFER_LOG_FORMAT", "plain").strip().lower()

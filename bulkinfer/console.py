"""The console script: `bulkinfer.cli.entry`, with a Ctrl-C that lands while the command line's
own modules are still importing answered as any other (one line, exit 130), not a traceback."""

from __future__ import annotations

import sys


def entry() -> None:
    try:
        from bulkinfer.cli import entry as command
    except KeyboardInterrupt:
        sys.stderr.write("bulkinfer: interrupted\n")
        sys.exit(130)
    command()

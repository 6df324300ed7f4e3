"""Whose process this is: bulkinfer's own (the console script, `python -m bulkinfer`) or the
program of someone calling the library (a notebook, a script). Only in its own may bulkinfer
change the process as a whole (mark unused modules absent, set environment variables, exit
without the interpreter's teardown), and only there is the process's age at a run's start the
time its imports took. And the names that tell this process's temporary files from those of
other processes and hosts (`host_tag`, `pid_alive`), so a killed one's can be tidied away."""

from __future__ import annotations

import os
import socket
import sys

OWN = False


def claim() -> None:
    """Called by the command line's entry point: the process is the command's, unless an
    IPython kernel runs it (`%run -m bulkinfer run job.yaml` in a notebook)."""
    global OWN
    OWN = "IPython" not in sys.modules
    if OWN:
        # the Rust tokenizer keeps its threads in processes this one forks (the compiler's
        # workers), without a warning in each
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")


def host_tag() -> str:
    """This host's name, as a folder name may hold it (no dashes: they separate the fields)."""
    return "".join(c if c.isalnum() else "_" for c in socket.gethostname()) or "host"


def pid_alive(pid: int) -> bool:
    """Whether a process of this host has this id (another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True

"""Whose process this is: bulkinfer's own (the console script, `python -m bulkinfer`) or the
program of someone calling the library (a notebook, a script). Only in its own may bulkinfer
change the process as a whole (mark unused modules absent, set environment variables, exit
without the interpreter's teardown), and only there is the process's age at a run's start the
time its imports took."""

from __future__ import annotations

import os
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

"""When and how the engines compile their hot functions with torch.compile.

On a GPU, inductor fuses chains of element-wise work into a few kernels; on the CPU compiling
costs more than it saves on jobs of test size, so the same functions run eagerly there. A
compiler that fails (no working Triton, an unusual setup) must not stop a job: the function
then runs eagerly and the user hears of it once.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

# BULKINFER_COMPILE=0 keeps everything eager on a GPU too (to compare, or to sidestep a
# compiler problem on an unusual setup).
COMPILE_ENV = "BULKINFER_COMPILE"


def compile_backend(device: torch.device) -> str | None:
    """Inductor on a GPU (unless BULKINFER_COMPILE=0); None (eager) on the CPU."""
    wanted = device.type == "cuda" and os.environ.get(COMPILE_ENV, "1") != "0"
    return "inductor" if wanted else None


class Compiled:
    """`fn` compiled, or `fn` itself once compiling it has failed; `failed(exc)` is told."""

    def __init__(self, fn, backend, failed: Callable[[Exception], None]):
        self.eager = fn
        self.failed = failed
        # dynamic=None: sizes are static except those the caller marks dynamic
        self.run = torch.compile(fn, dynamic=None, fullgraph=True, backend=backend)

    def __call__(self, *args):
        try:
            return self.run(*args)
        except torch._dynamo.exc.TorchDynamoException as exc:
            if self.run is self.eager:
                raise
            self.run = self.eager
            self.failed(exc)
            return self.eager(*args)


def first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__

"""When and how the engines compile their hot functions with torch.compile.

On a GPU, inductor fuses chains of element-wise work into a few kernels; on the CPU compiling
costs more than it saves on jobs of test size, so the same functions run eagerly there. A
compiler that fails (no working Triton, an unusual setup) must not stop a job: the function
then runs eagerly and the user hears of it once.
"""

from __future__ import annotations

import json
import os
import threading
import types
from collections.abc import Callable
from pathlib import Path

import torch

# BULKINFER_COMPILE=0 keeps everything eager on a GPU too (to compare, or to sidestep a
# compiler problem on an unusual setup).
COMPILE_ENV = "BULKINFER_COMPILE"


def compile_backend(device: torch.device) -> str | None:
    """Inductor on a GPU (unless BULKINFER_COMPILE=0); None (eager) on the CPU."""
    wanted = device.type == "cuda" and os.environ.get(COMPILE_ENV, "1") != "0"
    return "inductor" if wanted else None


def hash_triton_key(kind: str, device_type: str) -> None:
    """Start Triton's key on a thread, where the engine will compile (the fast engine on a GPU).
    Inductor's caches key every entry by it, and the first compiled call computes it: a hash of
    Triton's 0.5 GB library, ~1 s of an H200 box's first forward, in which nothing else runs.
    Hashing releases the GIL, so here it overlaps the weights' loading; the value is kept
    (Triton caches it), and a failure is left for the first compiled call to meet."""
    if kind == "fast" and compile_backend(torch.device(device_type)) is not None:
        threading.Thread(target=_triton_key, name="bulkinfer-triton-key", daemon=True).start()


def _triton_key() -> None:
    try:
        try:
            from triton.runtime.cache import triton_key
        except ImportError:  # Triton before 3.3
            from triton.compiler.compiler import triton_key
        triton_key()
    except Exception:  # noqa: BLE001 (only a head start)
        return


def compiler_import_ahead() -> Callable[[], None] | None:
    """`import_compiler` where BULKINFER_IMPORT_AHEAD=1 asks for it, else None."""
    return import_compiler if os.environ.get("BULKINFER_IMPORT_AHEAD") == "1" else None


def import_compiler() -> None:
    """Import inductor's modules (~0.9 s of an H200 box's first forward, Python holding the
    GIL throughout), meant for a thread while the weights are copied to the GPU, whose threads
    wait with the GIL released: the first forward then starts with them imported. Measured
    before (docs/perf.md): beside the loader's own imports it only moved the time. Whoever runs
    this joins it before the first compile (two threads importing one package in turn may
    deadlock). Not measured yet on a GPU: the copying threads also need the GIL between
    pieces, so it is off unless BULKINFER_IMPORT_AHEAD=1 (scripts/bench_jobs.py A/B)."""
    try:
        import torch._inductor.compile_fx  # noqa: F401  (what torch.compile's inductor loads)
    except Exception:  # noqa: BLE001 (only a head start; the first compile meets any failure)
        return


def use_compile_cache(folder: Path | None, device_name: str) -> Path | None:
    """Keep the compiler's work on disk in bulkinfer's cache folder (inductor's FX-graph and
    autotuning caches, Triton's kernels), so the second job on a box, and every Slurm array
    task after the first where the cache folder is shared, loads compiled kernels instead of
    building them. One folder per torch version and GPU; inside it inductor keys each entry by
    the graph itself (the model's shapes and dtype). A folder the user set wins."""
    if folder is None:
        return None
    gpu = "".join(c if c.isalnum() else "-" for c in device_name).strip("-").lower()
    where = folder / "compile" / f"torch-{torch.__version__.split('+')[0]}-{gpu}"
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(where / "inductor"))
    os.environ.setdefault("TRITON_CACHE_DIR", str(where / "triton"))
    return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])


def compiled_marker(folder: Path | None, device_name: str, config) -> Path | None:
    """A file in the compile cache that says a fast engine of this model shape has compiled
    on this torch and GPU before, so its compiled kernels load instead of being built (what
    `model.engine: auto` weighs a small job against)."""
    if folder is None:
        return None
    import hashlib

    from bulkinfer.configs import text_config

    fields = text_config(config).to_dict()
    fields = {k: v for k, v in fields.items() if not k.startswith("_") and "version" not in k}
    text = json.dumps(fields, sort_keys=True, default=str)
    shape = hashlib.blake2b(text.encode(), digest_size=8).hexdigest()
    gpu = "".join(c if c.isalnum() else "-" for c in device_name).strip("-").lower()
    return folder / "compile" / f"torch-{torch.__version__.split('+')[0]}-{gpu}" / f"{shape}.done"


# raised (fullgraph) when a function's code has been compiled for more variants than dynamo keeps
COMPILE_LIMIT = getattr(torch._dynamo.exc, "FailOnRecompileLimitHit", RuntimeError)


def own_code(fn):
    """`fn` with a copy of its code object. Dynamo keeps its compiled variants, and counts them
    against its recompile limit (8), per code object: the layer functions of every engine a
    process builds share one code, so a process that ran jobs on a few models or settings (a
    notebook, a script calling bulkinfer.run in turn) hit the limit and the next job failed."""
    copy = types.FunctionType(
        fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__
    )
    copy.__kwdefaults__ = fn.__kwdefaults__
    copy.__qualname__ = fn.__qualname__
    return copy


class Compiled:
    """`fn` compiled, or `fn` itself once compiling it has failed; `failed(exc)` is told."""

    def __init__(self, fn, backend, failed: Callable[[Exception], None]):
        self.eager = fn
        self.failed = failed
        # dynamic=None: sizes are static except those the caller marks dynamic
        self.run = torch.compile(own_code(fn), dynamic=None, fullgraph=True, backend=backend)

    def __call__(self, *args):
        try:
            return self.run(*args)
        except (torch._dynamo.exc.TorchDynamoException, COMPILE_LIMIT) as exc:
            if self.run is self.eager:
                raise
            self.run = self.eager
            self.failed(exc)
            return self.eager(*args)

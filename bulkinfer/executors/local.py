"""One node, several workers: one `bulkinfer run --shard i/N` process per GPU (or per CPU worker).

Each worker is an ordinary shard run, so it checkpoints, resumes and merges exactly as a Slurm
array task does; this module only starts them, passes signals on, and waits. Workers die with
their launcher: they share its process group (a Ctrl-C or a group kill reaches them all) and, on
Linux, the kernel sends each a SIGKILL when the launcher dies, however it dies, so no orphan
goes on writing beside a rerun. What they committed stays valid and the rerun resumes it.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from collections.abc import Callable

from bulkinfer.console import WORKER_ENV, resume_advice
from bulkinfer.errors import SpecError, UserError, counted
from bulkinfer.observe.progress import log

PR_SET_PDEATHSIG = 1  # linux/prctl.h


CPU_WORKERS_A_CORE = 4  # the most CPU workers --gpus starts per core, where no GPU is visible


def worker_count(gpus: str) -> tuple[int, list[str] | None]:
    """`--gpus all` or a number -> (workers, CUDA device ids or None on a machine without GPUs)."""
    import torch

    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus == "all":
        if visible == 0:
            raise SpecError(
                "--gpus all: no GPU is visible; give a number to run that many CPU workers"
            )
        return visible, [str(i) for i in range(visible)]
    if not gpus.isdigit() or int(gpus) < 1:
        raise SpecError(f"--gpus {gpus!r}: expected 'all' or a positive number")
    count = int(gpus)
    if visible and count > visible:
        raise SpecError(
            f"--gpus {count}: only {counted(visible, 'GPU')} {'is' if visible == 1 else 'are'} visible"
        )
    cores = os.cpu_count() or 1
    if not visible and count > CPU_WORKERS_A_CORE * cores:  # each loads the model: a typo of
        raise SpecError(  # a GPU count on a machine without one would fill its memory
            f"--gpus {count}: no GPU is visible, and {count} CPU workers would share "
            f"{counted(cores, 'core')}; give at most {CPU_WORKERS_A_CORE * cores}"
        )
    return count, [str(i) for i in range(count)] if visible else None


def run_workers(base_args: list[str], count: int, devices: list[str] | None) -> int:
    """Start `count` shard workers of the same `bulkinfer run` arguments and wait for all (the
    caller holds the job folder's lock meanwhile; each worker holds its shard folder's)."""
    procs = []
    for i in range(count):
        env = {**os.environ, WORKER_ENV: "1"}
        if devices is not None:
            env["CUDA_VISIBLE_DEVICES"] = devices[i]
        cmd = [sys.executable, "-m", "bulkinfer", "run", *base_args, "--shard", f"{i}/{count}"]
        procs.append(subprocess.Popen(cmd, env=env, preexec_fn=_dies_with_launcher()))

    received = []

    def forward(signum, frame):
        received.append(signum)
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {
        sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
    }
    try:
        codes = [p.wait() for p in procs]
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
    if received and any(c < 0 for c in codes):
        # a worker the signal ended while it was starting had no batch in flight and said
        # nothing: the launcher says it once, with the exit code a shell gives that signal
        name, code = signal.Signals(received[0]).name, 128 + received[0]
        log(
            f"stopped by {name} while workers were starting; "
            f"{resume_advice('--overwrite' in base_args)}",
            event="signal",
            level="warning",
            signal=name,
            exit_code=code,
        )
        return code
    failed = [128 - c if c < 0 else c for c in codes if c != 0]  # killed by signal N: 128 + N
    if not received:
        _name_failed_workers(codes)
    return max(failed) if failed else 0


def _name_failed_workers(codes: list[int]) -> None:
    """One line for the workers that failed, naming each shard and how it ended: a worker
    killed from outside (the OOM killer, a kill -9) says nothing itself, and the launcher's
    exit code alone read as if the launcher had been killed."""
    count = len(codes)
    ended = [
        f"shard {i}/{count} "
        + (f"was killed by {_signal_name(-c)}" if c < 0 else f"exited with code {c}")
        for i, c in enumerate(codes)
        if c != 0
    ]
    if ended and all(c == UserError.exit_code for c in codes if c != 0):  # each said why
        log(
            f"{'; '.join(ended)}: refused as said above; fix that, then rerun (what the shards "
            "committed is kept)",
            level="warning",
        )
    elif ended:
        log(
            f"{'; '.join(ended)}; the other shards' work and what these committed are kept: "
            "rerun the same command to resume",
            level="warning",
        )


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _dies_with_launcher() -> Callable[[], None] | None:
    """What a worker runs between fork and exec: ask the kernel for a SIGKILL when the launcher
    dies (Linux only; elsewhere the shared process group is what ties them)."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)  # loaded here: the forked child only calls it
    launcher = os.getpid()

    def ask() -> None:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != launcher:  # the launcher died before the request was in place
            os.kill(os.getpid(), signal.SIGKILL)

    return ask

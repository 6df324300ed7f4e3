"""Slurm: an sbatch script that runs the job as an array, one shard per task.

Slurm sends USR1 a grace period before the time limit (`--signal=B:USR1@S`); the task finishes
its batch in flight, checkpoints and exits 138, and the script requeues it. The requeued task
resumes its shard; the last task to finish merges.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from bulkinfer.errors import UserError

STOPPED_BY_USR1 = 128 + 10


@dataclass(frozen=True)
class SlurmOptions:
    array: int
    gpus_per_task: int = 0
    partition: str | None = None
    time: str | None = None
    account: str | None = None
    cpus_per_task: int | None = None
    mem: str | None = None
    grace_seconds: int = 120
    max_parallel: int | None = None


def sbatch_script(job: Path, output: Path, run_args: list[str], options: SlurmOptions) -> str:
    """The sbatch script text: array, per-task logs, warning signal, requeue on it."""
    array = f"0-{options.array - 1}" + (f"%{options.max_parallel}" if options.max_parallel else "")
    directives = [
        f"--job-name=bulkinfer-{job.stem}",
        f"--array={array}",
        f"--output={output}/logs/%A_%a.log",
        "--open-mode=append",
        f"--signal=B:USR1@{options.grace_seconds}",
        "--requeue",
    ]
    for flag, value in (
        ("--gpus-per-task", options.gpus_per_task or None),
        ("--partition", options.partition),
        ("--time", options.time),
        ("--account", options.account),
        ("--cpus-per-task", options.cpus_per_task),
        ("--mem", options.mem),
    ):
        if value is not None:
            directives.append(f"{flag}={value}")
    command = shlex.join(
        [sys.executable, "-m", "bulkinfer", "run", str(job), "--output", str(output), *run_args]
    )
    lines = ["#!/bin/bash", *(f"#SBATCH {d}" for d in directives), ""]
    lines += [
        "# One shard per array task: bulkinfer reads SLURM_ARRAY_TASK_ID/_MIN/_COUNT.",
        f"{command} &",
        "pid=$!",
        "# The warning signal reaches this shell (B:); pass it on and keep waiting for the exit.",
        "trap 'kill -USR1 $pid 2>/dev/null' USR1",
        "trap 'kill -TERM $pid 2>/dev/null' TERM",
        "code=0",
        "while true; do",
        "    wait $pid; code=$?",
        "    kill -0 $pid 2>/dev/null || break",
        "done",
        f"if [ $code -eq {STOPPED_BY_USR1} ]; then",
        '    echo "bulkinfer: checkpointed before the time limit; requeueing"',
        '    scontrol requeue "${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"',
        "fi",
        "exit $code",
        "",
    ]
    return "\n".join(lines)


def submit(script_path: Path) -> str:
    """sbatch the script; returns Slurm's job id."""
    if shutil.which("sbatch") is None:
        raise UserError("sbatch is not on PATH; run this on a Slurm login node, or use --dry-run")
    proc = subprocess.run(
        ["sbatch", "--parsable", str(script_path)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise UserError(
            f"sbatch refused the job: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}"
        )
    return proc.stdout.strip().split(";")[0]

"""Slurm: an sbatch script that runs the job as an array, one shard per task.

Slurm sends USR1 a grace period before the time limit (`--signal=B:USR1@S`); the task finishes
its batch in flight, checkpoints and exits 138, and the script requeues it. The requeued task
resumes its shard; the last task to finish merges. A task that committed nothing before the
warning (its start-up outlasts the time limit less the grace period) is not requeued: a fresh
start would stop at the same place, forever.
Each task names its shard (`--shard ID/N`), so resubmitting one task (`sbatch --array=3
OUT/sbatch.sh`) runs that shard of the same split.
"""

from __future__ import annotations

import contextlib
import getpass
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from bulkinfer.errors import SpecError, UserError, counted
from bulkinfer.io.layout import OutputLayout

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

    def __post_init__(self) -> None:
        if self.gpus_per_task > 1:
            raise SpecError(
                f"--gpus-per-task {self.gpus_per_task}: each array task runs one shard on one "
                f"GPU; ask for --array {self.array * self.gpus_per_task} --gpus-per-task 1 "
                "instead"
            )
        limit = slurm_seconds(self.time) if self.time else None
        if limit is not None and self.grace_seconds >= limit:
            raise SpecError(
                f"--grace {self.grace_seconds}: the warning would come before the task starts "
                f"(--time {self.time} is {limit} s); give a grace period well under the limit"
            )


def slurm_seconds(text: str) -> int | None:
    """Seconds in a Slurm time limit (minutes, m:s, h:m:s, d-h, d-h:m, d-h:m:s), or None where
    it is unlimited or not in a form Slurm documents (sbatch then says what is wrong)."""
    days, _, rest = text.strip().rpartition("-")
    parts = rest.split(":")
    if not all(p.isdigit() for p in parts) or (days and not days.isdigit()) or len(parts) > 3:
        return None
    numbers = [int(p) for p in parts]
    if days:  # d-h, d-h:m, d-h:m:s
        numbers += [0] * (3 - len(numbers))
        h, m, sec = numbers
        return ((int(days) * 24 + h) * 60 + m) * 60 + sec
    if len(numbers) == 1:
        return numbers[0] * 60
    if len(numbers) == 2:
        return numbers[0] * 60 + numbers[1]
    return (numbers[0] * 60 + numbers[1]) * 60 + numbers[2]


def _directive(flag: str, value) -> str:
    """One #SBATCH line's option, quoted where the value has spaces (sbatch splits there)."""
    text = str(value)
    if '"' in text or "\n" in text:
        raise UserError(f"{flag}: {text!r} holds a quote or a line break, which sbatch cannot take")
    return f'{flag}="{text}"' if any(c.isspace() for c in text) else f"{flag}={text}"


def sbatch_script(job: Path, output: Path, run_args: list[str], options: SlurmOptions) -> str:
    """The sbatch script text: array, per-task logs, warning signal, requeue on it."""
    array = f"0-{options.array - 1}" + (f"%{options.max_parallel}" if options.max_parallel else "")
    directives = [
        _directive("--job-name", f"bulkinfer-{job.stem}"),
        f"--array={array}",
        _directive("--output", f"{output}/logs/%A_%a.log"),
        # the folder of the submission: relative --set paths name what they named there, also
        # for a task resubmitted from elsewhere (sbatch --array=ID OUT/sbatch.sh)
        _directive("--chdir", Path.cwd()),
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
            directives.append(_directive(flag, value))
    command = shlex.join(
        [sys.executable, "-m", "bulkinfer", "run", str(job), "--output", str(output), *run_args]
    )
    lines = ["#!/bin/bash", *(f"#SBATCH {d}" for d in directives), ""]
    lines += [
        f"# One shard per array task, of {options.array}: resubmitting a task by its id",
        "# (sbatch --array=ID this-script) runs that shard of the same split.",
        f"manifest={_task_manifest(output, options.array)}",
        "# the parts this task's shard had committed as it started: the task committed one if its",
        "# manifest then holds a line that was not there (a run drops torn and repeated lines as",
        "# it starts, so neither the count of lines nor the last line says it)",
        "before=$(mktemp) && trap 'rm -f \"$before\"' EXIT",
        'if [ -f "$manifest" ]; then cp "$manifest" "$before"; fi',
        'committed() { [ -s "$manifest" ] && grep -vxFf "$before" "$manifest" | grep -q .; }',
        f'{command} --shard "${{SLURM_ARRAY_TASK_ID}}/{options.array}" &',
        "pid=$!",
        "# The warning signal reaches this shell (B:); pass it on and keep waiting for the exit.",
        "trap 'kill -USR1 $pid 2>/dev/null' USR1",
        "trap 'kill -TERM $pid 2>/dev/null' TERM",
        "code=0",
        "while true; do",
        "    wait $pid; code=$?",
        "    kill -0 $pid 2>/dev/null || break",
        "done",
        f"if [ $code -eq {STOPPED_BY_USR1} ] && committed; then",
        '    echo "bulkinfer: checkpointed before the time limit; requeueing"',
        '    scontrol requeue "${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"',
        f"elif [ $code -eq {STOPPED_BY_USR1} ]; then",
        '    echo "bulkinfer: warned of the time limit before committing anything; not requeued'
        " (a fresh start would stop at the same place): raise --time or lower --grace, then"
        ' resubmit"',
        "fi",
        "exit $code",
        "",
    ]
    return "\n".join(lines)


def _task_manifest(output: Path, count: int) -> str:
    """The manifest of the array task's shard, as a shell word (the task id filled in)."""
    layout = OutputLayout(output)
    shard = layout.shard(0, count)
    inside = shard.manifest.relative_to(shard.root)
    folder = f'shard-$(printf %05d "$SLURM_ARRAY_TASK_ID")-of-{count:05d}'
    return f"{shlex.quote(str(layout.shards_dir))}/{folder}/{shlex.quote(str(inside))}"


def submit(script_path: Path) -> str:
    """sbatch the script; returns Slurm's job id."""
    if shutil.which("sbatch") is None:
        raise UserError("sbatch is not on PATH; run this on a Slurm login node, or use --dry-run")
    proc = subprocess.run(
        ["sbatch", "--parsable", str(script_path)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        said = proc.stderr.strip()
        why = said.splitlines()[-1] if said else f"exit code {proc.returncode}, no message"
        raise UserError(f"sbatch refused the job: {why}")
    return proc.stdout.strip().split(";")[0]


# Slurm's states of a task that has not started (or is waiting to start again)
QUEUED_STATES = frozenset({"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "SPECIAL_EXIT"})


@dataclass(frozen=True)
class SlurmTask:
    """An array task as squeue lists it; `state` None where squeue no longer lists it."""

    name: str  # JOBID_INDEX, as Slurm names the task (and its log file)
    state: str | None
    reason: str = ""

    @property
    def queued(self) -> bool:
        return self.state in QUEUED_STATES


def task_states(script: Path, count: int, recorded: list[str]) -> dict[int, SlurmTask] | None:
    """Slurm's word on the task of each of `count` shards, by shard index (array task i runs
    shard i): the newest task squeue lists that runs `script`, so a task resubmitted by hand
    (`sbatch --array=I OUT/sbatch.sh`) counts too; a shard with none is named by the newest
    array `bulkinfer slurm` submitted (`recorded`, oldest first). None where squeue cannot
    say (not on PATH, no controller answering)."""
    tasks = script_tasks(script)
    if tasks is None:
        return None
    newest: dict[int, SlurmTask] = {}
    for task in tasks:
        job, _, index = task.name.partition("_")
        i = int(index)
        if i not in newest or _job_number(job) > _job_number(newest[i].name.partition("_")[0]):
            newest[i] = task
    latest = recorded[-1] if recorded else "?"
    return {i: newest.get(i, SlurmTask(f"{latest}_{i}", None)) for i in range(count)}


def script_tasks(script: Path) -> list[SlurmTask] | None:
    """Every array task squeue lists (this user's) whose batch script is `script`; None where
    squeue cannot say."""
    if shutil.which("squeue") is None:
        return None
    command = ["squeue", "--noheader", "--array", "--format=%i|%T|%r|%o"]
    with contextlib.suppress(Exception):  # (no user name: every user's jobs, filtered below)
        command.append(f"--user={getpass.getuser()}")
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if proc.returncode != 0:
        return None
    target = str(script.resolve())
    found = []
    for line in proc.stdout.splitlines():
        fields = line.strip().split("|", 3)
        if len(fields) != 4 or fields[3].strip() != target:
            continue
        name, state, reason = (f.strip() for f in fields[:3])
        if name.partition("_")[2].isdigit():
            found.append(SlurmTask(name, state, "" if reason == "None" else reason))
    return found


def _job_number(job: str) -> int:
    return int(job) if job.isdigit() else -1


def refuse_while_queued(script: Path) -> None:
    """A new array from a folder whose last one still has tasks in Slurm's queue would run
    their shards twice (or, split otherwise, be refused task by task): refused, naming them."""
    tasks = [t for t in script_tasks(script) or [] if t.state not in FINISHED_STATES]
    if tasks:
        jobs = sorted({t.name.partition("_")[0] for t in tasks})
        raise UserError(
            f"{script.parent}: an array submitted from {script.name} is still in Slurm's queue "
            f"({counted(len(tasks), 'task')} of job {', '.join(jobs)}); cancel it (scancel "
            f"{' '.join(jobs)}) or let it finish, then submit again"
        )


# states squeue still lists a task in for a while after it ended
FINISHED_STATES = frozenset(
    {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL",
     "DEADLINE", "OUT_OF_MEMORY", "REVOKED"}
)  # fmt: skip

"""Which share of a job a process runs: `--shard I/N`, a Slurm array task, or srun tasks.

Every input row belongs to exactly one of N shards (plan.assign_shards balances them by tokens);
each shard keeps its own checkpoint under OUT/shards/, so shards never touch each other's files.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from bulkinfer.errors import SpecError


@dataclass(frozen=True)
class Shard:
    index: int
    count: int

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def parse_shard(text: str) -> Shard:
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match:
        raise SpecError(f"--shard {text!r}: expected I/N, e.g. --shard 0/8")
    index, count = int(match.group(1)), int(match.group(2))
    if count < 1 or not 0 <= index < count:
        raise SpecError(f"--shard {text}: I must be between 0 and N-1")
    return checked(Shard(index, count), f"--shard {text}")


MAX_SHARDS = 99_999  # shard folders are named shard-IIIII-of-NNNNN


def checked(shard: Shard, where: str) -> Shard:
    if shard.count < 1 or not 0 <= shard.index < shard.count:
        raise SpecError(f"{where}: shard {shard.index} of {shard.count} is not between 0 and N-1")
    if shard.count > MAX_SHARDS:
        raise SpecError(f"{where}: at most {MAX_SHARDS:,} shards, not {shard.count:,}")
    return shard


def shard_from_env(env: dict[str, str] | None = None) -> Shard | None:
    """The shard a scheduler assigned: a Slurm array task (times srun tasks, if several), srun
    tasks alone, or an indexed job's JOB_COMPLETION_INDEX with BULKINFER_SHARD_COUNT. Tasks
    count only inside a job step (srun sets SLURM_STEP_ID): the batch script itself sees its
    allocation's SLURM_NTASKS and SLURM_PROCID=0 too, and a run there is the only one, so it
    took shard 0 and the other shards never ran (`slurm_tasks_unused` says so)."""
    env = os.environ if env is None else env
    array, tasks = None, None

    def number(name: str, default: str | None = None) -> int:
        text = env.get(name, default)
        if text is None or not text.strip().lstrip("-").isdigit():
            raise SpecError(f"{name}={text!r}: expected a whole number")
        return int(text)

    if "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
        low = number("SLURM_ARRAY_TASK_MIN", "0")
        step = number("SLURM_ARRAY_TASK_STEP", "1")
        array = Shard(
            (number("SLURM_ARRAY_TASK_ID") - low) // max(step, 1), number("SLURM_ARRAY_TASK_COUNT")
        )
    if number("SLURM_NTASKS", "1") > 1 and "SLURM_PROCID" in env and _in_step(env):
        tasks = Shard(number("SLURM_PROCID"), number("SLURM_NTASKS"))
    if array and tasks:
        shard = Shard(array.index * tasks.count + tasks.index, array.count * tasks.count)
        return checked(shard, "the Slurm array times its tasks")
    if array or tasks:
        return checked(array or tasks, "the Slurm array or tasks")
    if "JOB_COMPLETION_INDEX" in env and "BULKINFER_SHARD_COUNT" in env:
        shard = Shard(number("JOB_COMPLETION_INDEX"), number("BULKINFER_SHARD_COUNT"))
        return checked(shard, "BULKINFER_SHARD_COUNT")
    return None


def _in_step(env) -> bool:
    return "SLURM_STEP_ID" in env or "SLURM_STEPID" in env


def slurm_tasks_unused(env: dict[str, str] | None = None) -> int:
    """The tasks of a Slurm allocation whose batch script runs bulkinfer without srun (0 when
    none): the run does the whole job (or its array task's shard) as one task."""
    env = os.environ if env is None else env
    tasks = env.get("SLURM_NTASKS", "1").strip()
    if "SLURM_JOB_ID" not in env or _in_step(env) or not tasks.isdigit() or int(tasks) < 2:
        return 0
    return int(tasks)


def refuse_row_column(keep_columns) -> None:
    """A sharded run's outputs keep each row's input position in a column named `row` (the
    merge orders the shards' rows by it and drops it): a kept input column of that name was
    overwritten there and lost in the merge. Refused before any work."""
    if "row" in keep_columns:
        raise SpecError(
            "input.keep_columns: 'row' is the column in which a sharded run (--shard, --gpus, "
            "a Slurm array) keeps each row's input position; rename the input column, or run "
            "the job unsharded"
        )

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
    return Shard(index, count)


def shard_from_env(env: dict[str, str] | None = None) -> Shard | None:
    """The shard a scheduler assigned: a Slurm array task (times srun tasks, if several), srun
    tasks alone, or an indexed job's JOB_COMPLETION_INDEX with BULKINFER_SHARD_COUNT."""
    env = os.environ if env is None else env
    array, tasks = None, None
    if "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
        low = int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
        array = Shard(int(env["SLURM_ARRAY_TASK_ID"]) - low, int(env["SLURM_ARRAY_TASK_COUNT"]))
    if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in env:
        tasks = Shard(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]))
    if array and tasks:
        return Shard(array.index * tasks.count + tasks.index, array.count * tasks.count)
    if array or tasks:
        return array or tasks
    if "JOB_COMPLETION_INDEX" in env and "BULKINFER_SHARD_COUNT" in env:
        return Shard(int(env["JOB_COMPLETION_INDEX"]), int(env["BULKINFER_SHARD_COUNT"]))
    return None

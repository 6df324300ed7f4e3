"""Where a job stands, read from its output folder alone (works on a login node with no GPU)."""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from bulkinfer.io.layout import OutputLayout
from bulkinfer.io.lock import is_locked, lock_held
from bulkinfer.sharding import Shard
from bulkinfer.state.folder import (
    finished_damage,
    foreign_message,
    record_lost,
    unreadable_figures,
)
from bulkinfer.state.manifest import read_manifest
from bulkinfer.state.records import JobRecord, SlurmSubmission, Summary, read_json


@dataclass(frozen=True)
class ShardState:
    shard: Shard
    state: str  # pending | running | stopped | done | failed
    rows_done: int
    rows_total: int | None
    tokens_per_second: float
    rows_per_second: float
    error: str | None = None
    work_left: float | None = None  # tokens still to run, prompts and new ones (estimated)


def read_state(layout: OutputLayout, shard: Shard) -> ShardState:
    """The state of one shard folder (or of a whole unsharded job folder). Running means a live
    process holds the folder's lock: a killed run shows as stopped at once."""
    if not layout.root.exists():
        return ShardState(shard, "pending", 0, None, 0.0, 0.0)
    job = JobRecord.read_if_there(layout.job_file)
    summary = Summary.read_if_there(layout.summary)
    if summary is not None and unreadable_figures(summary.to_dict()):
        summary = None  # an edited summary: the manifest says how far the job got
    damage = finished_damage(layout) if summary is not None and summary.complete else None
    if damage:  # outputs removed or cut short: the rerun writes them again (stopped, as run says)
        summary = None
    rows_total = None  # until the run has planned its rows (a run stopped while tokenizing)
    if job is not None and isinstance(job.rows, int) and not isinstance(job.rows, bool):
        rows_total = job.rows
    # a part removed by hand is not done: a rerun computes its rows again
    records = [r for r in read_manifest(layout) if (layout.parts_dir / r.file).is_file()]
    stats = [s for r in records for s in r.stats]
    seconds = sum(s["seconds"] for s in stats)
    tokens = sum(s["real_tokens"] + s["new_tokens"] for s in stats)
    rows_done = committed = sum(r.rows for r in records)
    if job is not None and isinstance(job.plan, dict):
        # rows refused as they were read (a null prompt) are settled when planned, though
        # written only with the outputs: not work left, nor in the ETA
        refused = job.plan.get("row_errors")
        rows_done += refused if isinstance(refused, int) and refused > 0 else 0
    if rows_total is not None:
        rows_done = min(rows_done, rows_total)  # never past the total, whatever the manifest holds
    work_left = _work_left(job, stats, committed)
    failed = read_json(layout.failed)
    # a job's folder without its record: an --overwrite emptying it (it holds the lock), or one
    # that was stopped, or job.json removed (then what run says of it)
    unrecorded = job is None and (layout.overwriting.exists() or record_lost(layout))
    if unrecorded and is_locked(layout):
        state = "running"
    elif unrecorded:
        state, failed = "stopped", {"error": foreign_message(layout)}
    elif job is None and layout.job_file.exists() and not is_locked(layout):
        state = "stopped"  # what run says of the folder, not a finished summary's "done"
        failed = {"error": f"{layout.job_file} is unreadable; rerun with --overwrite"}
    elif summary is not None:
        state, rows_done = "done", summary.rows_out
    elif failed:
        state = "failed"
    elif is_locked(layout):
        state = "running"
    elif job is not None:
        state = "stopped"
        if damage:
            failed = {"error": f"{damage}; rerun to write the outputs again"}
    else:
        state = "pending"
    return ShardState(
        shard=shard,
        state=state,
        rows_done=rows_done,
        rows_total=rows_total,
        tokens_per_second=tokens / seconds if seconds else 0.0,
        rows_per_second=committed / seconds if seconds else 0.0,
        error=(failed or {}).get("error"),
        work_left=work_left,
    )


def _work_left(job: JobRecord | None, stats: list[dict], committed: int) -> float | None:
    """Tokens the shard has still to run: its planned prompt tokens not yet committed, and as
    many new tokens a row left as the committed rows made on average. Counted in tokens, not
    rows: rows run longest first, so a row left costs less than a row done did."""
    plan = job.plan if job is not None and isinstance(job.plan, dict) else {}
    prompts, rows = plan.get("input_tokens"), plan.get("rows")
    if not isinstance(prompts, int) or not isinstance(rows, int) or not committed:
        return None
    rows -= plan.get("row_errors", 0) if isinstance(plan.get("row_errors"), int) else 0
    done = sum(s["real_tokens"] for s in stats)
    made = sum(s["new_tokens"] for s in stats)
    return max(0, prompts - done) + max(0, rows - committed) * made / committed


def shard_states(root: OutputLayout, count: int) -> list[ShardState]:
    return [read_state(root.shard(i, count), Shard(i, count)) for i in range(count)]


def shard_counts(root: OutputLayout) -> list[int]:
    """The shard counts of the shard folders present (more than one: stale folders)."""
    return sorted({count for _, count in root.shard_folders()})


def job_states(root: OutputLayout) -> list[ShardState]:
    """Every shard of the job in `root`, or the job itself when it is not sharded: the shards
    of an array `bulkinfer slurm` submitted, pending, before any of its tasks has started."""
    counts = shard_counts(root)
    if counts:
        return shard_states(root, counts[-1])
    submitted = SlurmSubmission.read_all(root.slurm_jobs)
    if submitted and not root.job_file.exists():
        return shard_states(root, submitted[-1].tasks)
    return [read_state(root, Shard(0, 1))]


def eta_seconds(states: list[ShardState]) -> float | None:
    """Time until the slowest unfinished shard is done, at the rates measured so far: its
    tokens left at its tokens/s (a shard that has committed nothing yet: rows left at the
    others' rows/s)."""
    rates = [s.rows_per_second for s in states if s.rows_per_second > 0]
    if not rates:
        return None
    typical = sum(rates) / len(rates)
    left = []
    for s in states:
        if s.state == "done":
            continue
        if s.work_left is not None and s.tokens_per_second > 0:
            left.append(s.work_left / s.tokens_per_second)
        elif s.rows_total is None:
            return None
        else:
            left.append(max(s.rows_total - s.rows_done, 0) / (s.rows_per_second or typical))
    return max(left, default=0.0)


def format_status(root: OutputLayout, states: list[ShardState], queue=None) -> str:
    """The table of `job_states(root)` and a line on the whole; an unsharded job is one row,
    named `job`, not a shard 0/1. `queue`: Slurm's word on each shard's array task, by index
    (executors/slurm.task_states), where squeue could say."""
    sharded = len(states) > 1 or bool(shard_counts(root))
    queue = queue or {}
    lines = [f"{'shard' if sharded else '':>11}  {'state':<8}{'rows done':>22}{'tokens/s':>12}"]
    for s in states:
        total = f"{s.rows_total:,}" if s.rows_total is not None else "?"
        name = str(s.shard) if sharded else "job"
        line = f"{name:>11}  {s.state:<8}{f'{s.rows_done:,} / {total}':>22}{s.tokens_per_second:>12,.0f}"
        if s.error:
            line += f"  {s.error}"
        note = queue_note(root, s, queue.get(s.shard.index))
        if note:
            line += f"  ({note})"
        lines.append(line)
    done = sum(s.state == "done" for s in states)
    eta = eta_seconds(states)
    eta_text = "done" if done == len(states) else ("unknown" if eta is None else _clock(eta))
    if done < len(states) and not any(s.state == "running" for s in states):
        # no run is under way to end (the folder cannot tell a task waiting in a queue)
        eta_text = "none: " + ("no shard is running now" if len(states) > 1 else "not running now")
        waiting = sum(task.queued for task in queue.values())
        if waiting:
            eta_text += f"; {waiting:,} of its Slurm tasks waiting in the queue"
    merged = outputs_merged(root, states)
    if not sharded:
        lines.append(f"job {states[0].state}" + ("" if done else f"; ETA {eta_text}"))
        return "\n".join(lines)
    line = f"{done:,} of {len(states):,} shard{'s' * (len(states) > 1)} done; ETA {eta_text}"
    if merged:
        line += "; outputs merged"
    elif done == len(states):  # the last shard's merge is under way, or was stopped
        line += (
            "; merging now"
            if lock_held(root.merge_lock)
            else (
                f"; outputs not merged: bulkinfer merge {shlex.quote(str(root.root))} (or a "
                "rerun of any shard)"
            )
        )
    lines.append(line)
    return "\n".join(lines)


def outputs_merged(root: OutputLayout, states: list[ShardState]) -> bool:
    """Whether OUT/outputs is the whole merge of these shards, all done: not of another split's
    or an unsharded run's, nor of a shard run again since, nor removed or damaged since."""
    if not states or any(s.state != "done" for s in states):
        return False
    if (read_json(root.summary) or {}).get("shards") != len(states):
        return False
    if not all(
        _newer(root.summary, root.shard(s.shard.index, s.shard.count).summary) for s in states
    ):
        return False
    return root.outputs_dir.exists() and finished_damage(root) is None


def queue_note(root: OutputLayout, state: ShardState, task) -> str | None:
    """What Slurm says of a shard that is not running or done: its task waits in the queue,
    is starting, or has ended without finishing it (then how to resubmit it)."""
    if task is None or state.state in ("running", "done"):
        return None
    who = "its Slurm task" if task.name.startswith("?") else f"Slurm task {task.name}"
    if task.queued:
        return f"{who} waiting in the queue" + (f": {task.reason}" if task.reason else "")
    if task.state in ("RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED", "STOPPED"):
        return f"{who} is {task.state.lower()}"
    ended = f"ended {task.state.lower()}" if task.state else "no longer in the queue"
    log = root.slurm_logs / f"{task.name}.log"
    seen = f"; its log: {log}" if log.is_file() else ""
    return (
        f"{who} {ended}{seen}; resubmit it with: "
        f"sbatch --array={state.shard.index} {shlex.quote(str(root.slurm_script))}"
    )


def _newer(path, than) -> bool:
    try:
        return path.stat().st_mtime_ns >= than.stat().st_mtime_ns
    except OSError:
        return False


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"

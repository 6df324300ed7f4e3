"""Where a job stands, read from its output folder alone (works on a login node with no GPU)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from bulkinfer.sharding import Shard, shard_folders

RUNNING_WITHIN_SECONDS = 120.0


@dataclass(frozen=True)
class ShardState:
    shard: Shard
    state: str  # pending | running | done | failed
    rows_done: int
    rows_total: int | None
    tokens_per_second: float
    rows_per_second: float
    error: str | None = None


def read_state(folder: Path, shard: Shard) -> ShardState:
    """The state of one shard folder (or of a whole unsharded job folder)."""
    if not folder.exists():
        return ShardState(shard, "pending", 0, None, 0.0, 0.0)
    job = read_json(folder / "job.json") or {}
    summary = read_json(folder / "summary.json") or {}
    records = manifest_records(folder / "checkpoint" / "manifest.jsonl")
    stats = [s for r in records for s in r.get("stats", [])]
    seconds = sum(s["seconds"] for s in stats)
    tokens = sum(s["real_tokens"] + s["new_tokens"] for s in stats)
    rows_done = sum(r["rows"] for r in records)
    failed = read_json(folder / "failed.json")
    if summary.get("complete"):
        state, rows_done = "done", summary.get("rows_out", rows_done)
    elif failed:
        state = "failed"
    elif _recent(folder / "heartbeat") or _recent(folder / "job.json"):
        state = "running"
    else:
        state = "pending"
    return ShardState(
        shard=shard,
        state=state,
        rows_done=rows_done,
        rows_total=job.get("rows"),
        tokens_per_second=tokens / seconds if seconds else 0.0,
        rows_per_second=rows_done / seconds if seconds else 0.0,
        error=(failed or {}).get("error"),
    )


def shard_states(root: Path, count: int) -> list[ShardState]:
    return [read_state(Shard(i, count).folder(root), Shard(i, count)) for i in range(count)]


def job_states(root: Path) -> list[ShardState]:
    """Every shard of the job in `root`, or the job itself when it is not sharded."""
    folders = shard_folders(root)
    counts = sorted({s.count for s in folders})
    if not counts:
        return [read_state(root, Shard(0, 1))]
    return shard_states(root, counts[-1])


def eta_seconds(states: list[ShardState]) -> float | None:
    """Time until the slowest unfinished shard is done, at the rates measured so far."""
    rates = [s.rows_per_second for s in states if s.rows_per_second > 0]
    if not rates:
        return None
    typical = sum(rates) / len(rates)
    left = []
    for s in states:
        if s.state == "done":
            continue
        if s.rows_total is None:
            return None
        left.append((s.rows_total - s.rows_done) / (s.rows_per_second or typical))
    return max(left, default=0.0)


def format_status(root: Path, states: list[ShardState]) -> str:
    lines = [f"{'shard':>11}  {'state':<8}{'rows done':>22}{'tokens/s':>12}"]
    for s in states:
        total = f"{s.rows_total:,}" if s.rows_total is not None else "?"
        line = f"{str(s.shard):>11}  {s.state:<8}{f'{s.rows_done:,} / {total}':>22}{s.tokens_per_second:>12,.0f}"
        if s.error:
            line += f"  {s.error}"
        lines.append(line)
    done = sum(s.state == "done" for s in states)
    eta = eta_seconds(states)
    eta_text = "done" if done == len(states) else ("unknown" if eta is None else _clock(eta))
    merged = (root / "summary.json").exists() and (root / "outputs").exists()
    lines.append(
        f"{done} of {len(states)} shards done; ETA {eta_text}"
        + ("; outputs merged" if merged and len(states) > 1 else "")
    )
    return "\n".join(lines)


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _recent(path: Path) -> bool:
    return path.exists() and time.time() - path.stat().st_mtime < RUNNING_WITHIN_SECONDS


def read_json(path: Path) -> dict | None:
    """A JSON file's object, or None if it is missing or unreadable (being written, say)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def manifest_records(path: Path) -> list[dict]:
    """A manifest's records as plain dicts, skipping a torn last line."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records

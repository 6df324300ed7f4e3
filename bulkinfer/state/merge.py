"""Merging shards into the job's one dataset: every input row once, in input order.

Refuses, naming the shards, while any shard is unfinished or failed: a merge never silently
drops a shard.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bulkinfer.errors import UserError
from bulkinfer.io.atomic import write_json_atomic, write_parquet_atomic
from bulkinfer.io.outputs import write_sorted_outputs
from bulkinfer.sharding import shard_folders
from bulkinfer.state.checkpoint import OutputLayout
from bulkinfer.state.status import shard_states

ADDED = (
    "rows_in",
    "rows_out",
    "batches",
    "input_tokens",
    "output_tokens",
    "padded_tokens",
    "model_seconds",
    "oom_splits",
)


def merge_shards(root: Path) -> dict:
    """Write OUT/outputs/, OUT/stats/batches.parquet and OUT/summary.json from the shards.

    Shards finishing together may both try: a lock file lets one merge and the other see it."""
    import fcntl

    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".merge.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _merge_locked(root)


def _merge_locked(root: Path) -> dict:
    folders = shard_folders(root)
    counts = sorted({s.count for s in folders})
    if not counts:
        raise UserError(f"{root}: no shards to merge (bulkinfer run --shard I/N writes them)")
    if len(counts) > 1:
        raise UserError(
            f"{root}: shard folders of different counts ({counts}); remove the stale ones"
        )
    count = counts[0]
    states = shard_states(root, count)
    unfinished = [s for s in states if s.state != "done"]
    if unfinished:
        names = ", ".join(f"{s.shard} ({s.state})" for s in unfinished)
        raise UserError(
            f"{root}: cannot merge, {len(unfinished)} of {count} shards are not done: {names}"
        )
    jobs = [json.loads((s.shard.folder(root) / "job.json").read_text()) for s in states]
    if (
        len(
            {
                json.dumps(
                    {k: v for k, v in j["fingerprint"].items() if k != "shard"}, sort_keys=True
                )
                for j in jobs
            }
        )
        > 1
    ):
        raise UserError(f"{root}: the shards were run with different specs, models or inputs")
    total = sum(j["rows"] for j in jobs)
    layout = OutputLayout(root)
    tables = (t for s in states for t in _read_outputs(s.shard.folder(root)))
    write_sorted_outputs(layout, tables, np.arange(total))
    if jobs[0].get("openai_responses"):
        from bulkinfer.io.openai_batch import write_responses_file

        write_responses_file(layout, jobs[0]["spec"]["model"]["path"])
    _merge_stats(root, states)
    summary = _merge_summaries(
        [json.loads((s.shard.folder(root) / "summary.json").read_text()) for s in states]
    )
    write_json_atomic(layout.summary, summary)
    return summary


def _read_outputs(folder: Path) -> Iterator[pa.Table]:
    """A shard's outputs, a row group at a time."""
    for path in sorted((folder / "outputs").glob("*.parquet")):
        parquet = pq.ParquetFile(path)
        for k in range(parquet.num_row_groups):
            yield parquet.read_row_group(k)


def _merge_stats(root: Path, states) -> None:
    tables = []
    for s in states:
        path = s.shard.folder(root) / "stats" / "batches.parquet"
        table = pq.read_table(path)
        tables.append(
            table.append_column("shard", pa.array([s.shard.index] * table.num_rows, pa.int32()))
        )
    (root / "stats").mkdir(exist_ok=True)
    write_parquet_atomic(root / "stats" / "batches.parquet", pa.concat_tables(tables))


def _merge_summaries(summaries: list[dict]) -> dict:
    """Totals add up; wall time is the slowest shard's, since shards run side by side."""
    merged = {key: sum(s.get(key, 0) for s in summaries) for key in ADDED}
    statuses: dict[str, int] = {}
    for s in summaries:
        for k, v in s["rows_by_status"].items():
            statuses[k] = statuses.get(k, 0) + v
    wall = max(s["wall_seconds"] for s in summaries)
    slowest, fastest = (
        max(s["wall_seconds"] for s in summaries),
        min(s["wall_seconds"] for s in summaries),
    )
    padded = merged["padded_tokens"]
    merged.update(
        complete=True,
        shards=len(summaries),
        task=summaries[0].get("task"),
        device=sorted({s.get("device", "?") for s in summaries}),
        rows_by_status=statuses,
        wall_seconds=wall,
        shard_wall_seconds={"slowest": slowest, "fastest": fastest},
        padding_fraction=0.0 if padded == 0 else 1 - merged["input_tokens"] / padded,
        rows_per_second=merged["rows_out"] / wall if wall else 0.0,
        input_tokens_per_second=merged["input_tokens"] / wall if wall else 0.0,
        output_tokens_per_second=merged["output_tokens"] / wall if wall else 0.0,
    )
    return merged

"""Merging shards into the job's one dataset: every input row once, in input order.

Refuses, naming the shards, while any shard is unfinished or failed: a merge never silently
drops a shard.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bulkinfer.errors import UserError
from bulkinfer.io.atomic import write_parquet_atomic
from bulkinfer.io.layout import OutputLayout
from bulkinfer.io.outputs import write_sorted_outputs
from bulkinfer.state.fingerprint import RunIdentity
from bulkinfer.state.folder import differences, finished_damage
from bulkinfer.state.records import SUMMARY_TOTALS, JobRecord, Summary
from bulkinfer.state.status import outputs_merged, shard_counts, shard_states

# totals only some jobs report (structured output, shared prefixes, the fast engine's
# generation time; its per-step averages are left to each shard's own summary)
ADDED_WHERE_PRESENT = (
    "constrained_cut_short",
    "shared_prefix_tokens",
    "prefill_seconds",
    "prefill_tokens",
    "decode_seconds",
    "decode_steps",
    "graph_captures",
    "capture_seconds",
)


def merge_shards(root: OutputLayout, token_bytes_for=None) -> Summary | None:
    """Write OUT/outputs/, OUT/stats/batches.parquet and OUT/summary.json from the shards;
    None where they are merged already (`outputs_merged`), nothing written. `token_bytes_for
    (spec)`: the job's token id -> bytes, for an OpenAI job's responses.

    Shards finishing together may both try: a lock file lets one merge and the other see it."""
    import fcntl

    if not root.root.is_dir():
        raise UserError(f"{root.root}: no such output folder")
    if not shard_counts(root):
        raise UserError(f"{root.root}: no shards to merge (bulkinfer run --shard I/N writes them)")
    with open(root.merge_lock, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _merge_locked(root, token_bytes_for)


def _merge_locked(root: OutputLayout, token_bytes_for) -> Summary:
    root.remove_leftovers()  # a merge killed mid-write left them; the lock is ours
    counts = shard_counts(root)  # some: merge_shards checked before taking the lock
    if len(counts) > 1:
        raise UserError(
            f"{root.root}: shard folders of different counts ({counts}); remove the stale ones"
        )
    count = counts[0]
    states = shard_states(root, count)
    if outputs_merged(root, states):  # by a sibling that held the lock first, or long ago
        return None
    unfinished = [s for s in states if s.state != "done"]
    if unfinished:
        names = ", ".join(f"{s.shard} ({s.state})" for s in unfinished)
        raise UserError(
            f"{root.root}: cannot merge, {len(unfinished)} of {count} shards "
            f"{'is' if len(unfinished) == 1 else 'are'} not done: {names}"
        )
    shards = [root.shard(s.shard.index, count) for s in states]
    jobs = [JobRecord.read(shard.job_file) for shard in shards]
    first = RunIdentity(jobs[0].fingerprint, jobs[0].spec, jobs[0].resolved or {})
    unlike = [
        f"{state.shard} ({', '.join(_parts_differing(job, first)) or 'auto settings'}): {differs}"
        for state, job in zip(states[1:], jobs[1:], strict=True)
        if (differs := differences(job, first))
    ]
    if unlike:
        raise UserError(
            f"{root.root}: the shards were run with different specs, models or inputs, against "
            f"shard {states[0].shard}: {'; '.join(unlike)}; rerun those with the same job "
            "(--overwrite)"
        )
    summaries = [
        _checked_shard(root, shard, job, state.shard)
        for shard, job, state in zip(shards, jobs, states, strict=True)
    ]
    total = sum(j.rows for j in jobs)
    root.job_file.unlink(missing_ok=True)  # an unsharded run's record (its --overwrite)
    schema = _outputs_schema(shards)
    tables = (_aligned(t, schema) for shard in shards for t in _read_outputs(shard))
    write_sorted_outputs(root, tables, np.arange(total))
    if jobs[0].openai_responses:
        from bulkinfer.io.openai_batch import write_responses_file

        spec = jobs[0].spec
        given = (lambda: token_bytes_for(spec)) if token_bytes_for else None
        write_responses_file(root, spec["model"]["path"], given)
    _merge_stats(root, shards)
    summary = merge_summaries(summaries)
    summary.write(root.summary)
    return summary


def _parts_differing(job: JobRecord, first: RunIdentity) -> list[str]:
    return [k for k in ("model", "spec", "input") if job.fingerprint.get(k) != first.prints[k]]


def _checked_shard(root: OutputLayout, shard: OutputLayout, job: JobRecord, name) -> Summary:
    """A done shard's summary, once its record, summary, outputs and batch stats are whole:
    all read before the merge writes anything (a shard whose outputs were removed, cut short
    or corrupted, or whose summary was edited, stopped the merge half-way with a traceback)."""
    problem = finished_damage(shard)
    summary = Summary.read_if_there(shard.summary)
    if isinstance(job.rows, bool) or not isinstance(job.rows, int):
        problem = f"{shard.job_file.name} has no row count"
    elif problem is None and summary.rows_out != job.rows:
        problem = f"{shard.outputs_dir.name}/ holds rows of another split"
    if problem:
        raise UserError(
            f"{root.root}: cannot merge, shard {name}: {problem}; rerun that shard "
            f"(bulkinfer run JOB --shard {name}) to write it again from its checkpoint"
        )
    return summary


def _outputs_schema(shards: list[OutputLayout]) -> pa.Schema:
    """The columns of every shard's outputs: shards a version of bulkinfer finished before
    another version finished the rest lack the columns added since (top_logprobs, say)."""
    files = [path for shard in shards for path in sorted(shard.outputs_dir.glob("*.parquet"))]
    return pa.unify_schemas([pq.read_schema(f) for f in files], promote_options="permissive")


def _aligned(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """`table` with `schema`'s columns in its order, null where it has no such column."""
    columns = [
        table.column(f.name).cast(f.type)
        if f.name in table.column_names
        else pa.nulls(table.num_rows, f.type)
        for f in schema
    ]
    return pa.Table.from_arrays(columns, schema=schema)


def _read_outputs(shard: OutputLayout) -> Iterator[pa.Table]:
    """A shard's outputs, a row group at a time."""
    for path in sorted(shard.outputs_dir.glob("*.parquet")):
        parquet = pq.ParquetFile(path)
        for k in range(parquet.num_row_groups):
            yield parquet.read_row_group(k)


def _merge_stats(root: OutputLayout, shards: list[OutputLayout]) -> None:
    tables = []
    for index, shard in enumerate(shards):
        table = pq.read_table(shard.batch_stats)
        tables.append(table.append_column("shard", pa.array([index] * table.num_rows, pa.int32())))
    root.stats_dir.mkdir(exist_ok=True)
    # shards of an older version lack the stats added since: null there
    write_parquet_atomic(root.batch_stats, pa.concat_tables(tables, promote_options="default"))


def merge_summaries(shards: list[Summary]) -> Summary:
    """Totals add up; wall time is the slowest shard's, since shards run side by side; the
    model's share of the wall and the seconds outside it are of all shards' seconds."""
    summaries = [s.to_dict() for s in shards]
    merged = {key: sum(s.get(key, 0) for s in summaries) for key in SUMMARY_TOTALS}
    statuses: dict[str, int] = {}
    for s in summaries:
        for k, v in s["rows_by_status"].items():
            statuses[k] = statuses.get(k, 0) + v
    wall = max(s["wall_seconds"] for s in summaries)
    slowest, fastest = (
        max(s["wall_seconds"] for s in summaries),
        min(s["wall_seconds"] for s in summaries),
    )
    for key in ADDED_WHERE_PRESENT:
        values = [s[key] for s in summaries if key in s]
        if values:
            merged[key] = sum(values)
    padded = merged["padded_tokens"]
    shard_walls = sum(s["wall_seconds"] for s in summaries)
    if shard_walls:  # shards run side by side: their model and wall seconds each add up
        merged["model_share_of_wall"] = merged["model_seconds"] / shard_walls
        merged["seconds_outside_model"] = max(0.0, shard_walls - merged["model_seconds"])
    # start-up as the slowest shard paid it (they start side by side)
    for key in (
        "first_batch_seconds",
        "setup_seconds",
        "load_seconds",
        "prepare_seconds",
        "imports_seconds",
    ):
        values = [s[key] for s in summaries if isinstance(s.get(key), int | float)]
        if values:
            merged[key] = max(values)
    for key in ("engine", "quantization", "kv_cache_dtype"):  # one job's settings: one value
        values = sorted({str(s[key]) for s in summaries if s.get(key)})
        if values:
            merged[key] = ", ".join(values)
    file_order = [_padded_file_order(s) for s in summaries]
    if file_order and None not in file_order:  # (no batch ran: none, as one job says it)
        padded_in_order = sum(file_order)
        fraction = 1 - merged["input_tokens"] / padded_in_order if padded_in_order else 0.0
        merged["padding_fraction_file_order"] = fraction
    merged.update(
        complete=True,
        shards=len(summaries),
        task=summaries[0].get("task"),
        device=", ".join(sorted({str(s.get("device", "?")) for s in summaries})),
        rows_by_status=statuses,
        wall_seconds=wall,
        shard_wall_seconds={"slowest": slowest, "fastest": fastest},
        padding_fraction=0.0 if padded == 0 else 1 - merged["input_tokens"] / padded,
        rows_per_second=merged["rows_out"] / wall if wall else 0.0,
        input_tokens_per_second=merged["input_tokens"] / wall if wall else 0.0,
        output_tokens_per_second=merged["output_tokens"] / wall if wall else 0.0,
    )
    return Summary.from_dict(merged)


def _padded_file_order(summary: dict) -> float | None:
    """A shard's padded tokens had its batches kept in file order (from its fraction)."""
    fraction = summary.get("padding_fraction_file_order")
    if fraction is None or fraction >= 1:
        return None
    return summary["input_tokens"] / (1 - fraction)

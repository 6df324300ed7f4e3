"""What a job folder says about its run, read from files alone: finished, half-done or sharded.

Everything here is what exists: a job still running has no summary.json, so its totals come from
the committed parts' batch stats; a shard not started yet has no folder. Nothing is recomputed
from the input and no model is loaded, so a report works from a login node in seconds.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from bulkinfer.errors import OutputFolderError, UserError, first_line
from bulkinfer.io.layout import OutputLayout
from bulkinfer.io.lock import is_locked
from bulkinfer.state.folder import finished_damage
from bulkinfer.state.manifest import read_manifest
from bulkinfer.state.records import JobRecord, Summary
from bulkinfer.state.status import ShardState, job_states

TOP_ERRORS = 10


@dataclass(frozen=True)
class ErrorGroup:
    """Error messages that differ only in their numbers, counted together."""

    count: int
    example: str


@dataclass
class JobFacts:
    root: Path
    state: str  # done | running | incomplete (stopped, or shards not started) | failed | pending
    spec: dict
    device: str | None
    summary: dict | None  # summary.json of a complete job, else None
    rows_total: int | None
    rows_done: int
    rows_by_status: dict[str, int]
    errors: list[ErrorGroup]
    batches: list[dict]  # per-batch stats; `shard` and `run` added; `ended_at` may be None
    batches_planned: int | None
    plan: dict | None  # the plan facts summed over shards (histogram, padded tokens)
    chat_template: str | None  # the prompts it rendered: all, some, none; None: not known
    # (start, end) of the job on the batches' `ended_at` clock, start-up and finishing included;
    # None in folders without batch timestamps
    timeline: tuple[float, float] | None = None
    shards: list[ShardState] = field(default_factory=list)
    # per folder (the job's, or each shard's): the seconds its runs took, start-up included and
    # the gaps between a stopped run and its resumption left out
    run_seconds: list[float] = field(default_factory=list)

    @property
    def sharded(self) -> bool:
        return bool(self.shards)

    @property
    def has_timestamps(self) -> bool:
        return bool(self.batches) and all(b.get("ended_at") for b in self.batches)


def read_job(root: Path) -> JobFacts:
    """The facts of the job in `root`; a folder that is no bulkinfer job is a one-line error."""
    if not root.is_dir():
        raise UserError(f"{root}: no such output folder")
    layout = OutputLayout(root)
    shards = layout.shard_folders()
    if not layout.job_file.is_file() and not shards:
        if is_locked(layout):  # a run between taking the folder and recording its job
            raise UserError(
                f"{root}: the job is starting (loading the model, reading the input) and has "
                "recorded nothing to report yet; run `bulkinfer report` again in a moment"
            )
        if layout.lock.is_file():  # a run stopped or refused before it recorded its job
            raise UserError(
                f"{root}: no run of a job has recorded anything here yet (one was stopped or "
                "refused before it recorded its job); nothing to report"
            )
        raise UserError(
            f"{root}: not a bulkinfer job folder (no job.json or shards/); "
            "give the output folder of a job"
        )
    states = job_states(layout) if shards else []
    folders = [layout.shard(s.shard.index, s.shard.count) for s in states] if shards else [layout]
    jobs = [_job(f) for f in folders]
    known = [j for j in jobs if j]
    summary = _summary(layout)
    batches = _batches(layout, folders, summary)
    totals = [(j or {}).get("rows") for j in jobs]
    spec = (known[0].get("spec") or {}) if known else {}
    rows_done, by_status, errors = _rows(folders, [s.state for s in states] or [None])
    if summary:
        by_status = dict(summary["rows_by_status"])
        rows_done = summary["rows_out"]
        totals = [summary["rows_in"]]
    return JobFacts(
        root=root,
        state=_overall_state(root, summary, states),
        spec=spec,
        device=_device(summary, known),
        summary=summary,
        rows_total=sum(totals) if totals and None not in totals else None,
        rows_done=rows_done,
        rows_by_status=by_status,
        errors=errors,
        batches=batches,
        batches_planned=_sum_plan(known, "batches", len(jobs)),
        plan=_plan(known, len(jobs)) or _plan_from_results(folders),
        chat_template=_chat_template(known, spec),
        timeline=_timeline(folders),
        shards=states,
        run_seconds=[sum(end - start for start, end in _run_spans(f)) for f in folders],
    )


def _overall_state(root: Path, summary: dict | None, states: list[ShardState]) -> str:
    if summary:
        return "done"
    if not states:
        from bulkinfer.sharding import Shard
        from bulkinfer.state.status import read_state

        states = [read_state(OutputLayout(root), Shard(0, 1))]
    kinds = {s.state for s in states}
    if "failed" in kinds:
        return "failed"
    if "running" in kinds:
        return "running"
    if kinds == {"pending"} and not any(s.rows_done for s in states):
        return "pending"
    return "incomplete"


def _device(summary: dict | None, jobs: list[dict]) -> str | None:
    if summary and summary.get("device"):
        device = summary["device"]
        return ", ".join(device) if isinstance(device, list) else str(device)
    devices = sorted({j["device"] for j in jobs if j.get("device")})
    return ", ".join(devices) or None


def _job(folder: OutputLayout) -> dict | None:
    job = JobRecord.read_if_there(folder.job_file)
    return job.to_dict() if job else None


def _summary(folder: OutputLayout) -> dict | None:
    """summary.json of a complete job, else None: also where it, the outputs or the batch stats
    are damaged (edited, removed, cut short), which `status` and a rerun take for a job to
    finish again; the report then reads the checkpoint, as for a job still running."""
    summary = Summary.read_if_there(folder.summary)
    if summary is None or finished_damage(folder):
        return None
    return summary.to_dict()


def _batches(root: OutputLayout, folders: list[OutputLayout], summary: dict | None) -> list[dict]:
    """Per-batch stats: the final stats file of a finished job, else the manifests' records."""
    merged = root.batch_stats
    if summary and merged.is_file():
        rows = _read(merged).to_pylist()
        for r in rows:
            r.setdefault("shard", 0)
        return rows
    found = []
    for index, folder in enumerate(folders):
        for record in read_manifest(folder):
            for s in record.stats:
                found.append({**s, "run": record.run, "shard": index})
    return found


def _timeline(folders: list[OutputLayout]) -> tuple[float, float] | None:
    """From the first run's start to the last run's end, on the clock of the batches'
    `ended_at` (shards side by side, resumed runs with the gaps between them)."""
    spans = [span for folder in folders for span in _run_spans(folder)]
    if not spans:
        return None
    return min(start for start, _ in spans), max(end for _, end in spans)


def _run_spans(folder: OutputLayout) -> list[tuple[float, float]]:
    """(start, end) of each run that committed parts in `folder`. A part records the seconds
    since its run started (`elapsed`), taken just after its last batch ended, so the run started
    that long before; it ran at least until its last part. A finished folder's last run ends
    where its summary's wall time, less the earlier runs', says (the outputs' assembly too)."""
    starts: dict[str, float] = {}
    lengths: dict[str, float] = {}
    for record in read_manifest(folder):
        ended = [s["ended_at"] for s in record.stats if s.get("ended_at")]
        if not ended:
            continue
        start = max(ended) - record.elapsed
        starts[record.run] = max(starts.get(record.run, start), start)
        lengths[record.run] = max(lengths.get(record.run, 0.0), record.elapsed)
    summary = _summary(folder)
    if summary and starts:
        last = max(starts, key=starts.__getitem__)
        earlier = sum(seconds for run, seconds in lengths.items() if run != last)
        lengths[last] = max(lengths[last], summary["wall_seconds"] - earlier)
    return [(starts[run], starts[run] + lengths[run]) for run in starts]


def _rows(
    folders: list[OutputLayout], states: list[str | None]
) -> tuple[int, dict, list[ErrorGroup]]:
    """Rows done, by status, and the most common errors: from the outputs of finished folders,
    from the committed parts of the others."""
    messages: Counter[str] = Counter()
    examples: dict[str, str] = {}
    done = 0
    for folder in folders:
        for path in _result_files(folder):
            column = _read(path, ["error"]).column("error")
            done += len(column)
            for message, count in Counter(column.drop_null().to_pylist()).items():
                key = re.sub(r"\d+", "N", message)
                messages[key] += count
                examples.setdefault(key, message)
    failed = sum(messages.values())
    groups = [ErrorGroup(c, examples[k]) for k, c in messages.most_common(TOP_ERRORS)]
    return done, {"ok": done - failed, "error": failed}, groups


def _read(path: Path, columns: list[str] | None = None, schema_only: bool = False):
    """A Parquet file of the folder (its schema only: `schema_only`), or one line saying it is
    damaged and how to repair it."""
    try:
        return pq.read_schema(path) if schema_only else pq.read_table(path, columns=columns)
    except (OSError, pa.ArrowException) as exc:
        raise OutputFolderError(
            f"{path}: unreadable ({first_line(exc, 120)}); rerun the job (`bulkinfer run` "
            "with its spec) to write it again from the committed parts"
        ) from None


def _result_files(folder: OutputLayout) -> list[Path]:
    outputs = sorted(folder.outputs_dir.glob("*.parquet"))
    if _summary(folder) and outputs:
        return outputs
    parts = [folder.parts_dir / r.file for r in read_manifest(folder)]
    return [path for path in parts if path.is_file()]


def _plan(jobs: list[dict], count: int) -> dict | None:
    """Plan facts added up over the shards that have planned (None when some have not)."""
    plans = [j.get("plan") for j in jobs]
    if len(plans) != count or not plans or None in plans:
        return None
    keys = ("rows", "row_errors", "input_tokens", "padded_tokens", "padded_tokens_file_order")
    total = {k: sum(p[k] for p in plans) for k in keys}
    histogram: Counter[tuple[int, int]] = Counter()
    for p in plans:
        for low, high, n in p["length_histogram"]:
            histogram[(low, high)] += n
    total["length_histogram"] = [(lo, hi, n) for (lo, hi), n in sorted(histogram.items())]
    return total


def _chat_template(jobs: list[dict], spec: dict) -> str | None:
    """Whether all, some or none of the prompts went through the chat template, as planning
    recorded it. Folders planned before it was recorded: `all` where the spec forces the
    template, else not known (message prompts are always rendered by it, plain text prompts by
    the task and the tokenizer)."""
    recorded = {(j.get("plan") or {}).get("chat_template") for j in jobs} - {None}
    if recorded:
        return recorded.pop() if len(recorded) == 1 else "some"
    return "all" if (spec.get("task") or {}).get("chat_template") == "always" else None


def _plan_from_results(folders: list[OutputLayout]) -> dict | None:
    """For folders written before job.json kept the plan: the prompt lengths of the rows that
    ran, where the task writes them (generate's `prompt_tokens`)."""
    import numpy as np

    from bulkinfer.planner import length_counts

    lengths = []
    for folder in folders:
        for path in _result_files(folder):
            if "prompt_tokens" in _read(path, schema_only=True).names:
                column = _read(path, ["prompt_tokens"]).column("prompt_tokens")
                lengths.append(column.drop_null().to_numpy())
    if not lengths:
        return None
    return {"length_histogram": length_counts(np.concatenate(lengths))}


def _sum_plan(jobs: list[dict], key: str, count: int) -> int | None:
    values = [(j.get("plan") or {}).get(key) for j in jobs]
    if len(values) != count or None in values:
        return None
    return sum(values)

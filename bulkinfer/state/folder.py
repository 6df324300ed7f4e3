"""Start, resume or refuse: what a run finds in its output folder and what it records there."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import shutil
import typing
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from bulkinfer import faults
from bulkinfer.errors import OutputFolderError, first_line
from bulkinfer.io.layout import OutputLayout
from bulkinfer.io.lock import holder_text, in_use, is_locked
from bulkinfer.observe.progress import log
from bulkinfer.spec.schema import GENERATE_KEYS
from bulkinfer.state.fingerprint import NOT_IN_FINGERPRINT, RESOLVED_KEYS, RunIdentity
from bulkinfer.state.records import SUMMARY_TOTALS, JobRecord, read_json


@dataclass
class JobFolder:
    """The output folder's state when a run starts."""

    layout: OutputLayout
    job: JobRecord
    finished: bool
    resumed: bool


def open_job_folder(layout: OutputLayout, run: RunIdentity, overwrite: bool) -> JobFolder:
    """Start, resume or refuse: the folder must be empty, ours for this very job, or overwritten."""
    root = layout.root
    refuse_foreign(layout, overwrite, holding_lock=True)
    if not layout.shards_dir.is_dir():  # (a sharded job's top is written by its merges)
        layout.remove_leftovers()  # the lock is ours: no write of ours is under way
    # --overwrite replaces whatever record is there, an unreadable one too (as its error says)
    existing = None if overwrite else JobRecord.read(layout.job_file)
    replace = existing is not None and not overwrite and not has_results(layout)
    overwrite = overwrite or replace  # a job that never committed a row loses nothing
    if existing is not None and not overwrite:
        differs = differences(existing, run)
        if differs:
            raise OutputFolderError(
                f"{root} holds another job's outputs ({differs}); use another --output or "
                "pass --overwrite to start afresh (with the folder's own settings, model and "
                "input the run resumes it)"
            )
        finished = bool((read_json(layout.summary) or {}).get("complete"))
        problem = finished_damage(layout) if finished else None
        if problem:
            missing = problem.endswith(" is missing")
            where = f"{problem} from" if missing else f"{layout.root}: {problem} in"
            log(
                f"{where} a finished job: writing its outputs and summary again from the "
                "committed parts",
                event="resume",
                level="warning",
            )
            finished = False
        return JobFolder(layout, existing, finished=finished, resumed=True)
    if existing is None and layout.shards_dir.is_dir() and not overwrite:
        raise OutputFolderError(
            f"{root} holds a sharded run of a job; run it with --shard I/N (or from its Slurm "
            "array), see it with `bulkinfer status`, or pass --overwrite to start afresh"
        )
    if overwrite:
        refuse_odd_removals(layout)
        refuse_theirs(layout)
        # --overwrite takes the job record first, renamed to the mark of a folder it empties:
        # killed midway, the folder asks for --overwrite again. A job without results keeps
        # its record to the last: killed midway, it is still a job without results, which the
        # next run replaces.
        ours = layout.ours()
        if replace:
            ours.append(ours.pop(ours.index(layout.job_file)))
        elif layout.job_file.exists():
            os.replace(layout.job_file, layout.overwriting)
        elif record_lost(layout):  # the same mark, for a folder whose record was removed
            layout.overwriting.write_text("{}\n")
        for path in ours:
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
            faults.checkpoint("overwrite_removed")
    job = JobRecord(fingerprint=run.prints, spec=run.spec, resolved=run.resolved)
    save_job(layout, job)  # first, so a folder we created is always recognisably ours
    return JobFolder(layout, job, finished=False, resumed=False)


def refuse_unsharded(root: OutputLayout, overwrite: bool, holding_lock: bool = False) -> None:
    """A shard's run (or a `--gpus` launcher's) where a job ran without shards: its merge would
    put another run's outputs under that job's record, so it is refused as any other job is,
    unless --overwrite (refused while a run of that job is live); then that job is retired:
    its record (so the other shards run without --overwrite), its summary (which `status` and
    `report` read as the split job's until the merge) and its checkpoint. Its outputs stay
    until the merge replaces them."""
    if not root.job_file.exists():
        return
    if not overwrite:
        raise OutputFolderError(
            f"{root.root} holds a job run without shards; run it the same way, use another "
            "--output, or pass --overwrite"
        )
    if not holding_lock and is_locked(root):
        raise in_use(root)
    root.job_file.unlink(missing_ok=True)
    root.summary.unlink(missing_ok=True)
    shutil.rmtree(root.checkpoint_dir, ignore_errors=True)


def other_splits(root: OutputLayout, count: int) -> list[int]:
    """The shard counts of shard folders present other than `count`."""
    return sorted({n for _, n in root.shard_folders()} - {count})


def refuse_other_counts(
    root: OutputLayout, count: int, overwrite: bool, flag: str = "--shard"
) -> None:
    """A shard of a job split in N where shards of another split are: refused before any work
    (their merge could never run), unless --overwrite; then those shards are removed (refused
    while one of them runs) with the summary of their merge, which `status` and `report` would
    read as this split's (the merge of this split writes the outputs again)."""
    others = other_splits(root, count)
    if others and not overwrite:
        raise OutputFolderError(
            f"{root.root} holds shards of a run split into {others[0]}, not {count}; run it with "
            f"{flag} {'I/' if flag == '--shard' else ''}{others[0]}, use another --output, or "
            "pass --overwrite"
        )
    stale = [f for (_, n), f in root.shard_folders().items() if n != count]
    for folder in stale:
        if is_locked(OutputLayout(folder)):
            raise in_use(OutputLayout(folder))
    for folder in stale:  # shards of the new split starting together may remove them at once
        shutil.rmtree(folder, ignore_errors=True)
    if stale and (read_json(root.summary) or {}).get("shards") not in (None, count):
        root.summary.unlink(missing_ok=True)


def clear_shards(root: OutputLayout) -> None:
    """Remove every shard folder and the job's summary before a `--gpus` launcher's workers run
    with --overwrite (the launcher holds the job folder). Each worker clears only its own shard,
    so a fast one's merge took a slow sibling's old summary for done and merged its old rows."""
    folders = list(root.shard_folders().values())
    for folder in folders:
        if is_locked(OutputLayout(folder)):
            raise in_use(OutputLayout(folder))
    for folder in folders:
        shutil.rmtree(folder)
    root.summary.unlink(missing_ok=True)


def refuse_for_array(root: OutputLayout, count: int) -> None:
    """What `bulkinfer slurm --array N` would submit into, checked before submitting: tasks
    that would all be refused (a job run without shards there, or shards of another split)
    are a failed array and an overwritten sbatch.sh. A folder holding only an earlier
    submission's files (its tasks cancelled before any started) takes this one."""
    if not submission_only(root):
        refuse_foreign(root, overwrite=False)
    if root.job_file.exists():
        raise OutputFolderError(
            f"{root.root} holds a job run without shards; resume it with `bulkinfer run`, or "
            "use another --output"
        )
    others = other_splits(root, count)
    if others:
        raise OutputFolderError(
            f"{root.root} holds shards of a run split into {others[0]}, not {count}; submit "
            f"it with --array {others[0]} to resume it, or use another --output"
        )


def submission_only(root: OutputLayout) -> bool:
    """Whether the folder holds nothing but what `bulkinfer slurm` writes as it submits (its
    record among them: an sbatch.sh of the user's own is theirs)."""
    if not root.root.is_dir() or not root.slurm_jobs.is_file():
        return False
    theirs = {root.slurm_script, root.slurm_jobs, root.slurm_logs, root.lock, *root.leftovers()}
    return all(path in theirs for path in root.root.iterdir())


def refuse_unlike_shards(
    root: OutputLayout, index: int, count: int, run: RunIdentity, overwrite: bool
) -> None:
    """A shard whose sibling shards ran another job (other settings, model or input, or an
    `auto` dtype resolved otherwise on another kind of node): refused before any work, naming
    the sibling and what differs (its merge could never run; it was found there, after every
    batch). --overwrite skips the check."""
    if overwrite:
        return
    for (other, n), folder in root.shard_folders().items():
        if n != count or other == index:
            continue
        record = JobRecord.read_if_there(OutputLayout(folder).job_file)
        differs = differences(record, run) if record is not None else None
        if differs:
            raise OutputFolderError(
                f"{root.root}: shard {other}/{n} of this job ran another job ({differs}); run "
                "every shard with the same job, settings, model and input, or pass --overwrite"
            )


# spec keys that may differ in name only: the model's path (the same files found elsewhere)
# and settings set to what `auto` resolved to
NAME_ONLY_KEYS = {"model.path", *RESOLVED_KEYS}


def differences(record: JobRecord, run: RunIdentity) -> str | None:
    """How the rows a folder holds were computed otherwise than this run would compute them
    ("the job spec differs: task.top_k: 3 there, 5 here", "the model files differ", ...), or
    None for the same job. Settings that differ in name only are the same job: a model at
    another path with the same files (staged to a node's disk), or a dtype, pooling or
    normalisation set to what `auto` resolved to for the folder's rows."""
    mismatch = [k for k in ("spec", "model", "input") if record.fingerprint.get(k) != run.prints[k]]
    keys = spec_keys_differing(record.spec, run.spec) if "spec" in mismatch else []
    if mismatch and _same_in_effect(record, run, mismatch, keys):
        mismatch = []  # the same job: what `auto` resolved to is still compared below
    reasons = [other_settings(record.spec, keys, run.spec)] if "spec" in mismatch else []
    if "model" in mismatch:
        changed = _changed_model_files(record.fingerprint, run.prints)
        since = f" (model files changed since the checkpoint: {', '.join(changed)})"
        if not _model_files(record.fingerprint):
            since = " (the folder's record, of an earlier bulkinfer, keeps no hash of each file)"
        reasons.append("the model files differ" + since)
    if "input" in mismatch:
        reasons.append(
            "the input files changed since the checkpoint was written (names, order or bytes)"
        )
    if not mismatch:
        reasons += resolved_otherwise(record, run.resolved)
    return "; ".join(reasons) or None


def resolved_otherwise(record: JobRecord, resolved: dict) -> list[str]:
    """The settings whose `auto` resolved otherwise for the folder's rows than it does here
    (`resolved`, as RunIdentity.resolved), each with the --set that resumes the folder."""
    recorded = recorded_resolution(record)
    reasons = []
    for key, name in RESOLVED_KEYS.items():
        before, now = recorded.get(name), resolved.get(name)
        if None not in (before, now) and not _same(before, now):
            before = before[0] if isinstance(before, tuple) else before
            where = f" on {record.device}" if record.device else ""
            reasons.append(
                f"{key} {_get(record.spec, key)} resolved to {_value(before)} for its rows"
                f"{where} and to {_value(now)} here; --set {key}={_value(before)} resumes it "
                "as it ran"
            )
    return reasons


def _same_in_effect(record: JobRecord, run: RunIdentity, mismatch: list[str], keys) -> bool:
    """The spec differs only in the model's path (the same files found elsewhere) and in
    settings whose resolved values are those the folder's rows were computed with."""
    # (a spec hash differing in no key differs in settings added since, at their defaults)
    if "input" in mismatch or not set(keys) <= NAME_ONLY_KEYS:
        return False
    if "model" in mismatch:
        files = [_model_files(p) for p in (record.fingerprint, run.prints)]
        if "model.path" not in keys or not files[0] or files[0] != files[1]:
            return False
    resolved = [RESOLVED_KEYS[k] for k in keys if k in RESOLVED_KEYS]
    recorded = recorded_resolution(record)
    return all(
        name in recorded and _same(recorded[name], run.resolved.get(name)) for name in resolved
    )


GPU_AUTO_DTYPES = ("bfloat16", "float16")  # `auto` on a CUDA GPU: bf16 where it has it


def recorded_resolution(record: JobRecord) -> dict:
    """What the folder's `auto` settings resolved to: recorded in job.json; for a folder
    written before that was recorded, the dtype told by the device its plan named (float32 on
    a CPU, bf16 or fp16 on a CUDA GPU, as `auto` gives them)."""
    if record.resolved is not None:
        return record.resolved
    dtype = (record.spec.get("model") or {}).get("dtype", "auto")
    if dtype != "auto":
        return {"dtype": dtype}
    if not record.device:
        return {}
    on_host = record.device.startswith(("cpu", "mps"))
    return {"dtype": "float32" if on_host else GPU_AUTO_DTYPES}


def _same(before, now) -> bool:
    return now in before if isinstance(before, tuple) else before == now


def _model_files(prints: dict) -> dict:
    return {k: v for k, v in prints.items() if k.startswith("model/")}


def _changed_model_files(recorded: dict, prints: dict) -> list[str]:
    """The model files whose hashes differ (the fingerprint keeps each as "model/<name>")."""
    files = set(_model_files(recorded)) | set(_model_files(prints))
    return sorted(k.removeprefix("model/") for k in files if recorded.get(k) != prints.get(k))


def other_settings(recorded: dict, keys: list[str], spec: dict) -> str:
    """'the job spec differs: task.top_k (task.top_k: 3 there, 5 here)': the first three keys,
    with their values."""
    named = ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")
    values = "; ".join(
        f"{k}: {_value(_get(recorded, k))} there, {_value(_get(spec, k))} here" for k in keys[:3]
    )
    return f"the job spec differs: {named} ({values})"


def _get(spec: dict, key: str):
    for part in key.split("."):
        spec = spec.get(part) if isinstance(spec, dict) else None
    return spec


def _value(value) -> str:
    if value is None:
        return "unset"
    text = str(value).lower() if isinstance(value, bool) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def spec_keys_differing(recorded: dict | None, spec: dict) -> list[str]:
    """The dotted keys of the fingerprinted spec sections whose values differ, less settings
    added since the record was written that are at their defaults (the record predates them:
    its job ran as their default does)."""
    if not recorded:
        return []
    keys = _differing_keys(recorded, spec)
    return [
        k
        for k in keys
        if k.split(".")[0] not in NOT_IN_FINGERPRINT
        and k != "input.path"
        and not _added_since(recorded, spec, k)
        and not _ignored_by_score(recorded, spec, k)
    ]


def _ignored_by_score(recorded: dict, spec: dict, key: str) -> bool:
    """A generate key of two score jobs: a score job takes them and ignores them (as its run
    warns), so they never stop a folder of its rows from resuming."""
    section, _, name = key.partition(".")
    types = {(s.get("task") or {}).get("type") for s in (recorded, spec)}
    return section == "task" and name in GENERATE_KEYS and types == {"score"}


def _added_since(recorded: dict, spec: dict, key: str) -> bool:
    section, _, name = key.partition(".")
    if "." in name or name in (recorded.get(section) or {}):
        return False
    defaults = _spec_defaults().get(section, {})
    return name in defaults and (spec.get(section) or {}).get(name) == defaults[name]


@functools.cache
def _spec_defaults() -> dict[str, dict]:
    """Each spec section's settings at their defaults, as the spec's to_dict writes them."""
    from bulkinfer.spec.schema import JobSpec

    found = {}
    for section, hint in typing.get_type_hints(JobSpec).items():
        if not dataclasses.is_dataclass(hint):
            continue
        values = {}
        for f in dataclasses.fields(hint):
            if f.default is not dataclasses.MISSING:
                values[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                values[f.name] = f.default_factory()
        found[section] = json.loads(json.dumps(values, default=str))
    return found


def _differing_keys(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two spec mappings."""
    keys = []
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            keys += _differing_keys(x, y, f"{prefix}{key}.")
        elif x != y:
            keys.append(f"{prefix}{key}")
    return keys


def refuse_foreign(layout: OutputLayout, overwrite: bool, holding_lock: bool = False) -> None:
    """Refuse a path that is not a folder, or a folder holding files but no bulkinfer job.

    Checked before the folder's lock is taken too, so a refused folder gets no lock file. A
    folder whose lock is held is in use: its holder may be between writing one file and the
    next (replacing a job, say), so that is what the refusal says."""
    root = layout.root
    refuse_not_a_folder(root)
    refuse_file_above(root)
    if not overwrite and holds_foreign(layout):
        if not holding_lock and is_locked(layout):
            raise in_use(layout)
        raise OutputFolderError(foreign_message(layout))


def refuse_not_a_folder(root: Path) -> None:
    """An output path that is a file, or a symbolic link to nothing (which no folder can be
    made at: the lock's mkdir said "File exists")."""
    if root.exists() and not root.is_dir():
        raise OutputFolderError(f"output.path: {root} exists and is not a folder")
    if root.is_symlink() and not root.exists():
        raise OutputFolderError(
            f"output.path: {root} is a symbolic link to {os.readlink(root)}, which does not "
            "exist; make that folder, or give another output folder"
        )


def foreign_message(layout: OutputLayout) -> str:
    """Why a folder with files but no job record is refused: a bulkinfer job whose job.json
    was removed (its committed rows cannot be checked against any job), one an --overwrite
    was stopped while emptying, or not one at all."""
    if layout.overwriting.exists():
        record = (
            "its job record is set aside in .overwriting-job.json"
            if read_json(layout.overwriting)
            else "it had lost its job.json before"
        )
        return (
            f"{layout.root} is a bulkinfer job's folder an --overwrite was stopped while "
            f"emptying ({record}); pass --overwrite again to finish it and run this job afresh"
        )
    if record_lost(layout):
        return (
            f"{layout.root} holds a bulkinfer job's checkpoint but no job.json, so its rows "
            "cannot be checked against this job; pass --overwrite to start it afresh, or put "
            "job.json back to resume it"
        )
    theirs = _theirs(layout)
    if theirs:  # --overwrite would refuse them: not offered
        return (
            f"{layout.root} is not empty and holds no bulkinfer job; choose a new folder "
            f"(--overwrite would not remove {_listed(theirs)} there: not bulkinfer's)"
        )
    return (
        f"{layout.root} is not empty and holds no bulkinfer job; choose a new folder or pass "
        "--overwrite"
    )


def record_lost(layout: OutputLayout) -> bool:
    """A job folder whose job.json is gone: its checkpoint's manifest is there (no other tool
    writes checkpoint/manifest.jsonl), or a summary.json that bulkinfer wrote."""
    if layout.job_file.exists():
        return False
    summary = read_json(layout.summary) or {}
    return layout.manifest.is_file() or ("rows_by_status" in summary and "rows_out" in summary)


# what a finished job's summary.json must hold as numbers (status, report and merge read them)
SUMMARY_NUMBERS = (*SUMMARY_TOTALS, "wall_seconds")


def finished_damage(layout: OutputLayout) -> str | None:
    """What is wrong with a finished job's summary, outputs or batch stats (removed, cut
    short, edited), or None when they are whole: its committed parts can write them again."""
    data = read_json(layout.summary) or {}
    wrong = unreadable_figures(data)
    if wrong:
        return f"summary.json has no number for {', '.join(wrong)}"
    for path in (layout.outputs_dir, layout.batch_stats, layout.dataset_card):
        if not path.exists():
            return f"{path} is missing"
    rows = 0
    try:
        for path in sorted(layout.outputs_dir.glob("*.parquet")):
            rows += pq.ParquetFile(path).metadata.num_rows
        pq.read_metadata(layout.batch_stats)
    except (OSError, pa.ArrowException) as exc:
        return f"a file is unreadable ({first_line(exc, 120)})"
    if rows != data["rows_out"]:
        return f"{layout.outputs_dir.name}/ holds {rows:,} rows of {data['rows_out']:,}"
    return None


def unreadable_figures(summary: dict) -> list[str]:
    """The figures of a summary.json that are not numbers (an edited or foreign file)."""
    wrong = [key for key in SUMMARY_NUMBERS if not _number(summary.get(key))]
    statuses = summary.get("rows_by_status")
    if not isinstance(statuses, dict) or not all(_number(v) for v in statuses.values()):
        wrong.append("rows_by_status")
    return wrong


def _number(value) -> bool:
    """A count or a time: a finite number (json reads NaN and Infinity too)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def refuse_file_above(root: Path) -> None:
    """A folder that cannot be made because a path above it is a file: a spec error, found
    before any work (making it would fail later as a write error, exit 74)."""
    above = next((p for p in root.parents if p.exists() or p.is_symlink()), None)
    if above is not None and not above.is_dir():
        raise OutputFolderError(
            f"output.path: {root} cannot be made: {above} is a file, not a folder"
        )


def holds_foreign(layout: OutputLayout) -> bool:
    """Files but no bulkinfer job: besides the lock files, which only say who writes the folder,
    the temporary files of ours a killed run left (the job record's among them), and the
    failure record of a shard refused before it recorded its job."""
    if layout.job_file.exists() or layout.shards_dir.is_dir() or not layout.root.is_dir():
        return False
    ignored = {layout.lock, layout.merge_lock, layout.failed, *layout.leftovers()}
    return any(path not in ignored for path in layout.root.iterdir())


def refuse_odd_removals(layout: OutputLayout) -> None:
    """Before --overwrite deletes anything: every path it would remove must be what bulkinfer
    writes there (no symbolic link, a folder where we make a folder, a file where a file), and
    no shard of the job may be running."""
    folders = layout.our_folders()
    for path in layout.ours():
        if path.is_symlink():
            odd = "is a symbolic link"
        elif path.exists() and path.is_dir() != (path in folders):
            odd = "is a folder" if path.is_dir() else "is not a folder"
        else:
            continue
        raise OutputFolderError(
            f"--overwrite: {path} {odd}, which bulkinfer never writes there; deleted nothing: "
            "move it away, then rerun"
        )
    for folder in layout.shard_folders().values():
        shard = OutputLayout(folder)
        if is_locked(shard):
            raise OutputFolderError(
                f"--overwrite: {folder} is in use by a shard run ({holder_text(shard)}); "
                "deleted nothing: wait for it to end or stop it, then rerun"
            )


def refuse_theirs(layout: OutputLayout) -> None:
    """Before --overwrite deletes anything in a folder that holds no bulkinfer job (no record,
    no mark of an --overwrite under way, no shards): files and folders there under the names
    bulkinfer writes (a README.md, an outputs/ or stats/ folder) are the user's, and
    --overwrite removes only what bulkinfer made."""
    theirs = _theirs(layout)
    if theirs:
        verb, them = ("is", "it") if len(theirs) == 1 else ("are", "them")
        raise OutputFolderError(
            f"--overwrite: {layout.root} holds no bulkinfer job, and {_listed(theirs)} there "
            f"{verb} not bulkinfer's to remove (it removes only what it made); deleted nothing: "
            f"move {them} away or choose a new folder"
        )


def _theirs(layout: OutputLayout) -> list[Path]:
    """Paths under the names bulkinfer writes, in a folder that holds no job of its own: the
    user's, which --overwrite does not remove."""
    if layout.job_file.exists() or layout.overwriting.exists() or layout.shards_dir.is_dir():
        return []
    if record_lost(layout):
        return []
    ours_anyway = {layout.failed, layout.heartbeat}  # written before a job record can be
    return [p for p in layout.ours() if p not in ours_anyway and os.path.lexists(p)]


def _listed(paths: list[Path]) -> str:
    return ", ".join(p.name + ("/" if p.is_dir() else "") for p in paths)


def save_job(layout: OutputLayout, job: JobRecord) -> None:
    """The job record, and an empty manifest beside a new parts folder: part files beside an
    empty manifest were never committed (a kill between writing one and recording it), where
    part files without one are committed rows whose manifest was lost (has_results; the
    resumed run warns of those, so their folder keeps no new empty manifest)."""
    layout.root.mkdir(parents=True, exist_ok=True)
    job.write(layout.job_file)
    layout.parts_dir.mkdir(parents=True, exist_ok=True)
    if not layout.manifest.exists() and not any(layout.parts_dir.glob("part-*.parquet")):
        layout.manifest.touch()


def has_results(layout: OutputLayout) -> bool:
    """Whether the folder holds committed rows: a manifest, outputs, or part files whose
    manifest was lost (a folder of those is its job's, not one a different job may take;
    parts beside an empty manifest were never committed, see save_job)."""
    manifest = layout.manifest
    if (manifest.exists() and manifest.stat().st_size > 0) or layout.outputs_dir.exists():
        return True
    parts = layout.parts_dir
    return not manifest.exists() and parts.is_dir() and any(parts.glob("part-*.parquet"))

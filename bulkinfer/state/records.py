"""The output folder's two records, typed and read and written here only: job.json (what the
job is and how it was planned; written first, so a folder we made is always recognisably ours)
and summary.json (the totals; written last, its `complete` marks the job done)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from bulkinfer.errors import OutputFolderError
from bulkinfer.io.atomic import write_json_atomic

FORMAT_VERSION = 1


def read_json(path: Path) -> dict | None:
    """A JSON file's object, or None if it is missing or unreadable (being written, say)."""
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) else None


@dataclass
class JobRecord:
    """job.json. The plan's fields are filled once the run has planned: a resume reads the
    budget back (the device's free memory may differ by then) and plans the same batches."""

    fingerprint: dict[str, str]
    spec: dict
    format: int = FORMAT_VERSION
    max_tokens: int | None = None
    max_batch_size: int | None = None
    plan_order: str | None = None  # how the plan sorted its rows (job/planning.py PLAN_ORDER)
    rows: int | None = None
    openai_responses: bool = False
    plan: dict | None = None
    device: str | None = None
    # the engine that ran the rows ("fast" or "reference"; `model.engine: auto` resolves to it
    # again on a resume) and a hash of the planned batches' rows (a resume that plans other
    # batches is refused: their numbers name what parts hold); None in older folders
    engine: str | None = None
    plan_digest: str | None = None
    # what `auto` settings resolved to when the job started (RESOLVED_KEYS), which the spec's
    # hash cannot see; None in folders written before it was recorded
    resolved: dict | None = None

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, data: dict) -> JobRecord:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def write(self, path: Path) -> None:
        write_json_atomic(path, self.to_dict())

    @classmethod
    def read(cls, path: Path) -> JobRecord | None:
        """The record, None when there is none; an unreadable one is a one-line error."""
        if not path.exists():
            return None
        data = read_json(path)
        if data is None or not isinstance(data.get("fingerprint"), dict) or "spec" not in data:
            raise OutputFolderError(
                f"{path} is unreadable; pass --overwrite to start this folder afresh"
            )
        return cls.from_dict(data)

    @classmethod
    def read_if_there(cls, path: Path) -> JobRecord | None:
        """For readers (status, report, merge checks): None for missing or unreadable."""
        data = read_json(path)
        if data is None or not isinstance(data.get("fingerprint"), dict):
            return None
        return cls.from_dict({"spec": {}, **data})


# the figures of a summary that add up across shards (a merge sums them)
SUMMARY_TOTALS = (
    "rows_in",
    "rows_out",
    "batches",
    "input_tokens",
    "output_tokens",
    "padded_tokens",
    "model_seconds",
    "oom_splits",
)


@dataclass
class Summary:
    """summary.json: the numbers people read in the morning. `details` holds what only some
    runs have (start-up timings, hardware shares, a merge's shard facts); on disk they sit
    beside the rest, flat."""

    rows_in: int
    rows_out: int
    rows_by_status: dict[str, int]
    batches: int
    input_tokens: int
    output_tokens: int
    padded_tokens: int
    padding_fraction: float
    wall_seconds: float
    model_seconds: float
    rows_per_second: float
    input_tokens_per_second: float
    output_tokens_per_second: float
    oom_splits: int
    complete: bool = True
    task: str | None = None
    device: str | list[str] | None = None
    details: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        data = asdict(self)
        details = data.pop("details")
        return {**{k: v for k, v in data.items() if v is not None}, **details}

    @classmethod
    def from_dict(cls, data: dict) -> Summary:
        known = {f.name for f in fields(cls)} - {"details"}
        details = {k: v for k, v in data.items() if k not in known}
        return cls(**{k: v for k, v in data.items() if k in known}, details=details)

    def write(self, path: Path) -> None:
        write_json_atomic(path, self.to_dict())

    @classmethod
    def read_if_there(cls, path: Path) -> Summary | None:
        """A complete job's summary; None while there is none (or it is unreadable)."""
        data = read_json(path)
        if not data or not data.get("complete"):
            return None
        try:
            return cls.from_dict(data)
        except TypeError:
            return None


@dataclass(frozen=True)
class SlurmSubmission:
    """An array job `bulkinfer slurm` submitted into the folder (slurm-jobs.json holds them all,
    oldest first): its task i runs shard i of `tasks`. Lets `status` show the shards of an array
    whose tasks have not started yet, and ask Slurm about them."""

    job_id: str
    tasks: int

    @staticmethod
    def add(path: Path, job_id: str, tasks: int) -> None:
        jobs = [asdict(s) for s in SlurmSubmission.read_all(path)]
        write_json_atomic(path, {"jobs": [*jobs, {"job_id": job_id, "tasks": tasks}]})

    @staticmethod
    def read_all(path: Path) -> list[SlurmSubmission]:
        """What the file holds; entries that are not what `add` writes are passed over."""
        jobs = (read_json(path) or {}).get("jobs")
        found = []
        for job in jobs if isinstance(jobs, list) else []:
            if not isinstance(job, dict):
                continue
            job_id, tasks = job.get("job_id"), job.get("tasks")
            if isinstance(job_id, str) and type(tasks) is int and tasks >= 1:
                found.append(SlurmSubmission(job_id, tasks))
        return found

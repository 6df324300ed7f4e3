"""The job's state in its output folder: fingerprint, manifest of finished parts, resume.

A part counts as done only once its manifest line is written, and that line carries the part's
sha256: a part file without a line, or whose bytes no longer match, is recomputed, never read as
good. So whatever moment a process dies at, a rerun neither loses nor doubles a row.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from bulkinfer.errors import OutputFolderError
from bulkinfer.io.atomic import (
    append_line_durable,
    file_sha256,
    write_bytes_atomic,
    write_json_atomic,
)
from bulkinfer.io.layout import OutputLayout

FORMAT_VERSION = 1
NOT_IN_FINGERPRINT = ("output", "checkpoint", "progress", "on_error")


def input_files_digest(files: list[str]) -> dict[str, dict]:
    """Content hash of each input file, so an input edited since the checkpoint is caught."""
    return {
        os.path.basename(f) if len(files) == 1 else f: {
            "bytes": _size(f),
            "blake2b": _blake2b(f),
        }
        for f in files
    }


def _blake2b(path: str) -> str:
    """Of a file's bytes; of a folder (a saved dataset), of every file's name and bytes."""
    digest = hashlib.blake2b(digest_size=16)
    files = _folder_files(path) if os.path.isdir(path) else [path]
    for name in files:
        if name != path:
            digest.update(os.path.relpath(name, path).encode() + b"\0")
        with open(name, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()


def _folder_files(folder: str) -> list[str]:
    return sorted(os.path.join(root, n) for root, _, names in os.walk(folder) for n in names)


def _size(path: str) -> int:
    if os.path.isdir(path):
        return sum(os.path.getsize(f) for f in _folder_files(path))
    return os.path.getsize(path)


def fingerprint(spec_dict: dict, model: dict, inputs: dict) -> dict[str, str]:
    """Hashes of what decides the outputs: the spec (less output place and cadence), model, input."""
    spec_part = {k: v for k, v in spec_dict.items() if k not in NOT_IN_FINGERPRINT}
    spec_part = {**spec_part, "input": {**spec_part["input"], "path": None}}
    return {"spec": _hash(spec_part), "model": _hash(model), "input": _hash(inputs)}


def fingerprint_mismatch(recorded: dict, current: dict) -> list[str]:
    return [k for k in current if recorded.get(k) != current[k]]


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:24]


@dataclass(frozen=True)
class PartRecord:
    """One manifest line: a committed part and the batches it holds."""

    file: str
    batches: list[int]
    rows: int
    sha256: str
    run: str
    elapsed: float
    stats: list[dict] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(self.__dict__, separators=(",", ":"))


class Manifest:
    """Append-only list of committed parts; a torn last line from a crash is dropped on open."""

    def __init__(self, layout: OutputLayout):
        self.layout = layout
        self.records: list[PartRecord] = []
        self.dropped: list[str] = []
        self._load()

    def _load(self) -> None:
        path = self.layout.manifest
        if not path.exists():
            return
        raw = path.read_bytes()
        good_lines = []
        for line in raw.split(b"\n"):
            if not line.strip():
                continue
            try:
                record = PartRecord(**json.loads(line))
            except (ValueError, TypeError):
                self.dropped.append("a torn manifest line")
                continue
            if self._part_is_intact(record):
                self.records.append(record)
                good_lines.append(line)
            else:
                self.dropped.append(record.file)
        if self.dropped or (raw and not raw.endswith(b"\n")):
            write_bytes_atomic(path, b"".join(line + b"\n" for line in good_lines))

    def _part_is_intact(self, record: PartRecord) -> bool:
        part = self.layout.parts_dir / record.file
        return part.is_file() and file_sha256(part) == record.sha256

    def done_batches(self) -> set[int]:
        return {b for r in self.records for b in r.batches}

    def commit(self, record: PartRecord) -> None:
        append_line_durable(self.layout.manifest, record.to_json())
        self.records.append(record)


@dataclass
class JobFolder:
    """The output folder's state when a run starts."""

    layout: OutputLayout
    job: dict
    finished: bool
    resumed: bool


def open_job_folder(
    layout: OutputLayout, prints: dict[str, str], spec_dict: dict, overwrite: bool
) -> JobFolder:
    """Start, resume or refuse: the folder must be empty, ours for this very job, or overwritten."""
    root = layout.root
    if root.exists() and not root.is_dir():
        raise OutputFolderError(f"output.path: {root} exists and is not a folder")
    existing = _read_job(layout)
    if existing is not None and not overwrite and not _has_results(layout):
        overwrite = True  # a job that never committed a row can be replaced: nothing is lost
    if existing is not None and not overwrite:
        mismatch = [
            k for k in ("spec", "model", "input") if existing["fingerprint"].get(k) != prints[k]
        ]
        if mismatch:
            raise OutputFolderError(_mismatch_message(root, mismatch))
        finished = layout.summary.exists() and _summary_complete(layout)
        return JobFolder(layout, existing, finished=finished, resumed=True)
    if existing is None and (root / "shards").is_dir() and not overwrite:
        raise OutputFolderError(
            f"{root} holds a sharded run of a job; run it with --shard I/N (or from its Slurm "
            "array), see it with `bulkinfer status`, or pass --overwrite to start afresh"
        )
    if existing is None and root.exists() and any(root.iterdir()) and not overwrite:
        raise OutputFolderError(
            f"{root} is not empty and holds no bulkinfer job; choose a new folder or pass --overwrite"
        )
    if overwrite:
        for path in layout.ours():
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    job = {"format": FORMAT_VERSION, "fingerprint": prints, "spec": spec_dict}
    save_job(layout, job)  # first, so a folder we created is always recognisably ours
    return JobFolder(layout, job, finished=False, resumed=False)


def save_job(layout: OutputLayout, job: dict) -> None:
    layout.root.mkdir(parents=True, exist_ok=True)
    write_json_atomic(layout.job_file, job)
    layout.parts_dir.mkdir(parents=True, exist_ok=True)


def _has_results(layout: OutputLayout) -> bool:
    manifest = layout.manifest
    return (manifest.exists() and manifest.stat().st_size > 0) or layout.outputs_dir.exists()


def _read_job(layout: OutputLayout) -> dict | None:
    if not layout.job_file.exists():
        return None
    try:
        job = json.loads(layout.job_file.read_text())
        job["fingerprint"]
    except (ValueError, KeyError, TypeError):
        raise OutputFolderError(
            f"{layout.job_file} is unreadable; pass --overwrite to start this folder afresh"
        ) from None
    return job


def _summary_complete(layout: OutputLayout) -> bool:
    try:
        return bool(json.loads(layout.summary.read_text()).get("complete"))
    except ValueError:
        return False


def _mismatch_message(root: Path, mismatch: list[str]) -> str:
    what = {
        "spec": "the job spec differs",
        "model": "the model files differ",
        "input": "the input files changed since the checkpoint was written",
        "shard": "it was split into a different number of shards",
    }
    reasons = "; ".join(what[k] for k in mismatch)
    return (
        f"{root} holds another job's outputs ({reasons}); use another --output or pass --overwrite"
    )

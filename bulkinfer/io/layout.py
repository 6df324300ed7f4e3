"""Every path bulkinfer reads or writes under a job's output folder, in one place.

Status, merge, the outputs writer, the checkpoint and the report all go through this, so the
folder's shape is written down once (README's "The output folder" describes it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

SHARD_FOLDER = re.compile(r"shard-(\d+)-of-(\d+)$")
# What an all-or-nothing write killed before its rename leaves: ".NAME.tmp-PID" (io/atomic.py).
TEMP_FILE = re.compile(r"^\.(.+)\.tmp-\d+$")


@dataclass(frozen=True)
class OutputLayout:
    root: Path

    @property
    def job_file(self) -> Path:
        return self.root / "job.json"

    @property
    def checkpoint_dir(self) -> Path:
        return self.root / "checkpoint"

    @property
    def parts_dir(self) -> Path:
        return self.checkpoint_dir / "parts"

    @property
    def manifest(self) -> Path:
        return self.checkpoint_dir / "manifest.jsonl"

    @property
    def prepared_dir(self) -> Path:
        """Spill files of the tokenized input (token ids, ids, kept columns) while the job runs."""
        return self.checkpoint_dir / "prepared"

    @property
    def outputs_dir(self) -> Path:
        return self.root / "outputs"

    @property
    def outputs_tmp(self) -> Path:
        return self.root / "outputs.tmp"

    @property
    def outputs_old(self) -> Path:
        return self.root / "outputs.old"

    @property
    def outputs_buckets(self) -> Path:
        return self.root / "outputs.buckets"

    @property
    def stats_dir(self) -> Path:
        return self.root / "stats"

    @property
    def batch_stats(self) -> Path:
        return self.stats_dir / "batches.parquet"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def responses(self) -> Path:
        return self.root / "responses.jsonl"

    @property
    def errors(self) -> Path:
        """The failed requests' response lines (the Batch API's error file)."""
        return self.root / "errors.jsonl"

    @property
    def dataset_card(self) -> Path:
        return self.root / "README.md"

    @property
    def heartbeat(self) -> Path:
        """Written by earlier versions after every batch (status now asks the lock); listed so
        --overwrite still clears it from their folders."""
        return self.root / "heartbeat"

    @property
    def failed(self) -> Path:
        return self.root / "failed.json"

    @property
    def overwriting(self) -> Path:
        """The job record of a folder --overwrite is emptying, renamed: the record goes first
        (a folder so killed is no job to resume), this mark last (until then the folder is
        known as ours, to a later --overwrite)."""
        return self.root / ".overwriting-job.json"

    @property
    def shards_dir(self) -> Path:
        return self.root / "shards"

    @property
    def lock(self) -> Path:
        """Held by the one run writing this folder (io/lock.py); never removed."""
        return self.root / ".lock"

    @property
    def merge_lock(self) -> Path:
        return self.root / ".merge.lock"

    @property
    def slurm_script(self) -> Path:
        """`bulkinfer slurm`'s sbatch script; resubmitting one task of it reruns that shard."""
        return self.root / "sbatch.sh"

    @property
    def slurm_jobs(self) -> Path:
        """The array jobs `bulkinfer slurm` submitted here (ids and task counts), for status."""
        return self.root / "slurm-jobs.json"

    @property
    def slurm_logs(self) -> Path:
        return self.root / "logs"

    @property
    def report_page(self) -> Path:
        return self.root / "report.html"

    @property
    def report_dir(self) -> Path:
        return self.root / "report"

    def shard(self, index: int, count: int) -> OutputLayout:
        """The folder of shard `index` of `count`, itself laid out as a whole job's."""
        return OutputLayout(self.shards_dir / f"shard-{index:05d}-of-{count:05d}")

    def shard_folders(self) -> dict[tuple[int, int], Path]:
        """(index, count) -> folder of every shard folder present."""
        found = {}
        for path in sorted(self.shards_dir.glob("shard-*-of-*")):
            match = SHARD_FOLDER.search(path.name)
            if match and path.is_dir():
                found[(int(match.group(1)), int(match.group(2)))] = path
        return found

    def holds_job(self) -> bool:
        """Whether this is a bulkinfer job's folder: its record, its checkpoint's manifest (even
        where job.json was removed), what a run that failed before writing its record leaves
        (its lock and failed.json), an --overwrite's mark, or a shard's record."""
        if self.job_file.is_file() or self.manifest.is_file() or self.overwriting.is_file():
            return True
        if self.lock.is_file() and self.failed.is_file():
            return True
        return any((folder / "job.json").is_file() for folder in self.shard_folders().values())

    def our_folders(self) -> set[Path]:
        """Those of ours() that bulkinfer makes as folders; the others it makes as files."""
        return {
            self.checkpoint_dir,
            self.outputs_dir,
            self.stats_dir,
            self.outputs_tmp,
            self.outputs_old,
            self.outputs_buckets,
            self.shards_dir,
            self.report_dir,
        }

    def ours(self) -> list[Path]:
        """What --overwrite removes: only files bulkinfer made, never the user's own."""
        return [*self._named(), *self.leftovers()]

    def leftovers(self) -> list[Path]:
        """Temporary files of ours that a run killed mid-write left: at the top of the folder
        (beside the files of ours they were to replace), and in the folders only we write
        (checkpoint parts, stats)."""
        if not self.root.is_dir():
            return []
        names = {path.name for path in self._named()}
        found = [
            path
            for path in self.root.iterdir()
            if (match := TEMP_FILE.match(path.name)) and match.group(1) in names
        ]
        for folder in (self.parts_dir, self.stats_dir):
            if folder.is_dir():
                found += [path for path in folder.iterdir() if TEMP_FILE.match(path.name)]
        return sorted(found)

    def remove_leftovers(self) -> None:
        """Remove `leftovers`: only while holding the folder's (or a merge's) lock, when no
        write of ours is under way."""
        for path in self.leftovers():
            if path.is_file() and not path.is_symlink():
                path.unlink()

    def _named(self) -> list[Path]:
        return [
            self.job_file,
            self.checkpoint_dir,
            self.outputs_dir,
            self.stats_dir,
            self.summary,
            self.dataset_card,
            self.responses,
            self.errors,
            self.outputs_tmp,
            self.outputs_old,
            self.outputs_buckets,
            self.heartbeat,
            self.failed,
            self.shards_dir,
            self.report_page,
            self.report_dir,
            self.overwriting,  # last: removed after everything else
        ]

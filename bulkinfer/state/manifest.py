"""checkpoint/manifest.jsonl: one line per committed part, appended durably.

A part counts as done only once its manifest line is written, and that line carries the part's
sha256: a part file without a line, or whose bytes no longer match, is recomputed, never read as
good. So whatever moment a process dies at, a rerun neither loses nor doubles a row. One parser
reads the lines: `Manifest` (the run's, which drops torn lines, corrupt parts and repeated
records and rewrites the file) and `read_manifest` (status and report, which only read).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bulkinfer.io.atomic import append_line_durable, file_sha256, write_bytes_atomic
from bulkinfer.io.layout import OutputLayout


@dataclass(frozen=True)
class PartRecord:
    """One manifest line: a committed part, the batches it completes and, in `partial`, the
    rows (input positions) it holds of batches not done yet: a long batch commits its finished
    rows every `checkpoint.every_seconds`, and the part that completes it holds the rest."""

    file: str
    batches: list[int]
    rows: int
    sha256: str
    run: str
    elapsed: float
    stats: list[dict] = field(default_factory=list)
    partial: dict[str, list[int]] = field(default_factory=dict)  # batch -> rows

    def to_json(self) -> str:
        fields = {k: v for k, v in self.__dict__.items() if k != "partial" or v}
        return json.dumps(fields, separators=(",", ":"))


def parse_manifest(raw: bytes) -> Iterator[tuple[bytes, PartRecord | None]]:
    """Each non-empty line and its record (None for a torn or unreadable line)."""
    for line in raw.split(b"\n"):
        if not line.strip():
            continue
        try:
            yield line, PartRecord(**json.loads(line))
        except (ValueError, TypeError):
            yield line, None


class Seen:
    """What earlier records hold: part files, completed batches, rows of batches in progress."""

    def __init__(self) -> None:
        self.files: set[str] = set()
        self.batches: set[int] = set()
        self.pieces: dict[int, set[int]] = {}

    def repeats(self, record: PartRecord) -> bool:
        """Whether `record` repeats what earlier records hold: the same part recorded twice, a
        batch completed twice, or rows of a batch in two parts. Two writers at once, or a killed
        launcher's orphans, leave such lines; the first copy counts and the later is ignored."""
        if record.file in self.files or not self.batches.isdisjoint(record.batches):
            return True
        return any(
            int(b) in self.batches or not self.pieces.get(int(b), set()).isdisjoint(rows)
            for b, rows in record.partial.items()
        )

    def add(self, record: PartRecord) -> None:
        self.files.add(record.file)
        self.batches.update(record.batches)
        for b, rows in record.partial.items():
            self.pieces.setdefault(int(b), set()).update(rows)


def read_manifest(layout: OutputLayout) -> list[PartRecord]:
    """The committed parts' records, for readers: torn lines and repeats skipped, nothing
    rewritten."""
    try:
        raw = layout.manifest.read_bytes()
    except OSError:
        return []
    records, seen = [], Seen()
    for _, record in parse_manifest(raw):
        if record is not None and not seen.repeats(record):
            records.append(record)
            seen.add(record)
    return records


class Manifest:
    """Append-only list of committed parts; on open, a torn last line from a crash, parts found
    corrupt and repeated records are dropped, and the file is rewritten without them."""

    def __init__(self, layout: OutputLayout):
        self.layout = layout
        self.records: list[PartRecord] = []
        self.dropped: list[str] = []  # parts missing or corrupt, and torn lines
        self.repeated: list[str] = []  # records repeating earlier ones (ignored)
        self.redone: list[str] = []  # intact parts completing a batch that lost rows
        self.unlisted = 0  # part files found without a manifest
        self.rows_committed = 0  # rows the records hold, kept as parts are committed
        self._load()

    def _load(self) -> None:
        path = self.layout.manifest
        if not path.exists():
            self.unlisted = sum(1 for _ in self.layout.parts_dir.glob("part-*.parquet"))
            return
        raw = path.read_bytes()
        kept, seen, lost = [], Seen(), set()
        for line, record in parse_manifest(raw):
            if record is None:
                self.dropped.append("a torn manifest line")
            elif not self._part_is_intact(record):
                self.dropped.append(record.file)
                lost.update(int(b) for b in record.partial)
            elif seen.repeats(record):
                self.repeated.append(record.file)
            else:
                kept.append((line, record))
                seen.add(record)
        kept = self._without_batches_missing_rows(kept, lost)
        self.records = [record for _, record in kept]
        self.rows_committed = sum(r.rows for r in self.records)
        if self.dropped or self.repeated or self.redone or (raw and not raw.endswith(b"\n")):
            write_bytes_atomic(path, b"".join(line + b"\n" for line, _ in kept))

    def _without_batches_missing_rows(self, kept: list, lost: set[int]) -> list:
        """Drop the parts that complete a batch some of whose rows were in a part now lost:
        such a batch is done no longer, and its rows the lost part held are run again with the
        rest of it (the rows its intact pieces hold are kept). A dropped part's own pieces of
        other batches are lost in turn, so this repeats until nothing more is dropped."""
        while lost:
            dropped = [r for _, r in kept if not lost.isdisjoint(r.batches)]
            kept = [(line, r) for line, r in kept if lost.isdisjoint(r.batches)]
            self.redone += [r.file for r in dropped]
            lost = {int(b) for r in dropped for b in r.partial}
        return kept

    def _part_is_intact(self, record: PartRecord) -> bool:
        part = self.layout.parts_dir / record.file
        return part.is_file() and file_sha256(part) == record.sha256

    def part_files(self) -> list[Path]:
        return [self.layout.parts_dir / r.file for r in self.records]

    def done_batches(self) -> set[int]:
        return {b for r in self.records for b in r.batches}

    def done_pieces(self) -> dict[int, set[int]]:
        """Rows committed of batches not completed yet: batch -> input positions."""
        done = self.done_batches()
        pieces: dict[int, set[int]] = {}
        for r in self.records:
            for b, rows in r.partial.items():
                if int(b) not in done:
                    pieces.setdefault(int(b), set()).update(rows)
        return pieces

    def commit(self, record: PartRecord) -> None:
        append_line_durable(self.layout.manifest, record.to_json())
        self.records.append(record)
        self.rows_committed += record.rows

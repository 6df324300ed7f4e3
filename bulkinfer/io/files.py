"""Which files a job reads: files, folders and globs expanded, each file's format sniffed
once (Parquet, JSONL, an OpenAI Batch request file, a saved dataset)."""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path

from bulkinfer.errors import InputError
from bulkinfer.io.jsonl import _json_file, _jsonl_records
from bulkinfer.io.layout import OutputLayout
from bulkinfer.io.openai_batch import looks_like_batch_record

JSONL_SUFFIXES = tuple(
    base + packed
    for base in (".jsonl", ".ndjson", ".json")
    for packed in ("", ".gz", ".zst", ".bz2", ".xz")
)
PARQUET_SUFFIXES = (".parquet", ".pq")
DATASETS_ONLY_SUFFIXES = (".csv", ".csv.gz", ".tsv", ".tsv.gz")  # input.format hf


@dataclass(frozen=True)
class DataFile:
    """An input file and how to read it: parquet, jsonl, openai (Batch API requests), saved (a
    save_to_disk folder) or datasets (a file read through the `datasets` library)."""

    path: str
    kind: str

    @property
    def layout(self) -> str | None:
        """parquet or jsonl: how the bytes are laid out, whoever reads them (None: unknown)."""
        if self.kind in ("parquet", "jsonl", "openai"):
            return "jsonl" if self.kind == "openai" else self.kind
        return None  # a saved dataset; a file only `datasets` reads (CSV, a JSON array)


def resolve_input_files(
    patterns: list[str],
    fmt: str = "auto",
    exclude: str | None = None,
    split: str | None = None,
    passed_over: list[str] | None = None,
) -> list[DataFile]:
    """Expand files, folders and globs into a sorted, de-duplicated list of data files, each
    file's format sniffed here, once.

    A folder saved by `datasets` (`save_to_disk`) is one input, itself (for a DatasetDict, the
    folder of its `split`). Files under `exclude` (the job's own output folder, when it sits
    inside an input folder) are never inputs. `passed_over` gets the files of input folders
    that are not read for their kind (a .csv, a notes.txt), for the caller to say so."""
    files: list[str] = []
    for pattern in patterns:
        if os.path.isdir(pattern) and is_saved_dataset(pattern):
            found = [saved_dataset_split(pattern, split)]
        elif os.path.isdir(pattern):
            found = _folder_inputs(pattern, fmt, split, passed_over)
            if not found:
                raise InputError(f"{pattern}: the folder holds no .parquet or .jsonl files")
        elif os.path.isfile(pattern):
            found = [pattern]
        else:
            found = sorted(
                p if os.path.isfile(p) else saved_dataset_split(p, split)
                for p in glob.glob(pattern, recursive=True)
                if os.path.isfile(p) or (os.path.isdir(p) and is_saved_dataset(p))
            )
            if not found:
                raise InputError(f"{pattern}: matches no file")
        files.extend(found)
    unique = list(dict.fromkeys(os.path.abspath(f) for f in files))
    if exclude is not None:
        inside = os.path.abspath(exclude) + os.sep
        unique = [f for f in unique if not f.startswith(inside)]
        if not unique:
            raise InputError(f"{', '.join(patterns)}: no input files outside the output folder")
    found = [DataFile(f, file_format(f, fmt)) for f in unique]
    for f in found:  # named in bytes that are not UTF-8 (JSONL is read by Python itself)
        if f.kind in ("parquet", "saved", "datasets") and not _utf8(f.path):
            raise InputError(
                f"{f.path.encode('utf-8', 'backslashreplace').decode()}: the name is not valid "
                "UTF-8, which pyarrow needs of a path it reads; rename it"
            )
    if split is not None and not any(f.kind == "saved" for f in found):
        raise InputError(
            f"input.split: {split!r} names a split of a saved DatasetDict, and the input holds "
            "none (its files have no splits); remove input.split"
        )
    return found


def _folder_inputs(
    folder: str, fmt: str, split: str | None, passed_over: list[str] | None = None
) -> list[str]:
    """Data files under a folder, in sorted order; a saved dataset inside it is one input (its
    state.json is not read as JSONL). Files and folders whose names start with '.' or '_' are
    passed over, as pyarrow's datasets do (a notebook's .ipynb_checkpoints copies, a writer's
    _temporary parts). The output folders of bulkinfer jobs inside it are passed over too (a
    job's own, and another's: its outputs are not input). Other files not of a kind read here
    are added to `passed_over`."""
    found = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = [
            d
            for d in dirs
            if not d.startswith((".", "_")) and not OutputLayout(Path(root, d)).holds_job()
        ]
        saved = [d for d in dirs if is_saved_dataset(os.path.join(root, d))]
        found += [saved_dataset_split(os.path.join(root, d), split) for d in saved]
        dirs[:] = sorted(d for d in dirs if d not in saved)
        shown = [name for name in names if not name.startswith((".", "_"))]
        found += [os.path.join(root, name) for name in shown if _is_data_file(name, fmt)]
        if passed_over is not None:
            passed_over += sorted(
                os.path.join(root, name) for name in shown if not _is_data_file(name, fmt)
            )
    return sorted(found)


def file_format(path: str, fmt: str = "auto") -> str:
    """How to read `path`: parquet, jsonl, saved (a save_to_disk folder) or datasets (a file
    loaded through the `datasets` library, with input.format hf)."""
    if os.path.isdir(path):
        return "saved"
    if fmt == "hf":
        return "datasets"
    if fmt != "auto":
        return fmt
    lower = path.lower()
    if lower.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if lower.endswith(JSONL_SUFFIXES):
        first = next(_jsonl_records(path), (0, {}))[1]
        return "openai" if looks_like_batch_record(first) else "jsonl"
    if lower.endswith(DATASETS_ONLY_SUFFIXES):
        raise InputError(f"{path}: CSV is read through `datasets`: set input.format: hf")
    raise InputError(
        f"{path}: unknown file type; name it .parquet or .jsonl (.gz, .zst, .bz2, .xz "
        "compressed), or set input.format"
    )


def _utf8(path: str) -> bool:
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:  # bytes the file system gave Python as surrogates
        return False
    return True


def _is_data_file(name: str, fmt: str) -> bool:
    lower = name.lower()
    if fmt == "hf":
        return lower.endswith(PARQUET_SUFFIXES + JSONL_SUFFIXES + DATASETS_ONLY_SUFFIXES)
    if fmt == "parquet":
        return lower.endswith(PARQUET_SUFFIXES)
    if fmt == "jsonl":
        return lower.endswith(JSONL_SUFFIXES)
    return lower.endswith(PARQUET_SUFFIXES + JSONL_SUFFIXES)


def is_saved_dataset(folder: str) -> bool:
    """A folder written by `datasets`' save_to_disk: a Dataset or a DatasetDict."""
    names = set(os.listdir(folder))
    return {"state.json", "dataset_info.json"} <= names or "dataset_dict.json" in names


def saved_dataset_split(folder: str, split: str | None) -> str:
    """The Dataset folder to read: the folder itself, or a DatasetDict's split."""
    dict_file = os.path.join(folder, "dataset_dict.json")
    if not os.path.isfile(dict_file):
        if split is not None:
            raise InputError(f"{folder}: a saved Dataset has no splits; remove input.split")
        return folder
    splits = _json_file(dict_file).get("splits") or []
    if split is None and len(splits) == 1:
        split = splits[0]
    if split not in splits:
        what = "set input.split to one" if split is None else f"no split '{split}'"
        raise InputError(f"{folder}: a DatasetDict with splits {', '.join(splits)}; {what}")
    return os.path.join(folder, split)

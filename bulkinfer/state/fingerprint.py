"""What decides a job's outputs, hashed: the spec (less where outputs go and how often they
are committed), the model's files and the input files' bytes. A resume goes ahead only when all
three match what the folder recorded."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

from bulkinfer.digests import update_with_file

NOT_IN_FINGERPRINT = ("output", "checkpoint", "progress", "on_error")
# Spec keys added since folders were first fingerprinted: left out while at their defaults, so
# a folder an earlier version wrote still resumes.
ADDED_KEYS = {
    ("task", "response_format"): None,
    ("task", "top_logprobs"): 0,
    ("batching", "min_shared_prefix"): 256,
    ("model", "quantization"): "none",
    ("model", "kv_cache_dtype"): "auto",
}


# spec keys whose `auto` resolves on the machine that runs the job (the dtype by its device; an
# embed task's pooling and normalisation by the model's sentence-transformers files), and the
# name each resolved value is recorded under in job.json
RESOLVED_KEYS = {"model.dtype": "dtype", "task.pooling": "pooling", "task.normalize": "normalize"}


@dataclass(frozen=True)
class RunIdentity:
    """What decides a run's outputs: the fingerprint (`prints`: hashes of the spec, the model's
    files and the input, and each model file's own hash as "model/<name>"), the spec itself (to
    name what differs) and what its `auto` settings resolved to here (`resolved`)."""

    prints: dict[str, str]
    spec: dict
    resolved: dict


def input_files_digest(files: list[str]) -> dict[str, dict]:
    """Content hash of each input file, so an input edited since the checkpoint is caught;
    and the files' order where it is not sorted (a list in input.path), since rows are known
    by their position: the same files in another order are another input."""
    digest: dict = {
        os.path.basename(f) if len(files) == 1 else f: {
            "bytes": _size(f),
            "blake2b": _blake2b(f),
        }
        for f in files
    }
    if files != sorted(files):  # sorted: as every checkpoint before the order was hashed
        digest[ORDER_KEY] = list(files)
    return digest


ORDER_KEY = "(order)"  # no input path: those are absolute


def _blake2b(path: str) -> str:
    """Of a file's bytes; of a folder (a saved dataset), of every file's name and bytes."""
    digest = hashlib.blake2b(digest_size=16)
    files = _folder_files(path) if os.path.isdir(path) else [path]
    for name in files:
        if name != path:
            digest.update(os.path.relpath(name, path).encode() + b"\0")
        update_with_file(digest, name)
    return digest.hexdigest()


def _folder_files(folder: str) -> list[str]:
    """A saved dataset's files, less the cache files `datasets` writes beside its data when the
    loaded dataset is mapped or filtered (`cache-<fingerprint>.arrow`): the rows are the same,
    and a resume must not be refused for them."""
    return sorted(
        os.path.join(root, n)
        for root, _, names in os.walk(folder)
        for n in names
        if not (n.startswith("cache-") and n.endswith(".arrow"))
    )


def _size(path: str) -> int:
    if os.path.isdir(path):
        return sum(os.path.getsize(f) for f in _folder_files(path))
    return os.path.getsize(path)


def fingerprint(spec_dict: dict, model: dict, inputs: dict) -> dict[str, str]:
    """Hashes of what decides the outputs: the spec (less output place and cadence), model, input."""
    spec_part = {k: v for k, v in spec_dict.items() if k not in NOT_IN_FINGERPRINT}
    spec_part = {**spec_part, "input": {**spec_part["input"], "path": None}}
    for (section, key), default in ADDED_KEYS.items():
        if section in spec_part and spec_part[section].get(key, default) == default:
            spec_part[section] = {k: v for k, v in spec_part[section].items() if k != key}
    return {"spec": _hash(spec_part), "model": _hash(model), "input": _hash(inputs)}


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:24]

"""Shared fixtures: a tiny random-weight model built once per session, and input file writers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from click.testing import CliRunner
from tiny_model import build_tiny_model

from bulkinfer.cli import main

ROOT = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    """Under pytest-xdist each worker is a process of its own: its in-process torch work keeps
    to one thread, as the CLI's child processes do (child_env), so workers share the cores
    instead of fighting over them."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama", arch="llama")


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-gpt2", arch="gpt2")


def sample_prompts(n: int) -> list[dict]:
    """Prompts of varied length, with string ids and a column to keep."""
    words = [
        "the",
        "quick",
        "brown",
        "fox",
        "jumps",
        "over",
        "the",
        "lazy",
        "dog",
        "while",
        "Émilie",
        "reads",
        "東京",
        "news",
    ]
    rows = []
    for i in range(n):
        length = 1 + (i * 37) % 60 if i % 7 else 80 + i % 40
        text = " ".join(words[(i + k) % len(words)] for k in range(length))
        rows.append({"id": f"q-{i:04d}", "prompt": f"{text} ({i})", "source": f"src{i % 3}"})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8"
    )
    return path


def write_parquet(path: Path, rows: list[dict], row_group_size: int = 16) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=row_group_size)
    return path


def write_job(path: Path, model: Path, inputs, output: Path, **sections) -> Path:
    spec = {
        "model": {"path": str(model)},
        "task": {"type": "generate", "max_new_tokens": 6},
        "input": {"path": [str(p) for p in inputs] if isinstance(inputs, list) else str(inputs)},
        "output": {"path": str(output)},
        "batching": {"max_tokens": 600, "max_batch_size": 8},
        "checkpoint": {"every_rows": 10},
    }
    for name, values in sections.items():
        spec.setdefault(name, {}).update(values)
    path.write_text(yaml.safe_dump(spec), encoding="utf-8")
    return path


def set_model(job: Path, **keys) -> Path:
    """Set model keys (engine, quantization, ...) in a job file written by write_job (whose
    sections cannot name the `model` one)."""
    spec = yaml.safe_load(job.read_text())
    spec["model"].update(keys)
    job.write_text(yaml.safe_dump(spec))
    return job


def fast_job(tmp_path: Path, model: Path, name: str, **model_keys) -> Path:
    """A generate job `name` of 12 sample prompts on the fast engine, with these model keys."""
    job = write_job(
        tmp_path / f"{name}.yaml",
        model,
        write_jsonl(tmp_path / "in.jsonl", sample_prompts(12)),
        tmp_path / name,
        task={"max_new_tokens": 6},
    )
    return set_model(job, **{"engine": "fast", **model_keys})


def use_engine(job: Path, engine: str) -> Path:
    """Set model.engine in a job file written by write_job."""
    return set_model(job, engine=engine)


def sampled_job(folder: Path, model: Path, n_rows: int, task: dict, batching: dict):
    """A sampled generate job of `n_rows` sample prompts, many small batches and a part every
    4 rows; returns make(name) -> the job file writing to folder/<name>, and the outputs of
    one uninterrupted run of it."""
    inputs = write_jsonl(folder / "in.jsonl", sample_prompts(n_rows))

    def make(name: str) -> Path:
        return write_job(
            folder / f"{name}.yaml",
            model,
            inputs,
            folder / name,
            task=task,
            batching=batching,
            checkpoint={"every_rows": 4},
        )

    reference = make("reference")
    assert cli("run", str(reference)).exit_code == 0
    return make, read_outputs(folder / "reference")


def assert_every_id_once(out_dir: Path, reference: pa.Table, n_rows: int) -> None:
    """The outputs hold every id once and equal the uninterrupted run's (errors aside)."""
    got = read_outputs(out_dir)
    ids = got.column("id").to_pylist()
    assert len(ids) == len(set(ids)) == n_rows
    assert got.drop(["error"]).equals(reference.drop(["error"]))


def cli(*args: str):
    """Run the CLI in-process; returns click's Result (exit_code, output)."""
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def cli_again(*args: str) -> subprocess.CompletedProcess:
    """`cli` with a finished subprocess's shape (returncode; stdout and stderr both the whole
    output): the rerun after a killed child process, in this process, seconds sooner."""
    result = cli(*args)
    return subprocess.CompletedProcess(list(args), result.exit_code, result.output, result.output)


def cli_subprocess(*args: str, env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    """`python -m bulkinfer ARGS` in a child process; `env`: variables set beside child_env's."""
    return subprocess.run(
        [sys.executable, "-m", "bulkinfer", *args],
        capture_output=True,
        text=True,
        env={**child_env(), **(env or {})},
        **kwargs,
    )


def child_env() -> dict:
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env["OMP_NUM_THREADS"] = "1"
    return env


def read_outputs(out: Path) -> pa.Table:
    files = sorted((out / "outputs").glob("*.parquet"))
    assert files, f"no output files in {out}"
    return pa.concat_tables([pq.read_table(f) for f in files])


def write_input(tmp_path, fmt: str, rows: list[dict]):
    """rows as a JSONL file, a Parquet file or a Hugging Face save_to_disk folder."""
    if fmt == "saved":
        datasets = pytest.importorskip("datasets")
        datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
        return tmp_path / "saved"
    writer = write_jsonl if fmt == "jsonl" else write_parquet
    return writer(tmp_path / f"in.{fmt}", rows)


@contextmanager
def one_thread():
    """Run in-process torch work on one thread, as child processes do (child_env): float sums
    then match a subprocess's bit for bit."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)

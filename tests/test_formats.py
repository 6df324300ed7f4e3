"""Inputs in the formats people have (JSONL, Parquet, a saved Hugging Face dataset, files read
through `datasets`) give the same outputs; the output folder opens with `datasets` and
`pyarrow.dataset` as it is; a saved dataset checkpoints and resumes like a file."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from conftest import (
    child_env,
    cli,
    cli_again,
    read_outputs,
    sample_prompts,
    write_job,
    write_jsonl,
    write_parquet,
)

datasets = pytest.importorskip("datasets")  # every test here makes or reads its inputs with it

ROWS = sample_prompts(24)


def _run(job, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bulkinfer", "run", str(job)],
        env=env,
        capture_output=True,
        text=True,
    )


def _write_inputs(tmp_path) -> dict:
    """The same rows as JSONL, Parquet and a save_to_disk folder; the first two, a CSV file and
    a JSON array also through `datasets` (input.format hf)."""
    jsonl = write_jsonl(tmp_path / "in.jsonl", ROWS)
    parquet = write_parquet(tmp_path / "in.parquet", ROWS)
    saved = tmp_path / "saved"
    datasets.Dataset.from_list(ROWS).save_to_disk(str(saved), max_shard_size="2KB")
    csv = tmp_path / "in.csv"
    datasets.Dataset.from_list(ROWS).to_csv(str(csv), index=False)
    array = tmp_path / "array.json"
    array.write_text(json.dumps(ROWS, ensure_ascii=False, indent=1), encoding="utf-8")
    return {
        "jsonl": (jsonl, {}),
        "parquet": (parquet, {}),
        "saved": (saved, {}),
        "hf-jsonl": (jsonl, {"format": "hf"}),
        "hf-parquet": (parquet, {"format": "hf"}),
        "hf-csv": (csv, {"format": "hf"}),
        "hf-json-array": (array, {"format": "hf"}),
    }


@pytest.mark.parametrize("task", ["generate", "score"])
def test_every_input_format_gives_the_same_outputs(tmp_path, tiny_model, task):
    outputs = {}
    for name, (path, input_section) in _write_inputs(tmp_path).items():
        job = write_job(
            tmp_path / f"{name}.yaml",
            tiny_model,
            path,
            tmp_path / f"out-{name}",
            task={"type": task, "max_new_tokens": 4, "temperature": 0.7},
            input={"keep_columns": ["source"], **input_section},
        )
        result = cli("run", str(job))
        assert result.exit_code == 0, result.output
        outputs[name] = read_outputs(tmp_path / f"out-{name}")
    assert len(list((tmp_path / "saved").glob("*.arrow"))) > 1  # several shards, in order
    reference = outputs.pop("jsonl")
    assert reference.column("id").to_pylist() == [r["id"] for r in ROWS]
    assert reference.column("error").null_count == len(ROWS)
    for name, table in outputs.items():
        if name == "hf-csv":  # datasets reads CSV text as large_string
            assert table.schema.field("source").type == "large_string"
            table = table.cast(reference.schema)
        assert table.equals(reference), name


def test_a_run_through_datasets_keeps_pandas(tmp_path, tiny_model):
    """bulkinfer's own process tells pyarrow that pandas is absent (a start-up cost it never
    uses), except where `datasets` reads the input, which needs pandas: `python -m bulkinfer`
    with input.format hf gives the rows of a plain read."""
    inputs = _write_inputs(tmp_path)
    for name in ("jsonl", "hf-jsonl"):
        path, section = inputs[name]
        out = tmp_path / f"out-{name}"
        job = write_job(tmp_path / f"{name}.yaml", tiny_model, path, out, input=section)
        run = _run(job, child_env())
        assert run.returncode == 0, run.stderr[-2000:]
    assert read_outputs(tmp_path / "out-hf-jsonl").equals(read_outputs(tmp_path / "out-jsonl"))


def test_output_folder_opens_with_datasets_and_pyarrow_dataset(tmp_path, tiny_model):
    job = write_job(
        tmp_path / "job.yaml",
        tiny_model,
        write_jsonl(tmp_path / "in.jsonl", ROWS),
        tmp_path / "out",
        task={"n": 2, "temperature": 1.0, "logprobs": True, "max_new_tokens": 3},
        input={"keep_columns": ["source"]},
    )
    assert cli("run", str(job)).exit_code == 0
    expected = read_outputs(tmp_path / "out")
    outputs = tmp_path / "out" / "outputs"
    by_arrow = pads.dataset(str(outputs), format="parquet").to_table()
    assert by_arrow.equals(expected)
    # a cache of this test's own: one a run before filled at the same path would be read back
    cache = str(tmp_path / "hf-cache")
    loaded = datasets.load_dataset(
        "parquet", data_files=str(outputs / "*.parquet"), split="train", cache_dir=cache
    )
    assert loaded.column_names == expected.column_names
    assert loaded.num_rows == len(ROWS)
    assert loaded.to_list() == expected.to_pylist()
    # The whole job folder holds stats and checkpoint parts too; the dataset card at its root
    # points `load_dataset` at the outputs only.
    whole = datasets.load_dataset(str(tmp_path / "out"), split="train", cache_dir=cache)
    assert whole.to_list() == expected.to_pylist()


def test_saved_dataset_dict_split_and_resume_after_a_kill(tmp_path, tiny_model):
    rows = sample_prompts(40)
    folder = tmp_path / "dict"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(rows), "test": datasets.Dataset.from_list(rows[:3])}
    ).save_to_disk(str(folder))

    def job(name: str, **input_section):
        return write_job(
            tmp_path / f"{name}.yaml",
            tiny_model,
            folder,
            tmp_path / name,
            task={"temperature": 0.8, "max_new_tokens": 4},
            batching={"max_tokens": 300, "max_batch_size": 4},
            checkpoint={"every_rows": 4},
            input=input_section,
        )

    result = cli("run", str(job("nosplit")))
    assert result.exit_code == 2 and "splits train, test" in result.output
    assert cli("run", str(job("ref", split="train"))).exit_code == 0
    reference = read_outputs(tmp_path / "ref")
    assert reference.column("id").to_pylist() == [r["id"] for r in rows]
    killed = job("killed", split="train")
    env = {**child_env(), "BULKINFER_KILL_AT": "part_committed:3"}
    first = _run(killed, env)
    assert first.returncode == -signal.SIGKILL, first.stderr
    # mapping the loaded dataset writes a cache file into its folder: the rows are the same
    datasets.load_from_disk(str(folder))["train"].map(lambda row: {"extra": 1})
    assert list((folder / "train").glob("cache-*.arrow"))
    second = cli_again("run", str(killed))
    assert second.returncode == 0, second.stderr
    assert "resuming" in second.stderr
    assert read_outputs(tmp_path / "killed").equals(reference)
    # The dataset changed since the checkpoint: refused.
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:39])}).save_to_disk(
        str(tmp_path / "other")
    )
    for f in (folder / "train").iterdir():
        f.unlink()
    for f in (tmp_path / "other" / "train").iterdir():
        f.rename(folder / "train" / f.name)
    (tmp_path / "killed" / "summary.json").unlink()
    changed = cli_again("run", str(killed))
    assert changed.returncode == 2
    assert "input" in changed.stderr


def test_without_the_datasets_library(tmp_path, tiny_model):
    """A saved dataset is read without `datasets`; asking for it where it is missing is one line."""
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "datasets.py").write_text("raise ImportError('datasets is not installed here')\n")
    env = {**child_env(), "PYTHONPATH": str(blocker)}
    saved = tmp_path / "saved"
    datasets.Dataset.from_list(ROWS).save_to_disk(str(saved))
    job = write_job(tmp_path / "saved.yaml", tiny_model, saved, tmp_path / "out")
    run = _run(job, env)
    assert run.returncode == 0, run.stderr
    assert read_outputs(tmp_path / "out").num_rows == len(ROWS)
    jsonl = write_jsonl(tmp_path / "in.jsonl", ROWS)
    job = write_job(
        tmp_path / "hf.yaml", tiny_model, jsonl, tmp_path / "hf", input={"format": "hf"}
    )
    run = _run(job, env)
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert lines[-1].startswith("bulkinfer: error:") and "pip install datasets" in lines[-1]
    assert "Traceback" not in run.stderr


def test_saved_datasets_inside_a_folder_or_a_glob(tmp_path, tiny_model):
    data = tmp_path / "data"
    data.mkdir()
    datasets.Dataset.from_list(ROWS[:10]).save_to_disk(str(data / "a"))
    datasets.Dataset.from_list(ROWS[10:]).save_to_disk(str(data / "b"))
    outputs = []
    for name, path in (("folder", data), ("glob", data / "*")):
        job = write_job(
            tmp_path / f"{name}.yaml",
            tiny_model,
            path,
            tmp_path / f"out-{name}",
            task={"type": "score"},
        )
        result = cli("run", str(job))
        assert result.exit_code == 0, result.output
        outputs.append(read_outputs(tmp_path / f"out-{name}"))
    assert outputs[0].column("id").to_pylist() == [r["id"] for r in ROWS]
    assert outputs[0].equals(outputs[1])


def test_empty_inputs_beside_others_are_passed_over_through_datasets_too(tmp_path, tiny_model):
    """An empty file among others is passed over; a saved empty dataset (datasets writes no
    data file for it) and, with format hf, an empty JSONL, a header-only CSV or a Parquet file
    of no rows failed the whole job, each with its own puzzling message."""
    data = tmp_path / "data"
    data.mkdir()
    datasets.Dataset.from_list(ROWS[:10]).save_to_disk(str(data / "a"))
    datasets.Dataset.from_dict({"id": [], "prompt": []}).save_to_disk(str(data / "b"))
    hf = tmp_path / "hf"
    hf.mkdir()
    write_jsonl(hf / "a.jsonl", ROWS[:10])
    (hf / "b.jsonl").write_text("\n")
    (hf / "c.csv").write_text("id,prompt\n")
    empty = {"id": pa.array([], pa.string()), "prompt": pa.array([], pa.string())}
    pq.write_table(pa.table(empty), hf / "d.parquet")
    for name, path, section in (("saved", data, {}), ("hf", hf, {"format": "hf"})):
        job = write_job(
            tmp_path / f"{name}.yaml",
            tiny_model,
            path,
            tmp_path / f"out-{name}",
            task={"type": "score"},
            input=section,
        )
        result = cli("run", str(job))
        assert result.exit_code == 0, result.output
        assert read_outputs(tmp_path / f"out-{name}").column("id").to_pylist() == [
            r["id"] for r in ROWS[:10]
        ]
    job = write_job(tmp_path / "empty.yaml", tiny_model, data / "b", tmp_path / "out-empty")
    result = cli("run", str(job))
    assert result.exit_code == 2
    assert "the input has no rows" in result.output.splitlines()[-1]


def test_validate_reads_a_csv_file_through_datasets(tmp_path, tiny_model):
    """validate checks a file only `datasets` reads as run reads it: a CSV file's rows
    counted, a column it lacks named; without input.format hf a CSV file is refused in one line
    saying how to read it (it was read as JSONL)."""
    csv = tmp_path / "in.csv"
    datasets.Dataset.from_list(ROWS).to_csv(str(csv), index=False)
    job = write_job(
        tmp_path / "job.yaml", tiny_model, csv, tmp_path / "out", input={"format": "hf"}
    )
    result = cli("validate", str(job))
    assert result.exit_code == 0, result.output
    assert f"1 file, {len(ROWS)} rows" in result.output
    job = write_job(
        tmp_path / "bad.yaml",
        tiny_model,
        csv,
        tmp_path / "out",
        input={"format": "hf", "keep_columns": ["nope"]},
    )
    result = cli("validate", str(job))
    assert result.exit_code == 2 and "no column 'nope'" in result.output, result.output
    job = write_job(tmp_path / "auto.yaml", tiny_model, csv, tmp_path / "out")
    result = cli("validate", str(job))
    assert result.exit_code == 2 and "input.format: hf" in result.output, result.output


def test_a_csv_row_without_an_id_is_named(tmp_path, tiny_model):
    """pandas reads a CSV column of integer ids with a gap as floats: the error blamed the first
    row ('the id is a float') instead of the one without an id."""
    csv = tmp_path / "rows.csv"
    csv.write_text("id,prompt\n1,hello a\n2,hello b\n,hello c\n4,hello d\n")
    job = write_job(
        tmp_path / "job.yaml", tiny_model, csv, tmp_path / "out", input={"format": "hf"}
    )
    result = cli("run", str(job))
    assert result.exit_code == 2, result.output
    assert "rows.csv: row 2: the id is missing" in result.output.splitlines()[-1]

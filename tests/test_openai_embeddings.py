"""OpenAI Batch files with `/v1/embeddings` requests: beside chat and completions requests in a
generate job, or alone in an embed job; vectors as the Embeddings API shapes them (floats or
base64), and the failed requests in OUT/errors.jsonl as the Batch API's error file."""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import child_env, cli, read_outputs, use_engine, write_job, write_jsonl
from test_embed import direct_embeddings
from tiny_model import build_tiny_encoder
from transformers import AutoConfig

SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}},
    "required": ["ok"],
    "additionalProperties": False,
}


def _request(custom_id: str, url: str, **body) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body}


def _embedding(custom_id: str, **body) -> dict:
    return _request(custom_id, "/v1/embeddings", model="text-embedding-3-small", **body)


def _mixed(dim: int) -> list[dict]:
    messages = [{"role": "user", "content": "Say something"}]
    return [
        _request("chat", "/v1/chat/completions", messages=messages, max_tokens=5),
        _request(
            "completion",
            "/v1/completions",
            prompt="Is the sky blue?",
            max_tokens=40,
            response_format={"type": "json_schema", "json_schema": {"schema": SCHEMA}},
        ),
        _embedding("one", input="The quick brown fox"),
        _embedding("many", input=["Ünïcode text 東京", "a", "three words here"], dimensions=dim),
        _embedding("b64", input=["base64 please"], encoding_format="base64"),
        _embedding("smaller", input="x y z", dimensions=dim // 2),
        _embedding("tokens", input=[[1, 2, 3]]),
        _embedding("empty", input=[]),
        _embedding("format", input="x", encoding_format="int8"),
        _request("image", "/v1/images/generations", prompt="a cat"),
        _request("bad-chat", "/v1/chat/completions", messages=[]),
    ]


FAILED = {
    "smaller": "body.dimensions",
    "tokens": "body.input[0]",
    "empty": "body.input must be",
    "format": "body.encoding_format",
    "image": "/v1/images/generations",
    "bad-chat": "body.messages",
}


def _run(tmp_path, model, requests, name, **task):
    job = write_job(
        tmp_path / f"{name}.yaml",
        model,
        write_jsonl(tmp_path / f"{name}.jsonl", requests),
        tmp_path / name,
        task={"max_new_tokens": 48, "chat_template": "never", **task}
        if "type" not in task
        else {"max_new_tokens": 128, **task},
    )
    return job


def _lines(path) -> dict[str, dict]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return {r["custom_id"]: r for r in map(json.loads, lines)}


def _vectors(line: dict) -> list[np.ndarray]:
    out = []
    for k, item in enumerate(line["response"]["body"]["data"]):
        assert item["object"] == "embedding" and item["index"] == k
        value = item["embedding"]
        if isinstance(value, str):
            value = np.frombuffer(base64.b64decode(value), dtype="<f4")
        out.append(np.asarray(value, dtype=np.float32))
    return out


@pytest.mark.parametrize("engine", ["reference", "fast"])
def test_a_mixed_batch_file_answers_every_request(tmp_path, tiny_model, engine):
    dim = AutoConfig.from_pretrained(tiny_model).hidden_size
    requests = _mixed(dim)
    job = _run(tmp_path, tiny_model, requests, "out")
    use_engine(job, engine)
    result = cli("--log-format", "json", "run", str(job))
    assert result.exit_code == 0, result.output
    events = [json.loads(line) for line in result.output.splitlines() if line.startswith("{")]
    progress = [e for e in events if e["event"] == "progress"]
    # the requests with nothing to generate count as done (the last line read 2/6 rows)
    assert progress[-1]["rows_done"] == progress[-1]["rows_total"] > 2, progress
    responses = _lines(tmp_path / "out" / "responses.jsonl")
    assert list(responses) == [r["custom_id"] for r in requests]  # one line each, in order

    chat = responses["chat"]["response"]["body"]
    assert chat["object"] == "chat.completion" and responses["chat"]["error"] is None
    completion = responses["completion"]["response"]["body"]["choices"][0]
    if completion["finish_reason"] == "stop":
        assert set(json.loads(completion["text"])) == {"ok"}

    # embeddings: the last token's final hidden state, normalised, each input on its own
    texts = {"one": ["The quick brown fox"], "many": requests[3]["body"]["input"]}
    texts["b64"] = ["base64 please"]
    for custom_id, inputs in texts.items():
        line = responses[custom_id]
        assert line["error"] is None and line["response"]["status_code"] == 200
        body = line["response"]["body"]
        assert body["object"] == "list" and body["model"] == tiny_model.name
        got = _vectors(line)
        expected = direct_embeddings(tiny_model, inputs, "last", True)
        assert len(got) == len(inputs) and all(len(v) == dim for v in got)
        np.testing.assert_allclose(np.stack(got), expected, atol=2e-5)
        assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 0
    assert isinstance(responses["b64"]["response"]["body"]["data"][0]["embedding"], str)

    errors = _lines(tmp_path / "out" / "errors.jsonl")
    assert list(errors) == [r["custom_id"] for r in requests if r["custom_id"] in FAILED]
    for custom_id, fragment in FAILED.items():
        line = errors[custom_id]
        assert line == responses[custom_id]  # the same line in both files
        assert line["response"]["status_code"] == 400
        assert line["response"]["body"]["error"]["type"] == "invalid_request_error"
        assert fragment in line["error"]["message"], (custom_id, line["error"])
    rows = {r["id"]: r for r in read_outputs(tmp_path / "out").to_pylist()}
    assert rows["many"]["text"] is None and len(rows["many"]["embedding"]) == 3
    assert rows["b64"]["encoding_format"] == "base64"
    # the summary counts every input of a request, as the rows and their usage do
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["input_tokens"] == sum(r["prompt_tokens"] or 0 for r in rows.values())


def test_an_embed_job_answers_embeddings_requests_and_refuses_the_rest(tmp_path):
    encoder = build_tiny_encoder(tmp_path / "bert")
    requests = [
        _embedding("a", input=["first text", "second, longer text than the first"]),
        _request("chat", "/v1/chat/completions", messages=[{"role": "user", "content": "hi"}]),
        _embedding("b", input="third"),
        _embedding("c", input="refused as its batch runs " * 8, dimensions=7),
    ]
    job = _run(tmp_path, encoder, requests, "out", type="embed", pooling="mean", normalize=True)
    result = cli("run", str(job))
    assert result.exit_code == 0, result.output
    responses = _lines(tmp_path / "out" / "responses.jsonl")
    for custom_id, inputs in [("a", requests[0]["body"]["input"]), ("b", ["third"])]:
        expected = direct_embeddings(encoder, inputs, "mean", True)
        np.testing.assert_allclose(np.stack(_vectors(responses[custom_id])), expected, atol=2e-5)
    errors = _lines(tmp_path / "out" / "errors.jsonl")
    assert list(errors) == ["chat", "c"]
    assert "task.type embed answers embeddings" in errors["chat"]["error"]["message"]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    usage = [responses[k]["response"]["body"]["usage"]["prompt_tokens"] for k in ("a", "b")]
    assert summary["input_tokens"] == sum(usage)
    stats = pq.read_table(tmp_path / "out" / "stats" / "batches.parquet").to_pylist()
    assert all(s["padded_tokens"] >= s["real_tokens"] for s in stats)


def test_a_batch_file_without_failures_has_an_empty_error_file(tmp_path, tiny_model):
    requests = [_embedding("a", input="hello"), _embedding("b", input=["x", "y"])]
    job = _run(tmp_path, tiny_model, requests, "out")
    assert cli("run", str(job)).exit_code == 0
    assert len(_lines(tmp_path / "out" / "responses.jsonl")) == 2
    assert (tmp_path / "out" / "errors.jsonl").read_text() == ""


def test_parts_of_an_earlier_version_resume_with_the_new_columns_null(tmp_path, tiny_model):
    """A folder whose committed parts predate the embeddings and top_logprobs columns (an
    earlier version wrote them) resumes: those rows get nulls in the new columns."""
    messages = [{"role": "user", "content": "hi"}]
    requests = [
        _request(f"c{i}", "/v1/chat/completions", messages=messages, max_tokens=3)
        for i in range(40)
    ]
    job = _run(tmp_path, tiny_model, requests, "out")
    args = ["--set", "batching.max_batch_size=4", "--set", "checkpoint.every_rows=4"]
    env = {**child_env(), "BULKINFER_KILL_AT": "part_committed:1"}
    killed = subprocess.run(
        [sys.executable, "-m", "bulkinfer", "run", str(job), *args], env=env, capture_output=True
    )
    assert killed.returncode == -9
    folder = tmp_path / "out" / "checkpoint"
    manifest = folder / "manifest.jsonl"
    records = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert len(records) == 1 and records[0]["rows"] < len(requests)
    part = folder / "parts" / records[0]["file"]
    table = pq.read_table(part)  # as an earlier version wrote it, without the new columns
    new = ("top_logprobs", "embedding", "encoding_format")
    pq.write_table(table.select([n for n in table.column_names if n not in new]), part)
    records[0]["sha256"] = hashlib.sha256(part.read_bytes()).hexdigest()
    manifest.write_text("".join(json.dumps(r) + "\n" for r in records))
    result = cli("run", str(job), *args)
    assert result.exit_code == 0 and "resuming:" in result.output, result.output
    assert "batches already done" in result.output
    rows = read_outputs(tmp_path / "out").to_pylist()
    assert [r["id"] for r in rows] == [r["custom_id"] for r in requests]
    assert all(r["text"] is not None and r["embedding"] is None for r in rows)
    assert len(_lines(tmp_path / "out" / "responses.jsonl")) == 40

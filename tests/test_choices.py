"""Choices scoring: each candidate's log-likelihood given the prompt, computed with the prompt run
once, must equal scoring prompt + choice as a completion on its own."""

from __future__ import annotations

import pytest
from conftest import cli, read_outputs, write_job, write_jsonl, write_parquet
from tiny_model import build_tiny_model

QUESTIONS = [
    {"id": "q1", "prompt": "The capital of France is", "choices": [" Paris", " Lyon", " 東京"]},
    {"id": "q2", "prompt": "1 2 3 4", "choices": [" 5", " 6 7 8 9 10", " dog", " 42"]},
    {"id": "q3", "prompt": "Q", "choices": [" quick brown fox"]},  # a one-token prompt
    {
        "id": "q4",
        "prompt": "Über den Wolken muss die Freiheit wohl grenzenlos sein. " * 3,
        "choices": ["Émilie", " 😀", "\n"],
    },
    {"id": "q5", "prompt": "def add(a, b):", "choices": ["\n    return a + b", " pass"]},
]
BAD = [
    {"id": "string", "prompt": "x y", "choices": "not a list"},
    {"id": "empty", "prompt": "x y", "choices": []},
    {"id": "number", "prompt": "x y", "choices": [" a", 3]},
    {"id": "blank", "prompt": "x y", "choices": [" a", ""]},
    {"id": "null", "prompt": "x y", "choices": None},
    {"id": "long", "prompt": "x y", "choices": [" a", " word" * 600]},
    {"id": "spaces", "prompt": " \n ", "choices": [" a"]},
]


def _score(tmp_path, model, path, name, input_section):
    job = write_job(
        tmp_path / f"{name}.yaml",
        model,
        path,
        tmp_path / name,
        task={"type": "score"},
        input=input_section,
        batching={"max_tokens": 200, "max_batch_size": 3},
    )
    result = cli("run", str(job))
    assert result.exit_code == 0, result.output
    return read_outputs(tmp_path / name).to_pylist()


@pytest.mark.parametrize("model_name", ["tiny_model", "tiny_gpt2", "gemma2", "mistral"])
def test_choices_equal_scoring_each_completion_alone(tmp_path, model_name, request):
    if model_name in ("tiny_model", "tiny_gpt2"):
        model = request.getfixturevalue(model_name)
    else:  # sliding-window attention, and logit soft-capping (gemma2)
        model = build_tiny_model(tmp_path / model_name, arch=model_name)
    rows = QUESTIONS + BAD
    out = _score(
        tmp_path,
        model,
        write_jsonl(tmp_path / "mc.jsonl", rows),
        "mc",
        {"choices_column": "choices"},
    )
    pairs = [
        {"id": f"{q['id']}/{k}", "prompt": q["prompt"], "completion": c}
        for q in QUESTIONS
        for k, c in enumerate(q["choices"])
    ]
    alone = _score(
        tmp_path,
        model,
        write_jsonl(tmp_path / "pairs.jsonl", pairs),
        "pairs",
        {"completion_column": "completion"},
    )
    by_id = {r["id"]: r for r in alone}
    assert [r["id"] for r in out] == [r["id"] for r in rows]
    for q, got in zip(QUESTIONS, out, strict=False):
        assert got["error"] is None, got["error"]
        expected = [by_id[f"{q['id']}/{k}"] for k in range(len(q["choices"]))]
        assert got["choice_logprobs"] == pytest.approx(
            [e["logprob_sum"] for e in expected], abs=1e-4
        )
        assert got["choice_tokens"] == [e["scored_tokens"] for e in expected]
        sums, means = got["choice_logprobs"], got["choice_logprob_means"]
        assert got["best_choice"] == sums.index(max(sums))
        assert got["best_choice_norm"] == means.index(max(means))
    errors = {r["id"]: r["error"] for r in out[len(QUESTIONS) :]}
    assert "expected a non-empty list of strings" in errors["string"]
    assert "empty list" in errors["empty"]
    assert "choice 1 is an integer" in errors["number"]
    assert "choice 1 is an empty string" in errors["blank"]
    assert "choices is null" in errors["null"]
    assert errors["long"].startswith("prompt with its longest choice has ")
    assert "more than the model's context of 512" in errors["long"]
    assert errors["spaces"] == "prompt is empty (only whitespace)"
    assert all(r["choice_logprobs"] is None for r in out[len(QUESTIONS) :])


def test_choices_from_parquet_and_choices_with_generate_refused(tmp_path, tiny_model):
    path = write_parquet(tmp_path / "mc.parquet", QUESTIONS)
    out = _score(tmp_path, tiny_model, path, "mc", {"choices_column": "choices"})
    assert [len(r["choice_logprobs"]) for r in out] == [len(q["choices"]) for q in QUESTIONS]
    job = write_job(
        tmp_path / "gen.yaml",
        tiny_model,
        path,
        tmp_path / "gen",
        input={"choices_column": "choices"},
    )
    result = cli("run", str(job))
    assert result.exit_code == 2
    assert "choices_column" in result.output and "score" in result.output

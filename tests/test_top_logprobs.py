"""Each generated token's most likely alternatives (`top_logprobs`): from OpenAI chat and
completions requests and from the job spec, the same on both engines and as transformers
computes them."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import cli, read_outputs, sample_prompts, use_engine, write_job, write_jsonl
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode


def _requests() -> list[dict]:
    def chat(i, **body):
        messages = [{"role": "user", "content": f"Name a colour ({i})"}]
        return {
            "custom_id": f"chat-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"messages": messages, "max_tokens": 6, **body},
        }

    return [
        chat(0, logprobs=True, top_logprobs=5),
        chat(1, logprobs=True, top_logprobs=20, temperature=0.8, seed=2),
        chat(2, logprobs=True),
        chat(3),
        chat(4, top_logprobs=2),  # alternatives without logprobs: refused, as the API does
        {
            "custom_id": "completion",
            "method": "POST",
            "url": "/v1/completions",
            "body": {"prompt": "The quick brown", "max_tokens": 5, "logprobs": 3},
        },
    ]


def _responses(tmp_path, model, engine: str) -> dict[str, dict]:
    job = write_job(
        tmp_path / f"{engine}.yaml",
        model,
        write_jsonl(tmp_path / "in.jsonl", _requests()),
        tmp_path / engine,
        task={"max_new_tokens": 8, "chat_template": "never"},
    )
    use_engine(job, engine)
    result = cli("run", str(job))
    assert result.exit_code == 0, result.output
    lines = (tmp_path / engine / "responses.jsonl").read_text(encoding="utf-8").splitlines()
    return {r["custom_id"]: r for r in map(json.loads, lines)}


def test_requests_get_their_top_alternatives_on_both_engines(tmp_path, tiny_model):
    got = {e: _responses(tmp_path, tiny_model, e) for e in ("reference", "fast")}
    for engine, by_id in got.items():
        for custom_id, k in [("chat-0", 5), ("chat-1", 20)]:
            content = by_id[custom_id]["response"]["body"]["choices"][0]["logprobs"]["content"]
            assert content, (engine, custom_id)
            for entry in content:
                alternatives = entry["top_logprobs"]
                assert len(alternatives) == k
                values = [a["logprob"] for a in alternatives]
                assert values == sorted(values, reverse=True)
                assert entry["logprob"] <= values[0] + 1e-5
                # a token that is part of a character has its own bytes, not U+FFFD's
                assert all(
                    a["bytes"] == list(a["token"].encode()) or "\ufffd" in a["token"]
                    for a in alternatives
                )
            if custom_id == "chat-0":  # greedy: the chosen token is the most likely one
                assert all(e["token"] == e["top_logprobs"][0]["token"] for e in content)
        plain = by_id["chat-2"]["response"]["body"]["choices"][0]["logprobs"]["content"]
        assert all(entry["top_logprobs"] == [] for entry in plain)
        assert by_id["chat-3"]["response"]["body"]["choices"][0]["logprobs"] is None
        refused = by_id["chat-4"]
        assert refused["response"]["status_code"] == 400
        assert "body.top_logprobs needs body.logprobs" in refused["error"]["message"]
        completion = by_id["completion"]["response"]["body"]["choices"][0]["logprobs"]
        assert len(completion["top_logprobs"]) == len(completion["tokens"])
        assert all(1 <= len(m) <= 3 for m in completion["top_logprobs"])
    # the engines agree: the same tokens, alternatives and log-probs
    for custom_id in ("chat-0", "chat-1", "completion"):
        a, b = (got[e][custom_id]["response"]["body"]["choices"][0] for e in got)
        if "content" in (a["logprobs"] or {}):
            for x, y in zip(a["logprobs"]["content"], b["logprobs"]["content"], strict=True):
                assert [t["token"] for t in x["top_logprobs"]] == [
                    t["token"] for t in y["top_logprobs"]
                ]
                for s, t in zip(x["top_logprobs"], y["top_logprobs"], strict=True):
                    assert s["logprob"] == pytest.approx(t["logprob"], abs=1e-4)
        else:
            assert a["logprobs"]["tokens"] == b["logprobs"]["tokens"]


def test_completion_alternatives_match_transformers(tmp_path, tiny_model):
    """The first generated token's alternatives are the top of the model's next-token
    distribution after the raw prompt."""
    by_id = _responses(tmp_path, tiny_model, "fast")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    ids = tokenizer("The quick brown", return_tensors="pt")
    with torch.no_grad():
        logits = model(**ids).logits[0, -1].float()
    values, top = logits.log_softmax(-1).topk(3)
    byte_of = {c: b for b, c in bytes_to_unicode().items()}  # the byte-level vocabulary's

    def shown(token_id: int) -> str:  # a piece of a character as the legacy API writes it
        text = tokenizer.decode([token_id])
        if "\ufffd" not in text:
            return text
        raw = bytes(byte_of[c] for c in tokenizer.convert_ids_to_tokens(token_id))
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)

    expected = {shown(t): v for t, v in zip(top.tolist(), values.tolist(), strict=True)}
    assert any(key.startswith("bytes:") for key in expected)  # the case this checks
    first = by_id["completion"]["response"]["body"]["choices"][0]["logprobs"]["top_logprobs"][0]
    assert set(first) == set(expected)
    for token, value in expected.items():
        assert first[token] == pytest.approx(value, abs=1e-4)


@pytest.mark.parametrize("engine", ["reference", "fast"])
def test_job_spec_top_logprobs_column(tmp_path, tiny_model, engine):
    inputs = write_jsonl(tmp_path / "in.jsonl", sample_prompts(5))
    job = write_job(
        tmp_path / "job.yaml",
        tiny_model,
        inputs,
        tmp_path / "out",
        task={"max_new_tokens": 5, "top_logprobs": 4},
    )
    use_engine(job, engine)
    result = cli("run", str(job))
    assert result.exit_code == 0, result.output
    for row in read_outputs(tmp_path / "out").to_pylist():
        assert len(row["top_logprobs"]) == row["output_tokens"] == len(row["token_logprobs"])
        for chosen, alternatives in zip(row["token_ids"], row["top_logprobs"], strict=True):
            assert len(alternatives) == 4
            assert chosen == alternatives[0]["token_id"]  # greedy
    bad = cli("run", str(job), "--set", "task.top_logprobs=21")
    assert bad.exit_code == 2 and "task.top_logprobs: 21 must be from 0 to 20" in bad.output

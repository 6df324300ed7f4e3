"""Generation extras: n samples per prompt, per-token log-probs, stop strings with both, and
per-row sampling settings."""

from __future__ import annotations

import pytest
import torch
from conftest import cli, read_outputs, sample_prompts, set_model, write_job, write_jsonl
from transformers import AutoModelForCausalLM, AutoTokenizer

from bulkinfer.engines.sampling import RowSampling, SamplingParams, choose_next_tokens


def _run(tmp_path, model, rows, name, task, batching=None):
    job = write_job(
        tmp_path / f"{name}.yaml",
        model,
        tmp_path / "in.jsonl",
        tmp_path / name,
        task={"chat_template": "never", **task},
        **({"batching": batching} if batching else {}),
    )
    if not (tmp_path / "in.jsonl").exists():
        write_jsonl(tmp_path / "in.jsonl", rows)
    result = cli("run", str(job))
    assert result.exit_code == 0, result.output
    return read_outputs(tmp_path / name).to_pylist()


def test_n_samples_are_lists_reproducible_whatever_the_batch(tmp_path, tiny_model):
    rows = sample_prompts(10)
    sampled = {"max_new_tokens": 6, "temperature": 1.0, "seed": 7, "n": 3}
    big = _run(tmp_path, tiny_model, rows, "big", sampled, {"max_batch_size": 8})
    alone = _run(tmp_path, tiny_model, rows, "alone", sampled, {"max_batch_size": 1})
    one = _run(tmp_path, tiny_model, rows, "one", {**sampled, "n": 1}, {"max_batch_size": 3})
    assert [r["id"] for r in big] == [r["id"] for r in rows]
    for a, b, c in zip(big, alone, one, strict=True):
        assert len(a["text"]) == len(a["output_tokens"]) == len(a["finish_reason"]) == 3
        assert a["text"] == b["text"] and a["output_tokens"] == b["output_tokens"]
        assert a["text"][0] == c["text"]  # sample 0 is the row's single sample
    distinct = sum(len(set(r["text"])) > 1 for r in big)
    assert distinct >= 5, "samples of one prompt should differ at temperature 1"


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_token_logprobs_equal_a_direct_computation(tmp_path, tiny_model, temperature):
    rows = sample_prompts(8)
    task = {"max_new_tokens": 7, "temperature": temperature, "logprobs": True}
    out = _run(tmp_path, tiny_model, rows, "lp", task)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    for row, got in zip(rows, out, strict=True):
        prompt = tokenizer(row["prompt"])["input_ids"]
        generated = got["token_ids"]
        assert len(generated) == len(got["token_logprobs"]) == len(got["tokens"])
        assert got["output_tokens"] == len(generated)
        ids = torch.tensor([prompt + generated])
        with torch.no_grad():
            logprobs = model(ids).logits[0].float().log_softmax(-1)
        positions = range(len(prompt) - 1, len(prompt) + len(generated) - 1)
        direct = [logprobs[p, t].item() for p, t in zip(positions, generated, strict=True)]
        assert got["token_logprobs"] == pytest.approx(direct, abs=1e-4)
        # Tokens are decoded one by one: a token holding part of a UTF-8 character shows U+FFFD.
        if "\ufffd" not in "".join(got["tokens"]):
            assert "".join(got["tokens"]) == tokenizer.decode(generated)


def test_stop_strings_with_n_and_logprobs(tmp_path, tiny_model):
    rows = sample_prompts(12)
    free = _run(tmp_path, tiny_model, rows, "free", {"max_new_tokens": 8, "temperature": 1.0})
    # A stop string that the free run produced in a few rows, mid-text.
    stop = next(r["text"][2:4] for r in free if len(r["text"].strip()) > 5)
    task = {
        "max_new_tokens": 8,
        "temperature": 1.0,
        "n": 2,
        "logprobs": True,
        "stop": [stop],
    }
    out = _run(tmp_path, tiny_model, rows, "stopped", task)
    hits = 0
    for got, before in zip(out, free, strict=True):
        for k in range(2):
            text, reason = got["text"][k], got["finish_reason"][k]
            assert stop not in text
            assert len(got["token_logprobs"][k]) == got["output_tokens"][k]
            if k == 0 and stop in before["text"]:
                assert text == before["text"][: before["text"].index(stop)]
                assert reason == "stop"
                hits += 1
    assert hits >= 1


def test_per_row_sampling_equals_one_setting_at_a_time():
    torch.manual_seed(0)
    logits = torch.randn(6, 50) * 3
    keys = torch.arange(6, dtype=torch.int64) * 1_000_003 + 5
    settings = [
        SamplingParams(4, temperature=0.0),
        SamplingParams(4, temperature=1.0),
        SamplingParams(4, temperature=0.7, top_p=0.5),
        SamplingParams(4, temperature=1.3, top_k=3),
        SamplingParams(4, temperature=0.9, top_k=10, top_p=0.8),
        SamplingParams(4, temperature=2.0, top_p=1.0),
    ]
    for step in range(5):
        together = choose_next_tokens(logits, RowSampling.of(settings, logits.device), keys, step)
        for i, params in enumerate(settings):
            alone = choose_next_tokens(logits[i : i + 1], params, keys[i : i + 1], step)
            assert together[i].item() == alone.item(), (step, i)


def test_a_learned_position_table_is_not_run_past_by_finished_rows(tmp_path):
    """GPT-2 (n_positions 32): rows of a padded batch that finished early stepped on past the
    position table while longer rows went on; the IndexError split the batch as if memory had
    run out ('5 out-of-memory splits'). A max_context past the table made every row fail."""
    import json

    from tiny_model import build_tiny_model

    model = build_tiny_model(tmp_path / "gpt2", arch="gpt2", max_context=32)
    rows = [{"id": i, "prompt": "the fox " * (1 + i % 7)} for i in range(16)]
    task = {"max_new_tokens": 40}
    batched = _run(tmp_path, model, rows, "batched", task, {"max_batch_size": 8})
    alone = _run(tmp_path, model, rows, "alone", task, {"max_batch_size": 1})
    summary = json.loads((tmp_path / "batched" / "summary.json").read_text())
    assert summary["oom_splits"] == 0 and summary["rows_by_status"]["ok"] == 16, summary
    for a, b in zip(batched, alone, strict=True):
        assert a["error"] is None and a["text"] == b["text"]
        assert a["prompt_tokens"] + a["output_tokens"] == 32  # to the end of the table
    job = write_job(tmp_path / "long.yaml", model, tmp_path / "in.jsonl", tmp_path / "long")
    set_model(job, max_context=128)
    for command in ("validate", "run"):
        result = cli(command, str(job))
        assert result.exit_code == 2, result.output
        assert "model.max_context: 128 is more than the 32 positions" in result.output
        assert "Traceback" not in result.output


def test_several_greedy_samples_are_warned_of(tmp_path, tiny_model):
    """`n: 2` at the default temperature 0 gave two equal copies of every answer, silently."""
    write_jsonl(tmp_path / "in.jsonl", sample_prompts(2))
    job = write_job(
        tmp_path / "job.yaml",
        tiny_model,
        tmp_path / "in.jsonl",
        tmp_path / "out",
        task={"max_new_tokens": 3, "n": 2},
    )
    result = cli("run", str(job))
    assert result.exit_code == 0, result.output
    assert "task.n: 2 samples at temperature 0 are greedy, so all equal" in result.output
    for row in read_outputs(tmp_path / "out").to_pylist():
        assert row["text"][0] == row["text"][1]


@pytest.mark.parametrize("engine", ["reference", "fast"])
def test_a_stop_string_naming_a_special_token_ends_the_row(tmp_path, tiny_model, engine):
    # A model whose final norm is zero scores every token alike, so greedy picks id 0 at
    # every step: <|endoftext|>, a special token that is not the end token. Decoded text drops
    # it, so a stop string of its text can only match by the token.
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    with torch.no_grad():
        model.model.norm.weight.zero_()
    model.save_pretrained(tmp_path / "model")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.save_pretrained(tmp_path / "model")
    assert tokenizer.convert_ids_to_tokens(0) == "<|endoftext|>" != tokenizer.eos_token
    rows = sample_prompts(3)
    free = _run(tmp_path, tmp_path / "model", rows, f"free-{engine}", {"max_new_tokens": 5})
    assert [r["finish_reason"] for r in free] == ["length"] * 3
    job = write_job(
        tmp_path / f"stop-{engine}.yaml",
        tmp_path / "model",
        tmp_path / "in.jsonl",
        tmp_path / f"stop-{engine}",
        task={"chat_template": "never", "max_new_tokens": 5, "stop": ["<|endoftext|>"]},
    )
    assert cli("run", str(set_model(job, engine=engine))).exit_code == 0
    out = read_outputs(tmp_path / f"stop-{engine}").to_pylist()
    assert [(r["text"], r["finish_reason"]) for r in out] == [("", "stop")] * 3
    assert [r["output_tokens"] for r in out] == [1] * 3

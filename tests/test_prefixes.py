"""Shared prompt prefixes: the rows of a few-shot job are found to share their instruction, as
long as their tokens really agree, by `bulkinfer plan` and in job.json; a job without one
reports none and plans the same batches. The fast engine computes a shared prefix once (or
copies it from a row in flight) and every row's outputs equal computing it whole, also across
kills, resumes and shards."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import numpy as np
import pytest
from conftest import (
    child_env,
    cli,
    cli_subprocess,
    read_outputs,
    sample_prompts,
    use_engine,
    write_job,
    write_jsonl,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from bulkinfer.prepare.prefixes import PrefixFinder, prefix_groups

INSTRUCTION = (
    "You grade answers. Read the rubric, then the answer, and reply with one word: pass or "
    "fail. Rubric: the answer names the right city, spells it correctly, gives one fact about "
    "it and stays under forty words. Examples follow. "
) * 2


def _few_shot_rows(shared: int, alone: int, alone_chars: int | None = None) -> list[dict]:
    """`shared` rows of INSTRUCTION and a short answer each, then `alone` rows of their own."""
    rows = [
        {"id": f"r{i}", "prompt": INSTRUCTION + f"Answer {i}: {r['prompt'][:80]}"}
        for i, r in enumerate(sample_prompts(shared))
    ]
    return rows + [
        {"id": f"x{i}", "prompt": r["prompt"][:alone_chars]}
        for i, r in enumerate(sample_prompts(alone))
    ]


def _common_prefix(rows: list[np.ndarray]) -> int:
    """Tokens every row shares with the first, each row keeping one of its own."""
    shared = len(rows[0]) - 1
    for row in rows[1:]:
        n = min(shared, len(row) - 1)
        differ = np.flatnonzero(row[:n] != rows[0][:n])
        shared = int(differ[0]) if len(differ) else n
    return shared


@settings(max_examples=60, deadline=None)
@given(
    data=st.data(),
    prefixes=st.lists(st.integers(min_value=0, max_value=40), min_size=1, max_size=4),
    chunk=st.integers(min_value=1, max_value=9),
)
def test_groups_are_the_rows_that_share_their_first_tokens(data, prefixes, chunk):
    """Random rows built from a few random prefixes (some shorter than the minimum) and random
    tails, fed in chunks of any size: a group is exactly the rows of one long prefix, and its
    length is the tokens its rows share."""
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    minimum = 8
    starts = [rng.integers(0, 5, size=n) for n in prefixes]
    owner = data.draw(st.lists(st.integers(0, len(prefixes) - 1), min_size=1, max_size=40))
    rows = [np.concatenate([starts[k], rng.integers(0, 5, size=rng.integers(1, 6))]) for k in owner]
    finder = PrefixFinder(minimum)
    for k in range(0, len(rows), chunk):
        piece = rows[k : k + chunk]
        finder.add(np.concatenate(piece).astype(np.int32), np.array([len(r) for r in piece]))
    heads, shared = finder.finish()
    if heads is None:
        assert all(len(r) <= minimum for r in rows)
        return
    groups = prefix_groups(heads, shared, np.arange(len(rows)), minimum)
    long_rows = [i for i, r in enumerate(rows) if len(r) > minimum]
    by_head: dict[tuple, list[int]] = {}
    for i in long_rows:
        by_head.setdefault(tuple(rows[i][:minimum]), []).append(i)
    expected = sorted(sorted(m) for m in by_head.values() if len(m) > 1)
    found = sorted(
        sorted(np.flatnonzero(groups.labels == g).tolist()) for g in range(len(groups.rows))
    )
    assert found == expected
    for g in range(len(groups.rows)):
        members = np.flatnonzero(groups.labels == g)
        assert groups.rows[g] == len(members)
        assert groups.prefix_tokens[g] == _common_prefix([rows[i] for i in members])


def test_the_plan_reports_a_few_shot_instruction(tmp_path, tiny_model):
    rows = _few_shot_rows(40, 10)
    job = write_job(
        tmp_path / "job.yaml",
        tiny_model,
        write_jsonl(tmp_path / "in.jsonl", rows),
        tmp_path / "out",
        task={"type": "score"},
        batching={"max_tokens": 20000, "max_batch_size": 8, "min_shared_prefix": 64},
    )
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokens = [np.asarray(tokenizer(r["prompt"])["input_ids"]) for r in rows[:40]]
    expected = _common_prefix(tokens)
    assert expected >= 64

    result = cli("plan", str(job), "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{") :])["shared_prefixes"]
    assert report["groups"] == 1 and report["rows"] == 40
    assert report["largest"] == [{"prefix_tokens": expected, "rows": 40}]
    assert report["saved_tokens"] == 39 * expected
    text = cli("plan", str(job)).output
    assert "shared prefixes  1 group, 40 rows" in text
    # model.engine auto on a CPU: the reference engine, which computes rows whole
    assert report["engine"] == "reference" and "computes rows whole" in text
    fast = cli("plan", str(job), "--set", "model.engine=fast").output
    assert f"computes each prefix once: saves up to {39 * expected:,} prompt tokens" in fast
    assert cli("run", str(job)).exit_code == 0
    facts = json.loads((tmp_path / "out" / "job.json").read_text())["plan"]["shared_prefixes"]
    assert facts["largest"] == report["largest"]

    off = cli("plan", str(job), "--json", "--set", "batching.min_shared_prefix=0").output
    assert json.loads(off[off.index("{") :])["shared_prefixes"] is None


def test_the_plan_tells_what_a_job_and_model_can_share(tmp_path, tiny_model, tiny_gpt2):
    """A model the fast engine cannot run is not told to set model.engine: fast; choices rows
    (scored whole, each row's choices sharing its own prompt) report no shared prefix; a
    score job's engine line says an fp8 KV cache is unused (scoring keeps no cache)."""
    rows = _few_shot_rows(16, 0)

    def plan(model, name, *settings, **input_section):
        if input_section:
            for row in rows:
                row["choices"] = [" pass", " fail"]
        job = write_job(
            tmp_path / f"{name}.yaml",
            model,
            write_jsonl(tmp_path / f"{name}.jsonl", rows),
            tmp_path / name,
            task={"type": "score"},
            input=input_section,
            batching={"min_shared_prefix": 64, "max_tokens": 20000},
        )
        result = cli("plan", str(job), *settings)
        assert result.exit_code == 0, result.output
        return result.output

    gpt2 = plan(tiny_gpt2, "gpt2", "--set", "model.engine=fast")
    assert "the fast engine, which would save up to" in gpt2 and "cannot run it" in gpt2
    assert "model.engine: fast" not in gpt2
    assert "fp8 KV cache unused" in plan(tiny_model, "kv", "--set", "model.kv_cache_dtype=fp8")
    choices = plan(tiny_model, "choices", "--set", "model.engine=fast", choices_column="choices")
    assert "shared prefixes" not in choices and "engine           fast" in choices


def test_short_rows_report_no_prefix(tmp_path, tiny_model):
    job = write_job(
        tmp_path / "job.yaml",
        tiny_model,
        write_jsonl(tmp_path / "in.jsonl", sample_prompts(20)),
        tmp_path / "out",
    )
    result = cli("plan", str(job), "--json")
    assert json.loads(result.output[result.output.index("{") :])["shared_prefixes"] is None
    assert "shared prefixes" not in cli("plan", str(job)).output


def _few_shot_job(tmp_path, model, name, engine, share, **task):
    rows = _few_shot_rows(24, 6, 200)
    job = write_job(
        tmp_path / f"{name}.yaml",
        model,
        write_jsonl(tmp_path / "few_shot.jsonl", rows),
        tmp_path / name,
        task={"max_new_tokens": 12, "logprobs": True, **task},
        batching={"max_tokens": 20000, "max_batch_size": 16, "min_shared_prefix": share},
    )
    use_engine(job, engine)
    return job


@pytest.mark.parametrize(
    "task",
    [{}, {"temperature": 0.9, "seed": 4}, {"temperature": 0.9, "seed": 4, "n": 3}],
    ids=["greedy", "sampled", "three-samples"],
)
def test_a_shared_prefix_computed_once_gives_the_same_tokens(tmp_path, tiny_model, task):
    """The fast engine computes the instruction's keys and values once per group of rows
    entering together and copies them; every row's tokens equal computing it whole, on the
    fast engine without sharing and on the reference engine."""
    outputs, summaries = {}, {}
    for name, engine, share in [
        ("shared", "fast", 64),
        ("whole", "fast", 0),
        ("reference", "reference", 64),
    ]:
        job = _few_shot_job(tmp_path, tiny_model, name, engine, share, **task)
        result = cli("run", str(job))
        assert result.exit_code == 0, result.output
        outputs[name] = read_outputs(tmp_path / name).to_pylist()
        summaries[name] = json.loads((tmp_path / name / "summary.json").read_text())
    assert summaries["shared"]["shared_prefix_tokens"] > 0
    assert "shared_prefix_tokens" not in summaries["whole"]
    for name in ("shared", "whole"):  # where the fast engine's time went
        s = summaries[name]
        assert s["prefill_tokens"] > 0 and s["decode_steps"] > 0, s
        assert 1 <= s["decode_rows_per_step"] <= 64 and 0 < s["decode_slots_filled"] <= 1, s
        assert s["prefill_seconds"] + s["decode_seconds"] <= s["model_seconds"] + 0.01, s
    assert summaries["whole"]["prefill_tokens"] > summaries["shared"]["prefill_tokens"]
    assert "decode_steps" not in summaries["reference"]
    for name in ("whole", "reference"):
        assert [r["token_ids"] for r in outputs["shared"]] == [
            r["token_ids"] for r in outputs[name]
        ], name
    for a, b in zip(outputs["shared"], outputs["whole"], strict=True):
        x, y = a["token_logprobs"], b["token_logprobs"]
        if "n" not in task:  # one sample: plain lists rather than a list per sample
            x, y = [x], [y]
        for one, other in zip(x, y, strict=True):
            assert one == pytest.approx(other, abs=1e-4)


def _score_runs(tmp_path, model, inputs, runs, batch_rows: int) -> dict[str, list[dict]]:
    """Score `inputs` once per (name, engine, min_shared_prefix) of `runs`: outputs by name."""
    got = {}
    for name, engine, share in runs:
        job = write_job(
            tmp_path / f"{name}.yaml",
            model,
            inputs,
            tmp_path / name,
            task={"type": "score"},
            batching={
                "max_tokens": 20000,
                "max_batch_size": batch_rows,
                "min_shared_prefix": share,
            },
        )
        use_engine(job, engine)
        result = cli("run", str(job))
        assert result.exit_code == 0, result.output
        got[name] = read_outputs(tmp_path / name).to_pylist()
    return got


def test_scores_with_a_shared_prefix_equal_scores_computed_whole(tmp_path, tiny_model):
    """Score rows sharing an instruction: the fast engine runs the prefix once per part and
    the rows' own tokens after it; sums and counts equal computing every row whole."""
    inputs = write_jsonl(tmp_path / "in.jsonl", _few_shot_rows(20, 5, 200))
    runs = [("shared", "fast", 64), ("whole", "fast", 0), ("ref", "reference", 0)]
    got = _score_runs(tmp_path, tiny_model, inputs, runs, batch_rows=8)
    summary = json.loads((tmp_path / "shared" / "summary.json").read_text())
    assert summary["shared_prefix_tokens"] > 0
    for name in ("whole", "ref"):
        for a, b in zip(got["shared"], got[name], strict=True):
            assert a["scored_tokens"] == b["scored_tokens"]
            assert a["logprob_sum"] == pytest.approx(b["logprob_sum"], rel=1e-4, abs=1e-3)


def _rows_after_a_prefix(tmp_path, arch: str, prefix: int, own: int, seed: int):
    """A tiny float32 model of `arch`, its tokenizer, and nine rows of random tokens sharing
    exactly `prefix` first tokens (each row's own part starts with a token of its own), then
    up to `own` more."""
    import torch
    from tiny_model import build_tiny_model
    from transformers import AutoModelForCausalLM

    folder = build_tiny_model(tmp_path / "m", arch=arch)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    rng = np.random.default_rng(seed)
    vocab = model.config.vocab_size
    shared = rng.integers(4, vocab, prefix)
    rows = [
        np.concatenate([shared, [4 + i], rng.integers(4, vocab, int(rng.integers(0, own + 1)))])
        for i in range(9)
    ]
    return model, tokenizer, rows


def test_rows_entering_later_copy_the_prefix_from_a_row_in_flight(tmp_path):
    """With three slots, rows enter a few at a time while a long row still decodes: each takes
    the shared prefix's keys and values from a row in flight (none is computed again), and
    every row's tokens equal the reference engine's, computed whole."""
    from bulkinfer.engines.base import GenerateRequests
    from bulkinfer.engines.sampling import SamplingParams, row_key
    from bulkinfer.engines.select import engine_around

    model, tokenizer, prompts = _rows_after_a_prefix(tmp_path, "llama", 40, 8, seed=0)
    rng = np.random.default_rng(0)
    limits = [120] + [int(x) for x in rng.integers(6, 17, len(prompts) - 1)]
    params = SamplingParams(120, temperature=0.8, seed=3, ignore_eos=True)
    keys = [row_key(3, i) for i in range(len(prompts))]
    fast = engine_around(model, tokenizer, slots=3)
    requests = GenerateRequests(prompts, keys, [params] * len(prompts), limits, share_prefix=16)
    got = {}
    for update in fast.generate_stream([("g", requests)]):
        got.update(update.finished)
    assert fast.counters["shared_prefix_tokens"] == 40 * (len(prompts) - 1)
    assert fast.counters["prefill_tokens"] < sum(len(p) for p in prompts) - 40 * 7
    want = engine_around(model, tokenizer, "reference").generate(prompts, keys, params, limits)
    assert [got[i].tokens for i in range(len(prompts))] == [w.tokens for w in want]


@pytest.fixture(scope="module")
def prefix_job(tmp_path_factory, tiny_model):
    """A sampled few-shot job on the fast engine, sharing on: many 3-row batches and a part
    every 3 rows, so batches are in flight together and later rows copy the instruction from
    rows still decoding; and the reference engine's uninterrupted outputs of it (rows whole)."""
    tmp = tmp_path_factory.mktemp("prefix-resume")
    inputs = write_jsonl(tmp / "in.jsonl", _few_shot_rows(36, 6, 200))

    def make(name: str, engine: str = "fast"):
        job = write_job(
            tmp / f"{name}.yaml",
            tiny_model,
            inputs,
            tmp / name,
            task={"temperature": 0.8, "seed": 3, "max_new_tokens": 8, "n": 2},
            batching={"max_tokens": 2000, "max_batch_size": 3, "min_shared_prefix": 64},
            checkpoint={"every_rows": 3},
        )
        return use_engine(job, engine)

    reference = make("reference", engine="reference")
    assert cli("run", str(reference)).exit_code == 0
    return make, read_outputs(tmp / "reference")


def _same_outputs(out_dir, reference) -> None:
    got = read_outputs(out_dir)
    assert got.column("id").to_pylist() == reference.column("id").to_pylist()
    for name in ("text", "finish_reason", "output_tokens"):
        assert got.column(name).to_pylist() == reference.column(name).to_pylist(), name


@pytest.mark.parametrize("point", ["batch_start:5", "part_committed:2", "part_written:4"])
def test_a_kill_with_shared_prefixes_in_flight_resumes_to_the_same_outputs(prefix_job, point):
    make, reference = prefix_job
    name = "kill-" + point.replace(":", "-")
    job = make(name)
    first = subprocess.run(
        [sys.executable, "-m", "bulkinfer", "run", str(job)],
        env={**child_env(), "BULKINFER_KILL_AT": point},
        capture_output=True,
    )
    assert first.returncode == -signal.SIGKILL
    second = cli_subprocess("run", str(job))
    assert second.returncode == 0, second.stderr
    _same_outputs(job.parent / name, reference)
    summary = json.loads((job.parent / name / "summary.json").read_text())
    assert summary["shared_prefix_tokens"] > 0


def test_shards_with_shared_prefixes_merge_to_the_same_outputs(prefix_job):
    make, reference = prefix_job
    job = make("sharded")
    for i in range(3):
        result = cli("run", str(job), "--shard", f"{i}/3")
        assert result.exit_code == 0, result.output
    _same_outputs(job.parent / "sharded", reference)


def test_a_packed_score_plan_keeps_each_prefix_s_rows_together(tmp_path, tiny_model):
    """Rows of two instructions, interleaved in the file and of mixed lengths, batches of four:
    each batch holds one instruction's rows, so each prefix is computed once a batch (sorting
    by length alone would mix them, two and two); the scores equal computing rows whole."""
    rng = np.random.default_rng(1)
    other = "Score the reply below for politeness on a scale of one to five, " * 6
    prompts = sample_prompts(24)
    rows = [
        {
            "id": f"r{i}",
            "prompt": (INSTRUCTION if i % 2 else other)
            + f"Answer {i}: "
            + prompts[i]["prompt"][: int(rng.integers(5, 200))],
        }
        for i in range(24)
    ]
    inputs = write_jsonl(tmp_path / "in.jsonl", rows)
    runs = [("shared", "fast", 64), ("whole", "fast", 0)]
    got = _score_runs(tmp_path, tiny_model, inputs, runs, batch_rows=4)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokens = [np.asarray(tokenizer(r["prompt"])["input_ids"]) for r in rows]
    instructions = [_common_prefix(tokens[k::2]) for k in (0, 1)]
    # 12 rows of each, three batches of four: nine rows of each reuse their batch's prefix
    summary = json.loads((tmp_path / "shared" / "summary.json").read_text())
    assert summary["shared_prefix_tokens"] >= 9 * sum(instructions)
    for a, b in zip(got["shared"], got["whole"], strict=True):
        assert a["logprob_sum"] == pytest.approx(b["logprob_sum"], rel=1e-5, abs=1e-4)


def test_shared_prefix_scores_from_any_start_equal_the_reference(tmp_path):
    """Rows sharing 30 tokens, scored from starts before, inside and after the prefix (the
    prefix's own tokens are scored once for all rows, from the earliest start): the same sums
    and counts as the reference engine computing each row whole."""
    from bulkinfer.engines.select import engine_around

    model, tokenizer, rows = _rows_after_a_prefix(tmp_path, "qwen2", 30, 11, seed=3)
    starts = [0, 1, 5, 17, 29, 30, 31, 12, 3]
    fast = engine_around(model, tokenizer)
    ours = fast.loglikelihood(rows, starts, share_prefix=8)
    theirs = engine_around(model, tokenizer, "reference").loglikelihood(rows, starts)
    assert fast.counters["shared_prefix_tokens"] == 30 * 8
    for (a, n), (b, m) in zip(ours, theirs, strict=True):
        assert n == m
        assert a == pytest.approx(b, rel=1e-5, abs=1e-5)

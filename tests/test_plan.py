"""The planner: pure functions on lengths, checked by properties over random inputs."""

from __future__ import annotations

import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import cli, sample_prompts, write_job, write_jsonl
from hypothesis import given, settings
from hypothesis import strategies as st

from bulkinfer.planner import TokenBudget, length_histogram, padding_fraction, plan_batches

lengths_strategy = st.lists(st.integers(min_value=1, max_value=3000), min_size=0, max_size=400)
budget_strategy = st.builds(
    TokenBudget,
    max_tokens=st.integers(min_value=16, max_value=20000),
    max_batch_size=st.integers(min_value=1, max_value=300),
    new_tokens_per_row=st.integers(min_value=0, max_value=256),
    max_padding=st.sampled_from([1.0, 0.1, 0.0, 0.3]),
)


@settings(max_examples=300, deadline=None)
@given(lengths=lengths_strategy, budget=budget_strategy, sort=st.booleans())
def test_every_row_in_exactly_one_batch_and_budget_kept(lengths, budget, sort):
    lengths = np.asarray(lengths, dtype=np.int64)
    batches = plan_batches(np.arange(len(lengths)), lengths, budget, sort=sort)
    rows = np.concatenate([b.rows for b in batches]) if batches else np.zeros(0, dtype=np.int64)
    assert sorted(rows.tolist()) == list(range(len(lengths)))
    for b in batches:
        assert 1 <= len(b.rows) <= budget.max_batch_size
        assert b.longest == lengths[b.rows].max()
        assert b.real_tokens == lengths[b.rows].sum()
        cost = len(b.rows) * (b.longest + budget.new_tokens_per_row)
        assert cost <= budget.max_tokens or len(b.rows) == 1
        if sort and budget.new_tokens_per_row == 0:
            real = b.real_tokens + len(b.rows) * budget.new_tokens_per_row
            assert 1 - real / cost <= budget.max_padding + 1e-9 or cost < min(
                budget.max_tokens / 4, 8192
            )


@settings(max_examples=200, deadline=None)
@given(lengths=lengths_strategy, budget=budget_strategy)
def test_sorted_plan_is_deterministic_longest_first_and_stable(lengths, budget):
    lengths = np.asarray(lengths, dtype=np.int64)
    rows = np.arange(len(lengths))
    first = plan_batches(rows, lengths, budget)
    second = plan_batches(rows.copy(), lengths.copy(), budget)
    assert [b.rows.tolist() for b in first] == [b.rows.tolist() for b in second]
    order = np.concatenate([b.rows for b in first]) if first else np.zeros(0, dtype=np.int64)
    keys = [(-int(lengths[r]), int(r)) for r in order]
    assert keys == sorted(keys)


@settings(max_examples=200, deadline=None)
@given(data=st.data(), lengths=lengths_strategy, budget=budget_strategy)
def test_packed_generation_plan_starts_the_rows_with_most_steps(data, lengths, budget):
    """Longest-processing-time first: a packed plan given each row's decode steps orders rows
    by steps (most first), then prompt length, then input order; every row once."""
    lengths = np.asarray(lengths, dtype=np.int64)
    steps = np.asarray(
        data.draw(st.lists(st.integers(1, 1500), min_size=len(lengths), max_size=len(lengths))),
        dtype=np.int64,
    )
    packed = TokenBudget(budget.max_tokens, budget.max_batch_size, 0, 1.0, packed=True)
    rows = np.arange(len(lengths))
    batches = plan_batches(rows, lengths, packed, costs=lengths + steps, steps=steps)
    order = np.concatenate([b.rows for b in batches]) if batches else np.zeros(0, dtype=np.int64)
    keys = [(-int(steps[r]), -int(lengths[r]), int(r)) for r in order]
    assert keys == sorted(keys) and len(order) == len(lengths)
    padded = plan_batches(rows, lengths, budget, steps=steps)  # a padded plan ignores steps
    assert [b.rows.tolist() for b in padded] == [
        b.rows.tolist() for b in plan_batches(rows, lengths, budget)
    ]


def test_sorting_cuts_padding_on_a_heavy_tailed_length_mix():
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(mean=5.0, sigma=1.0, size=5000), 4, 2048).astype(np.int64)
    budget = TokenBudget(max_tokens=16384, max_batch_size=64)
    rows = np.arange(len(lengths))
    sorted_pad = padding_fraction(plan_batches(rows, lengths, budget, sort=True))
    file_pad = padding_fraction(plan_batches(rows, lengths, budget, sort=False))
    assert sorted_pad < 0.05 < 0.3 < file_pad


def test_histogram_counts_every_length():
    lengths = np.array([1, 2, 3, 50, 51, 900, 4000])
    buckets = length_histogram(lengths)
    assert sum(c for _, _, c in buckets) == len(lengths)
    assert buckets[0][0] == 1 and buckets[-1][1] >= 4000


def test_new_tokens_past_the_context_are_not_reserved(tmp_path):
    """max_new_tokens above the model's context: no row can make more than the context holds,
    but every row reserved all of them, so each ran alone, with a warning that it needs more
    than the budget."""
    from tiny_model import build_tiny_model

    model = build_tiny_model(tmp_path / "model", max_context=64)
    job = write_job(
        tmp_path / "job.yaml",
        model,
        write_jsonl(tmp_path / "in.jsonl", sample_prompts(12)),
        tmp_path / "out",
        task={"max_new_tokens": 1000},
        batching={"max_tokens": 1024, "max_batch_size": 8},
    )
    result = cli("plan", str(job), "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{") :])
    assert report["new_tokens_per_row"] == 64 and max(report["batch_rows"]) > 1, report
    assert "more than the budget" not in result.output


def test_plan_stops_where_run_stops_on_a_row_with_on_error_fail(tmp_path, tiny_model):
    """A row that cannot be tokenized stops an `on_error: fail` run before any batch: its plan
    said "(1 with errors, not run)" and planned the rest; now both give run's one line."""
    rows = [{"id": i, "prompt": r["prompt"]} for i, r in enumerate(sample_prompts(8))]
    rows[3]["prompt"] = None
    job = write_job(
        tmp_path / "job.yaml", tiny_model, write_jsonl(tmp_path / "in.jsonl", rows), tmp_path / "o"
    )
    assert cli("plan", str(job)).exit_code == 0  # on_error: record keeps it as the row's error
    for command in ("plan", "run"):
        result = cli(command, str(job), "--set", "on_error=fail")
        assert result.exit_code == 2, (command, result.output)
        assert "in.jsonl:4: prompt is null" in result.output, result.output


def test_plan_command_reports_padding_without_loading_weights(tmp_path, tiny_model):
    rows = sample_prompts(60)
    job = write_job(
        tmp_path / "job.yaml",
        tiny_model,
        write_jsonl(tmp_path / "in.jsonl", rows),
        tmp_path / "out",
    )
    result = cli("plan", str(job), "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{") :])
    assert report["rows"] == 60
    assert report["padding_sorted"] < report["padding_file_order"]
    assert sum(c for _, _, c in report["histogram"]) == 60
    text = cli("plan", str(job))
    assert "sorted and packed" in text.output and "file order" in text.output
    assert "engine           reference on cpu" in text.output  # and why not the fast one
    assert "not the fast engine" in text.output
    unsorted = cli("plan", str(job), "--set", "batching.sort=none")  # was "sorted and packed"
    assert "as planned (sort: none)" in unsorted.output and "sorted" not in unsorted.output
    fp8 = cli(
        "plan", str(job), "--set", "model.quantization=fp8", "--set", "model.kv_cache_dtype=fp8"
    )
    assert fp8.exit_code == 0, fp8.output
    assert "engine           fast on cpu" in fp8.output
    assert "fp8 weights, fp8 KV cache" in fp8.output
    assert not (tmp_path / "out").exists()


@settings(max_examples=100, deadline=None)
@given(lengths=lengths_strategy, n=st.integers(min_value=1, max_value=9))
def test_every_row_in_exactly_one_shard(lengths, n):
    from bulkinfer.planner import assign_shards

    shard_of = assign_shards(np.asarray(lengths, dtype=np.int64), n)
    assert len(shard_of) == len(lengths)
    assert set(shard_of.tolist()) <= set(range(n))
    assert np.array_equal(shard_of, assign_shards(np.asarray(lengths, dtype=np.int64), n))


def test_shards_of_a_skewed_input_balance_within_five_percent_of_tokens():
    from bulkinfer.planner import assign_shards

    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(5, 1.2, 100_000), 1, 32_000).astype(np.int64)
    for n in (4, 16, 64):
        totals = np.bincount(assign_shards(lengths, n), weights=lengths, minlength=n)
        assert totals.max() / totals.mean() - 1 < 0.05
        assert 1 - totals.min() / totals.mean() < 0.05


@pytest.mark.parametrize("engine", ["fast", "auto"])
def test_plan_and_run_resolve_the_same_budget_and_batches(tmp_path, tiny_model, engine):
    """`bulkinfer plan` loads no weights, yet it sizes batches as the run of the same spec on the
    same device does: one budget, from the engine's limits known before loading."""
    job = write_job(
        tmp_path / "job.yaml",
        tiny_model,
        write_jsonl(tmp_path / "in.jsonl", sample_prompts(300)),
        tmp_path / "out",
        task={"max_new_tokens": 2},
        batching={"max_tokens": "auto", "max_batch_size": "auto"},
    )
    spec = yaml.safe_load(job.read_text())
    spec["model"]["engine"] = engine
    job.write_text(yaml.safe_dump(spec))
    result = cli("plan", str(job), "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{") :])
    assert cli("run", str(job)).exit_code == 0
    recorded = json.loads((tmp_path / "out" / "job.json").read_text())
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert report["max_tokens"] == recorded["max_tokens"] == 16384  # the CPU's budget
    assert report["max_batch_size"] == recorded["max_batch_size"] == 256
    assert report["batches_sorted"] == recorded["plan"]["batches"] > 1
    ran = pq.read_table(tmp_path / "out" / "stats" / "batches.parquet").to_pylist()
    ran_rows = [b["rows"] for b in sorted(ran, key=lambda b: b["batch"])]
    assert report["batch_rows"] == ran_rows  # the very same batches, row counts one by one
    assert report["engine"]["kind"] == summary["engine"]
    assert summary["engine"] == ("fast" if engine == "fast" else "reference")


def test_a_long_read_says_how_far_it_has_got(tmp_path, tiny_model):
    """Reading and tokenizing millions of rows takes minutes before anything else is said: a
    line every progress.log_every_seconds counts the rows and tokens read so far."""
    n = 100_000
    table = pa.table({"id": [f"r{i}" for i in range(n)], "prompt": [f"row {i}" for i in range(n)]})
    pq.write_table(table, tmp_path / "in.parquet", row_group_size=5_000)
    job = write_job(
        tmp_path / "job.yaml",
        tiny_model,
        tmp_path / "in.parquet",
        tmp_path / "out",
        progress={"log_every_seconds": 0.1},
    )
    result = cli("plan", str(job))
    assert result.exit_code == 0, result.output
    said = re.findall(r"reading and tokenizing the input: ([\d,]+) rows so far", result.output)
    counts = [int(c.replace(",", "")) for c in said]
    assert counts and counts == sorted(counts) and 0 < counts[-1] <= n
    assert f"rows             {n:,}" in result.output


def test_plan_names_where_a_row_that_cannot_run_is(tmp_path, tiny_model):
    """The plan named a failing row by its position from 0 ('row 1'), which is neither its id
    (6 here) nor its line (2)."""
    rows = [{"id": 5, "prompt": "the fox"}, {"id": 6, "prompt": ""}, {"id": 7, "prompt": "a"}]
    inputs = write_jsonl(tmp_path / "in.jsonl", rows)
    result = cli("plan", str(write_job(tmp_path / "job.yaml", tiny_model, inputs, tmp_path / "o")))
    assert result.exit_code == 0, result.output
    assert f"{inputs}:2: prompt is empty" in result.output
    assert "row 1:" not in result.output


def test_rows_over_the_token_budget_are_warned_of(tmp_path, tiny_model):
    """A row whose prompt plus new tokens is more than batching.max_tokens runs alone, over
    the budget the user set to bound memory: said only now."""
    rows = [{"id": i, "prompt": "the quick brown fox " * (1 + 3 * i)} for i in range(3)]
    inputs = write_jsonl(tmp_path / "in.jsonl", rows)
    job = write_job(
        tmp_path / "job.yaml",
        tiny_model,
        inputs,
        tmp_path / "out",
        task={"max_new_tokens": 6, "chat_template": "never"},
        batching={"max_tokens": 30, "max_batch_size": 8},
    )
    # plan says it too, as run does before its first batch (plan was silent)
    for command in ("plan", "run"):
        result = cli(command, str(job))
        assert result.exit_code == 0, result.output
        assert re.search(r"[12] rows? needs? more than the budget of 30 tokens", result.output)
    fine = cli("run", str(job), "--set", "batching.max_tokens=600", "--output", str(tmp_path / "o"))
    assert fine.exit_code == 0 and "more than the budget" not in fine.output


def test_plan_says_what_run_says_of_requests_it_cannot_honour(tmp_path, tiny_model):
    """A requests file asking for more tokens than task.max_new_tokens (cut there), or for
    n > 1 greedy samples (all equal): run said so, plan did not."""
    body = {"model": "m", "prompt": "the quick brown fox", "max_tokens": 50, "n": 2}
    requests = [
        {"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions", "body": body}
        for i in range(3)
    ]
    job = write_job(
        tmp_path / "job.yaml",
        tiny_model,
        write_jsonl(tmp_path / "requests.jsonl", requests),
        tmp_path / "out",
        task={"max_new_tokens": 8},
    )
    for command in ("plan", "run"):
        result = cli(command, str(job))
        assert result.exit_code == 0, result.output
        assert "3 requests ask for more than task.max_new_tokens=8" in result.output
        assert "3 requests ask for n > 1 samples at temperature 0" in result.output


def test_plan_counts_new_tokens_per_sample_where_rows_ask_for_several(tmp_path, tiny_model):
    """The new tokens in the plan's budget line are each sample's: a row asking for n of them
    holds n times as many (the packed plan's costs count them so)."""
    prompts = write_jsonl(tmp_path / "in.jsonl", sample_prompts(6))
    job = write_job(
        tmp_path / "job.yaml",
        tiny_model,
        prompts,
        tmp_path / "out",
        task={"max_new_tokens": 8, "n": 3, "temperature": 0.7},
    )
    result = cli("plan", str(job))
    assert result.exit_code == 0, result.output
    assert "8 new tokens per sample, up to 3 samples per row" in result.output

    requests = [
        {
            "custom_id": f"r{i}",
            "method": "POST",
            "url": "/v1/completions",
            "body": {"model": "m", "prompt": "a b c", "max_tokens": 4, "n": n, "temperature": 1},
        }
        for i, n in enumerate([1, 4, 2])
    ]
    job = write_job(
        tmp_path / "requests.yaml",
        tiny_model,
        write_jsonl(tmp_path / "requests.jsonl", requests),
        tmp_path / "out2",
        task={"max_new_tokens": 8},
    )
    result = cli("plan", str(job))
    assert result.exit_code == 0, result.output
    assert "8 new tokens per sample, up to 4 samples per row" in result.output

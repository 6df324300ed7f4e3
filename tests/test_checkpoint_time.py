"""Checkpoints by time and progress within a batch: a batch slower than
`checkpoint.every_seconds` commits the rows it has finished while it runs, a kill then loses
only the rows in flight, and the progress output moves (one ETA) before the batch ends."""

from __future__ import annotations

import json
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
import yaml
from conftest import child_env, cli, cli_again, read_outputs, use_engine, write_job, write_jsonl

WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "and",
    "then",
    "sleeps",
    "in",
    "warm",
    "sun",
]
N_REQUESTS = 24


def requests_file(path):
    """OpenAI Batch requests whose own max_tokens differ, so rows of one batch finish apart."""
    rows = []
    for i in range(N_REQUESTS):
        prompt = " ".join(WORDS[(i + k) % len(WORDS)] for k in range(3 + i % 7))
        body = {"model": "m", "prompt": prompt, "max_tokens": 4 + (i * 7) % 37, "temperature": 0.8}
        rows.append(
            {"custom_id": f"req-{i}", "method": "POST", "url": "/v1/completions", "body": body}
        )
    return write_jsonl(path, rows)


def one_batch_job(tmp_path, tiny_model, name, engine, every_seconds=180, log_every=30):
    """All requests in one batch, parts by time only (every_rows is never reached)."""
    job = write_job(
        tmp_path / f"{name}.yaml",
        tiny_model,
        requests_file(tmp_path / "requests.jsonl"),
        tmp_path / name,
        task={"max_new_tokens": 40, "seed": 3},
        batching={"max_tokens": 100_000, "max_batch_size": 64},
        checkpoint={"every_rows": 1000, "every_seconds": every_seconds},
        progress={"log_every_seconds": log_every},
    )
    spec = yaml.safe_load(job.read_text())
    spec["model"]["engine"] = engine
    job.write_text(yaml.safe_dump(spec))
    return job


def progress_events(done) -> list[dict]:
    """The progress events of a run logged with --log-format json (it must have succeeded)."""
    assert done.returncode == 0, done.stderr
    events = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    return [e for e in events if e["event"] == "progress"]


def run(job, *args, **env):
    return subprocess.run(
        [sys.executable, "-m", "bulkinfer", *args, "run", str(job)],
        env={**child_env(), **env},
        capture_output=True,
        text=True,
    )


def manifest_records(out):
    lines = (out / "checkpoint" / "manifest.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


@pytest.mark.parametrize("engine", ["reference", "fast"])
def test_a_batch_slower_than_every_seconds_commits_finished_rows_and_resumes(
    tmp_path, tiny_model, engine
):
    plain = one_batch_job(tmp_path, tiny_model, "plain", engine)
    result = cli("run", str(plain))
    assert result.exit_code == 0, result.output
    assert f"{N_REQUESTS} rows, 1 batch, budget" in result.output  # not "1 batches"
    expected = read_outputs(tmp_path / "plain")
    assert [r["rows"] for r in manifest_records(tmp_path / "plain")] == [N_REQUESTS]

    job = one_batch_job(tmp_path, tiny_model, "killed", engine, every_seconds=1)
    killed = run(job, BULKINFER_SLOW_STEP_SECONDS="0.4", BULKINFER_KILL_AT="part_committed:1")
    assert killed.returncode == -9, killed.stderr
    records = manifest_records(tmp_path / "killed")
    assert len(records) == 1 and records[0]["batches"] == []  # the batch was still running
    committed = [row for rows in records[0]["partial"].values() for row in rows]
    assert 0 < len(committed) < N_REQUESTS

    resumed = run(job, "--log-format", "json")
    assert resumed.returncode == 0, resumed.stderr
    events = [json.loads(line) for line in resumed.stderr.splitlines() if line.startswith("{")]
    resume = next(e for e in events if e["event"] == "resume")
    assert resume["rows_of_batches_begun"] == len(committed)
    got = read_outputs(tmp_path / "killed")
    assert got.column("id").to_pylist() == expected.column("id").to_pylist()
    assert got.drop(["error"]).equals(expected.drop(["error"]))  # every row once, same tokens
    summary = json.loads((tmp_path / "killed" / "summary.json").read_text())
    assert summary["rows_out"] == N_REQUESTS and summary["complete"]
    # one batch, committed in pieces across the kill: counted once (it was once a piece)
    pieces = pq.read_table(tmp_path / "killed" / "stats" / "batches.parquet").column("batch")
    assert len(pieces) > 1 and summary["batches"] == len(set(pieces.to_pylist())) == 1


def uneven_rows_job(tmp_path, tiny_model, name, rows, engine, every_seconds=1, **settings):
    """One batch of completions requests `rows` ({id, prompt, max_tokens}), parts by time."""
    requests = [
        {
            "custom_id": r["id"],
            "method": "POST",
            "url": "/v1/completions",
            "body": {"model": "m", "prompt": r["prompt"], "max_tokens": r["max_tokens"]},
        }
        for r in rows
    ]
    job = write_job(
        tmp_path / f"{name}.yaml",
        tiny_model,
        write_jsonl(tmp_path / f"{name}.jsonl", requests),
        tmp_path / name,
        task={"max_new_tokens": 40},
        batching={"max_tokens": 100_000, "max_batch_size": 64},
        checkpoint={"every_rows": 1000, "every_seconds": every_seconds},
        **settings,
    )
    use_engine(job, engine)
    return job


@pytest.mark.parametrize("log_format", ["plain", "json"])
def test_progress_moves_inside_one_long_batch_with_one_eta(tmp_path, tiny_model, log_format):
    job = one_batch_job(tmp_path, tiny_model, "progress", "reference", log_every=0.1)
    done = run(job, "--log-format", log_format, BULKINFER_SLOW_STEP_SECONDS="0.2")
    assert done.returncode == 0, done.stderr
    if log_format == "json":
        events = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
        progress = [e for e in events if e["event"] == "progress"]
        commit = next(i for i, e in enumerate(events) if e["event"] == "checkpoint")
        before = [e for e in events[:commit] if e["event"] == "progress"]
        assert len(before) >= 3  # while the only batch runs
        tokens = [e["tokens_done"] for e in before]
        assert tokens == sorted(tokens) and tokens[-1] > tokens[0] > 0
        assert any(0 < e["rows_done"] < N_REQUESTS for e in before)
        assert all(e["token_kind"] == "new" and "eta_seconds" in e for e in progress)
        assert progress[-1]["rows_done"] == N_REQUESTS
    else:
        lines = [line for line in done.stderr.splitlines() if " rows (" in line]
        assert len(lines) >= 3
        assert all(line.count("ETA") == 1 and "new tokens" in line for line in lines)
        assert any(f"/{N_REQUESTS} rows" in line and "100%" not in line for line in lines)


@pytest.mark.parametrize("kill_at", ["outputs_written:1", "part_committed:2"])
def test_a_damaged_piece_of_a_long_batch_is_computed_again(tmp_path, tiny_model, kill_at):
    """A part holding rows a long batch committed early is lost after the kill (truncated): the
    rerun runs those rows again, though a later part completed their batch
    (`outputs_written:1`, every part committed), and a new part never takes the name of one
    still committed (`part_committed:2`); the outputs are the uninterrupted run's."""
    plain = one_batch_job(tmp_path, tiny_model, "plain", "reference")
    assert cli("run", str(plain)).exit_code == 0
    expected = read_outputs(tmp_path / "plain")

    out = tmp_path / "damaged"
    job = one_batch_job(tmp_path, tiny_model, "damaged", "reference", every_seconds=1)
    killed = run(job, BULKINFER_SLOW_STEP_SECONDS="0.4", BULKINFER_KILL_AT=kill_at)
    assert killed.returncode == -9, killed.stderr
    records = manifest_records(out)
    assert len(records) >= 2 and records[0]["partial"], records
    first = out / "checkpoint" / "parts" / records[0]["file"]
    first.write_bytes(first.read_bytes()[:100])

    resumed = run(job, "--log-format", "json")
    assert resumed.returncode == 0, resumed.stderr
    events = [json.loads(line) for line in resumed.stderr.splitlines() if line.startswith("{")]
    warned = [e.get("dropped") for e in events if e["event"] == "checkpoint" and "dropped" in e]
    assert records[0]["file"] in warned
    names = [r["file"] for r in manifest_records(out)]
    assert len(names) == len(set(names)), names
    got = read_outputs(out)
    assert got.column("id").to_pylist() == expected.column("id").to_pylist()
    assert got.drop(["error"]).equals(expected.drop(["error"]))
    again = cli_again("run", str(job))
    assert again.returncode == 0 and "already finished" in again.stderr, again.stderr


def test_the_eta_counts_every_sample_of_a_row(tmp_path, tiny_model):
    """With n samples a row, every sample's tokens count as work done, but a row's planned
    work counted one: the work ran out long before the batch did, and the ETA read 0:00:00
    with most of the batch still to run. Until the batch is committed some work is left."""
    job = one_batch_job(tmp_path, tiny_model, "samples", "reference", log_every=0.1)
    spec = yaml.safe_load(job.read_text())
    spec["task"]["n"] = 4
    job.write_text(yaml.safe_dump(spec))
    done = run(job, "--log-format", "json", BULKINFER_SLOW_STEP_SECONDS="0.05")
    assert done.returncode == 0, done.stderr
    events = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    commit = next(i for i, e in enumerate(events) if e["event"] == "checkpoint")
    before = [e for e in events[:commit] if e["event"] == "progress"]
    # a quarter of the rows still running is work left (an accurate ETA near the end rounds
    # to 0.0 s, as it should)
    running = [e["eta_seconds"] for e in before if e["rows_done"] < N_REQUESTS * 3 // 4]
    assert len(running) >= 3 and all(eta > 0 for eta in running), running


def test_a_batch_committed_in_pieces_reports_the_padding_it_ran_with(tmp_path, tiny_model):
    """Each piece of a long batch counted its padding against its own longest row, but the
    batch ran padded to the batch's longest: the summary said less padding than the plan.
    Here the short rows finish and are committed while the one long row goes on."""
    rows = [{"id": "long", "prompt": " ".join(WORDS * 3), "max_tokens": 40}]
    rows += [
        {"id": f"short-{i}", "prompt": " ".join(WORDS[i : i + 3]), "max_tokens": 3}
        for i in range(10)
    ]
    job = uneven_rows_job(tmp_path, tiny_model, "padding", rows, "reference")
    planned = cli("plan", str(job), "--json")
    assert planned.exit_code == 0, planned.output
    plan = json.loads(planned.output)
    done = run(job, BULKINFER_SLOW_STEP_SECONDS="0.5")  # a report every 8 decode steps
    assert done.returncode == 0, done.stderr
    out = tmp_path / "padding"
    pieces = pq.read_table(out / "stats" / "batches.parquet").column("batch").to_pylist()
    assert pieces == [0, 0]  # the short rows, then the long one
    summary = json.loads((out / "summary.json").read_text())
    assert summary["padding_fraction"] == pytest.approx(plan["padding_sorted"], abs=1e-9)


@pytest.mark.parametrize("engine", ["reference", "fast"])
def test_the_eta_counts_the_prompts_of_rows_that_finished(tmp_path, tiny_model, engine):
    """A row's planned work is its prompt plus its new tokens, but while a batch ran only new
    tokens counted as done: on prompt-heavy rows the ETA read many times the time taken
    (an 8B job's 99 s left with 6 s to go). Ten rows of long prompts and two new tokens
    finish; one short row runs on: most of the work is done, and the ETA says so."""
    rows = [{"id": "long-answer", "prompt": "the fox", "max_tokens": 40}]
    rows += [
        {"id": f"long-prompt-{i}", "prompt": " ".join(WORDS * 6), "max_tokens": 2}
        for i in range(10)
    ]
    job = uneven_rows_job(  # no part before the batch ends
        tmp_path, tiny_model, "eta", rows, engine, 600, progress={"log_every_seconds": 0.1}
    )
    progress = progress_events(run(job, "--log-format", "json", BULKINFER_SLOW_STEP_SECONDS="0.2"))
    waiting = [e for e in progress if e["rows_done"] == len(rows) - 1]
    assert waiting, progress
    # planned work left: under 40 of the long row's ~45 tokens, against ~10 x 90 done
    assert all(e["eta_seconds"] < e["elapsed_seconds"] for e in waiting), waiting
    # but some: the fast engine counted the tokens of rows that started and finished within
    # one report twice, and the ETA read 0 while the long row had most of its tokens to go
    assert len(waiting) > 1 and all(e["eta_seconds"] > 0 for e in waiting[:-1]), waiting


@pytest.mark.parametrize("engine", ["reference", "fast"])
def test_the_first_eta_counts_the_prompts_already_run(tmp_path, tiny_model, engine):
    """Before any row finished, only new tokens counted as work done while the work left
    counted every prompt: the first line of a 7-minute job read ETA 17:23:23. Ten rows of
    long prompts, forty new tokens each: once they have started, most of the work is done."""
    rows = [{"id": f"row-{i}", "prompt": " ".join(WORDS * 6), "max_tokens": 40} for i in range(10)]
    job = uneven_rows_job(
        tmp_path, tiny_model, "first", rows, engine, 600, progress={"log_every_seconds": 0.1}
    )
    progress = progress_events(run(job, "--log-format", "json", BULKINFER_SLOW_STEP_SECONDS="0.2"))
    started = [e for e in progress if e["rows_done"] == 0 and e["tokens_done"]]
    assert started, progress
    # work left: at most the 10 x 40 new tokens, against 10 prompts of ~90 tokens done
    assert all(e["eta_seconds"] < e["elapsed_seconds"] for e in started), started

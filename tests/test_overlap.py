"""Host work beside the model: weights load while the input is tokenized, parts are written on a
background thread. Outputs, errors, kills and resumes must be exactly those of inline work."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
from conftest import (
    child_env,
    cli,
    cli_again,
    cli_subprocess,
    read_outputs,
    sample_prompts,
    write_job,
    write_jsonl,
)

N_ROWS = 60


@pytest.fixture(scope="module")
def overlap_job(tmp_path_factory, tiny_model):
    """A sampled generate job of many small batches, and the outputs of a run that commits one
    part at the very end (so nothing was written while a batch ran)."""
    tmp = tmp_path_factory.mktemp("overlap")
    inputs = write_jsonl(tmp / "in.jsonl", sample_prompts(N_ROWS))

    def make(name: str, every_rows: int = 1, **sections):
        return write_job(
            tmp / f"{name}.yaml",
            tiny_model,
            inputs,
            tmp / name,
            task={"temperature": 0.8, "seed": 5, "max_new_tokens": 5},
            batching={"max_tokens": 300, "max_batch_size": 4},
            checkpoint={"every_rows": every_rows},
            **sections,
        )

    one_part = make("one-part", every_rows=10**6)
    assert cli("run", str(one_part)).exit_code == 0
    return make, read_outputs(tmp / "one-part")


def _run(job, *args: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bulkinfer", "run", str(job), *args],
        env={**child_env(), **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


def _manifest(out) -> list[dict]:
    path = out / "checkpoint" / "manifest.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(line) for line in lines]


def _assert_every_id_once(out, reference) -> None:
    got = read_outputs(out)
    ids = got.column("id").to_pylist()
    assert len(ids) == len(set(ids)) == N_ROWS
    assert got.equals(reference)


def _broken_weights(tmp_path, tiny_model):
    """The tiny model with garbage for weights: its tokenizer and config still load."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    for weights in model.glob("*.safetensors"):
        weights.write_bytes(b"not weights")
    return model


def _one_line_error(stderr: str, *fragments: str) -> None:
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("bulkinfer: error:"), stderr
    for fragment in fragments:
        assert fragment in last, stderr


def test_a_part_per_batch_gives_the_outputs_of_one_part(overlap_job):
    make, reference = overlap_job
    job = make("part-per-batch")
    result = cli_subprocess("run", str(job), "--log-format", "json")
    assert result.returncode == 0, result.stderr
    out = job.parent / "part-per-batch"
    _assert_every_id_once(out, reference)
    # Parts were committed in batch order, one per batch, each announced once.
    parts = _manifest(out)
    assert [b for p in parts for b in p["batches"]] == sorted(
        b for p in parts for b in p["batches"]
    )
    events = [json.loads(line) for line in result.stderr.splitlines()]
    committed = [e["part"] for e in events if e["event"] == "checkpoint"]
    assert committed == [p["file"] for p in parts]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["batches"] == len(parts)
    assert summary["load_seconds"] > 0 and summary["prepare_seconds"] > 0
    outside = summary["wall_seconds"] - summary["model_seconds"]
    assert summary["seconds_outside_model"] == pytest.approx(outside)
    stats = pq.read_table(out / "stats" / "batches.parquet")
    assert sum(stats.column("seconds").to_pylist()) == pytest.approx(summary["model_seconds"])


def test_input_error_wins_over_a_model_that_cannot_load(tmp_path, tiny_model):
    """The input error is what the user sees, while the (broken) weights were loading; no batch
    ran."""
    model = _broken_weights(tmp_path, tiny_model)
    rows = write_jsonl(tmp_path / "in.jsonl", sample_prompts(200))
    rows.write_text(rows.read_text() + '{"prompt": "last",,}\n')
    job = write_job(tmp_path / "job.yaml", model, rows, tmp_path / "out")
    result = cli_subprocess("run", str(job))
    assert result.returncode == 2, result.stderr
    _one_line_error(result.stderr, "in.jsonl:201", "not valid JSON")
    assert not list((tmp_path / "out" / "checkpoint" / "parts").glob("*"))
    assert not (tmp_path / "out" / "stats").exists()


def test_input_error_with_a_good_model_loading(tmp_path, tiny_model):
    rows = write_jsonl(tmp_path / "in.jsonl", sample_prompts(200))
    rows.write_text(rows.read_text() + '["not", "an", "object"]\n')
    job = write_job(tmp_path / "job.yaml", tiny_model, rows, tmp_path / "out")
    result = cli("run", str(job))
    assert result.exit_code == 2
    message = result.output.strip()
    assert message.startswith("bulkinfer: error:") and len(message.splitlines()) == 1, message
    assert "in.jsonl:201" in message and "JSON object" in message
    assert not list((tmp_path / "out" / "checkpoint" / "parts").glob("*"))


def test_weights_that_cannot_load_give_their_own_message(tmp_path, tiny_model):
    model = _broken_weights(tmp_path, tiny_model)
    job = write_job(
        tmp_path / "job.yaml",
        model,
        write_jsonl(tmp_path / "in.jsonl", sample_prompts(20)),
        tmp_path / "out",
    )
    result = cli_subprocess("run", str(job))
    assert result.returncode == 2, result.stderr
    _one_line_error(result.stderr, "model.path:", "cannot load the weights")
    in_process = cli("run", str(job))
    assert in_process.exit_code == 2
    assert in_process.output.strip() == result.stderr.strip().splitlines()[-1]


def test_a_refusal_or_a_bad_row_while_the_weights_load_is_said_at_once(tmp_path, tiny_model):
    """A new folder's weights start loading before its fingerprint is taken: a shard refused
    there (its sibling ran other settings), or a bad input row found while the weights load,
    is said without waiting for the load (here stretched far past the subprocess' timeout)."""
    rows = write_jsonl(tmp_path / "in.jsonl", sample_prompts(20))
    job = write_job(tmp_path / "job.yaml", tiny_model, rows, tmp_path / "out")
    assert cli("run", str(job), "--shard", "0/2").exit_code == 0
    slow = {"BULKINFER_SLOW_LOAD_SECONDS": "900"}
    unlike = _run(job, "--shard", "1/2", "--set", "task.max_new_tokens=3", **slow)
    assert unlike.returncode == 2, unlike.stderr
    _one_line_error(unlike.stderr, "shard 0/2", "task.max_new_tokens")
    bad = write_jsonl(tmp_path / "bad.jsonl", sample_prompts(20))
    bad.write_text(bad.read_text() + '{"prompt": "last",,}\n')
    job = write_job(tmp_path / "bad.yaml", tiny_model, bad, tmp_path / "bad-out")
    result = _run(job, **slow)
    assert result.returncode == 2, result.stderr
    _one_line_error(result.stderr, "bad.jsonl:21", "not valid JSON")


# Writes, counted: job.json, the tokens spill file (created, then one write for the one input
# chunk), the ids spill file, job.json again; then each part's Parquet file and manifest line.
WRITES_BEFORE_PARTS = 5


@pytest.mark.parametrize("nth", [3, 4, 8, 10])
def test_write_error_on_the_writer_thread_ends_the_run_and_a_rerun_resumes(overlap_job, nth):
    make, reference = overlap_job
    job = make(f"enospc-{nth}")
    out = job.parent / f"enospc-{nth}"
    failed = _run(job, BULKINFER_FAIL_WRITE=str(nth))
    assert failed.returncode == 74, failed.stderr
    _one_line_error(failed.stderr, "No space left on device", "rerun to resume")
    assert not list(out.rglob(".*.tmp-*"))
    # every part before the failure is committed
    assert len(_manifest(out)) == max(0, nth - WRITES_BEFORE_PARTS - 1) // 2
    resumed = cli_again("run", str(job))
    assert resumed.returncode == 0, resumed.stderr
    _assert_every_id_once(out, reference)


@pytest.mark.parametrize("point", ["part_written:2", "part_committed:3", "part_written:9"])
def test_sigkill_during_a_background_write_resumes_every_id_once(overlap_job, point):
    make, reference = overlap_job
    name = "kill-" + point.replace(":", "-")
    job = make(name)
    first = _run(job, BULKINFER_KILL_AT=point)
    assert first.returncode == -signal.SIGKILL, first.stderr
    out = job.parent / name
    where, nth = point.split(":")
    # Killed on the writer thread: the nth part is in place but uncommitted, or just committed.
    assert len(_manifest(out)) == (int(nth) - 1 if where == "part_written" else int(nth))
    second = cli_again("run", str(job))
    assert second.returncode == 0, second.stderr
    assert "resuming" in second.stderr
    _assert_every_id_once(out, reference)


def test_sigterm_commits_every_batch_that_ran_before_exiting(overlap_job):
    """Parts of two batches: the final flush after the signal commits what is still buffered,
    and waits for the part being written."""
    make, reference = overlap_job
    job = make("sigterm", every_rows=6, progress={"log_every_seconds": 0.1})
    out = job.parent / "sigterm"
    proc = subprocess.Popen(
        [sys.executable, "-m", "bulkinfer", "run", str(job), "--log-format", "json"],
        env={**child_env(), "BULKINFER_SLOW_BATCH_SECONDS": "0.2"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    events = []
    for line in proc.stderr:
        events.append(json.loads(line))
        if events[-1]["event"] == "checkpoint":
            break
    proc.send_signal(signal.SIGTERM)
    events += [json.loads(line) for line in proc.stderr.read().splitlines()]
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    rows_run = max(e["rows_done"] for e in events if e["event"] == "progress")
    assert sum(p["rows"] for p in _manifest(out)) == rows_run < N_ROWS
    resumed = cli_again("run", str(job))
    assert resumed.returncode == 0, resumed.stderr
    _assert_every_id_once(out, reference)

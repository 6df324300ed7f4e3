"""A full disk at every write point, not a sample of them: the run (spill files, parts, manifest,
job.json, output buckets and files, dataset card, stats, summary, OpenAI responses), a shard
and the merge it triggers, and the report. Each failure ends with one line and exit 74, leaves
no temporary file, and a rerun once there is room gives the uninterrupted run's outputs.

`BULKINFER_FAIL_WRITE=n` fails the n-th durable write and every one after it, as a disk that
stays full does; the loops raise n until a run no longer reaches the n-th write."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest
from conftest import cli, read_outputs, write_job, write_jsonl

from bulkinfer import faults
from bulkinfer.job.exits import write_failure

MAX_WRITES = 200


def _request(i: int) -> dict:
    return {
        "custom_id": f"req-{i}",
        "method": "POST",
        "url": "/v1/completions",
        "body": {"model": "m", "prompt": f"the fox {i} " * (1 + i % 4), "max_tokens": 1 + i % 3},
    }


@pytest.fixture
def job_of(tmp_path, tiny_model):
    """A job writing to OUT/<name>: 24 OpenAI requests, several batches and parts."""
    inputs = write_jsonl(tmp_path / "in.jsonl", [_request(i) for i in range(24)])

    def make(name: str) -> Path:
        return write_job(
            tmp_path / f"{name}.yaml",
            tiny_model,
            inputs,
            tmp_path / name,
            task={"max_new_tokens": 4},
            batching={"max_tokens": 300, "max_batch_size": 6},
            checkpoint={"every_rows": 8},
        )

    return make


def _failing_at(monkeypatch, nth: int, *args: str):
    """The CLI in-process with the nth write and every later one failing (ENOSPC)."""
    faults._counts.clear()
    monkeypatch.setenv("BULKINFER_FAIL_WRITE", str(nth))
    try:
        return cli(*args)
    finally:
        monkeypatch.delenv("BULKINFER_FAIL_WRITE")
        faults._counts.clear()


def _assert_one_line_74(result, folder: Path) -> None:
    assert result.exit_code == 74, result.output
    assert "No space left on device" in result.output
    assert "rerun to resume" in result.output
    assert "Traceback" not in result.output
    assert not list(folder.rglob(".*.tmp-*")), "a temporary file was left behind"


def _responses(folder: Path) -> list[dict]:
    """The responses, less the time they were written at."""
    lines = (folder / "responses.jsonl").read_text(encoding="utf-8").splitlines()
    responses = [json.loads(line) for line in lines]
    for r in responses:
        r["response"]["body"].pop("created")
    return responses


def test_a_full_disk_at_every_write_of_a_run_then_a_rerun_gives_the_same_outputs(
    job_of, monkeypatch
):
    reference = job_of("reference")
    assert cli("run", str(reference)).exit_code == 0
    expected = read_outputs(reference.parent / "reference")
    expected_responses = _responses(reference.parent / "reference")
    for nth in range(1, MAX_WRITES):
        job = job_of(f"full-{nth}")
        out = job.parent / f"full-{nth}"
        result = _failing_at(monkeypatch, nth, "run", str(job))
        if result.exit_code == 0:
            break
        _assert_one_line_74(result, out)
        rerun = cli("run", str(job))
        assert rerun.exit_code == 0, f"write {nth}: {rerun.output}"
        assert read_outputs(out).equals(expected), (
            f"outputs differ after a full disk at write {nth}"
        )
        assert _responses(out) == expected_responses
    assert nth > 15, f"only {nth - 1} write points: the injection no longer reaches them"


def test_a_full_disk_at_every_write_of_the_last_shard_and_its_merge(job_of, monkeypatch):
    reference = job_of("reference")
    assert cli("run", str(reference)).exit_code == 0
    expected = read_outputs(reference.parent / "reference")
    for nth in range(1, MAX_WRITES):
        job = job_of(f"shards-{nth}")
        out = job.parent / f"shards-{nth}"
        assert cli("run", str(job), "--shard", "0/2").exit_code == 0
        result = _failing_at(monkeypatch, nth, "run", str(job), "--shard", "1/2")
        if result.exit_code == 0:
            break
        _assert_one_line_74(result, out)
        rerun = cli("run", str(job), "--shard", "1/2")
        assert rerun.exit_code == 0, f"write {nth}: {rerun.output}"
        assert read_outputs(out).equals(expected)
    assert nth > 10
    merged = job.parent / f"shards-{nth}"
    shutil.rmtree(merged / "outputs")  # (a merged job's merge is a no-op: one to redo)
    result = _failing_at(monkeypatch, 1, "merge", str(merged))
    _assert_one_line_74(result, merged)
    assert cli("merge", str(merged)).exit_code == 0
    assert read_outputs(merged).equals(expected)


def test_a_full_disk_while_writing_the_report(job_of, monkeypatch):
    job = job_of("report")
    out = job.parent / "report"
    assert cli("run", str(job)).exit_code == 0
    for nth in range(1, MAX_WRITES):
        result = _failing_at(monkeypatch, nth, "report", str(out))
        if result.exit_code == 0:
            break
        _assert_one_line_74(result, out)
    assert nth > 1
    assert (out / "report.html").is_file()


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG])
def test_a_write_error_without_a_file_name_names_the_output_folder(tmp_path, code):
    """A write() to an open file fails without a file name: the one line names the folder."""
    message = write_failure(OSError(code, "no room"), tmp_path)
    assert message == f"cannot write under {tmp_path}: no room"
    assert write_failure(OSError(errno.ENOENT, "gone", "/elsewhere/input.jsonl"), tmp_path) is None
    denied = OSError(errno.EACCES, "Permission denied", str(tmp_path / "job.json"))
    assert (
        write_failure(denied, tmp_path)
        == f"cannot write {tmp_path / 'job.json'}: Permission denied"
    )


def _unwritable_folder() -> Path | None:
    """A folder where even root cannot make one (sysfs), or None on a machine where it can."""
    folder = Path("/sys/kernel")
    try:
        folder.joinpath(".bulkinfer-test").mkdir()
    except OSError:
        return folder
    folder.joinpath(".bulkinfer-test").rmdir()
    return None


@pytest.mark.skipif(_unwritable_folder() is None, reason="no folder here refuses root's writes")
@pytest.mark.parametrize("command", ["validate", "run"])
def test_an_output_folder_that_cannot_be_written_is_refused_by_validate_as_run(
    tmp_path, tiny_model, command
):
    """validate said 'output (new folder)' for a place run then could not write (exit 74)."""
    inputs = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "a"}])
    out = _unwritable_folder() / "out"
    result = cli(command, str(write_job(tmp_path / "job.yaml", tiny_model, inputs, out)))
    assert result.exit_code == 74, result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("bulkinfer: error:") and f"cannot write {out}" in last, last
    assert "Traceback" not in result.output

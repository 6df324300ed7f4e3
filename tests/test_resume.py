"""Crash and resume: whatever moment a run dies at, the rerun ends with the uninterrupted outputs."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import (
    assert_every_id_once,
    child_env,
    cli,
    cli_again,
    cli_subprocess,
    read_outputs,
    sample_prompts,
    sampled_job,
    write_job,
    write_jsonl,
    write_parquet,
)

N_ROWS = 120


@pytest.fixture(scope="module")
def crash_job(tmp_path_factory, tiny_model):
    """A job of many small batches, and the outputs of one uninterrupted run of it."""
    task = {"temperature": 0.8, "seed": 3, "max_new_tokens": 6}
    batching = {"max_tokens": 400, "max_batch_size": 4}
    return sampled_job(tmp_path_factory.mktemp("crash"), tiny_model, N_ROWS, task, batching)


def _assert_same_outputs(out_dir, reference):
    assert_every_id_once(out_dir, reference, N_ROWS)


@pytest.mark.parametrize(
    "point", ["part_written", "part_committed", "batch_start", "outputs_written"]
)
def test_kill_at_each_write_point_then_resume(crash_job, point):
    make, reference = crash_job
    job = make(f"kill-{point}")
    env = {
        **child_env(),
        "BULKINFER_KILL_AT": f"{point}:3" if point != "outputs_written" else point,
    }
    first = subprocess.run(
        [sys.executable, "-m", "bulkinfer", "run", str(job)],
        env=env,
        capture_output=True,
        text=True,
    )
    assert first.returncode == -signal.SIGKILL, first.stderr
    second = cli_again("run", str(job))
    assert second.returncode == 0, second.stderr
    _assert_same_outputs(job.parent / f"kill-{point}", reference)


def test_sigkill_at_random_moments_then_resume(crash_job):
    make, reference = crash_job
    job = make("random-kills")
    rng = random.Random(0)
    kills = 0
    # Slowed batches keep a run going past the longest wait on a fast machine too (unslowed, the
    # whole job can end within one wait, and then there is nothing left to kill).
    env = {**child_env(), "BULKINFER_SLOW_BATCH_SECONDS": "0.3"}
    for _ in range(6):
        proc = subprocess.Popen(
            [sys.executable, "-m", "bulkinfer", "run", str(job)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            proc.wait(timeout=rng.uniform(0.5, 6.0))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            kills += 1
    assert kills >= 2
    final = cli_again("run", str(job))
    assert final.returncode == 0, final.stderr
    _assert_same_outputs(job.parent / "random-kills", reference)


def _kill_once_tokens_kept(job: Path, out: Path) -> None:
    """Run `job` and SIGKILL it once the tokenized input's record is written and two parts are
    committed."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "bulkinfer", "run", str(job)],
        env={**child_env(), "BULKINFER_SLOW_BATCH_SECONDS": "0.3"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    record = out / "checkpoint" / "prepared" / "prepared.json"
    manifest = out / "checkpoint" / "manifest.jsonl"
    deadline = time.monotonic() + 120
    while not (record.exists() and manifest.exists() and manifest.read_text().count("\n") >= 2):
        assert time.monotonic() < deadline and proc.poll() is None, "the run never got going"
        time.sleep(0.02)
    proc.kill()
    proc.wait()


REUSED = "the input as an earlier run of this job tokenized it"


@pytest.mark.parametrize("damage", [None, "tokens", "copied", "record", "edited", "arrays"])
def test_a_resume_reads_the_tokenized_input_the_killed_run_kept(crash_job, damage):
    """A resume does not read and tokenize the input again (minutes at millions of rows): it
    reads what the killed run kept, unless that is damaged or not the file the run wrote (a
    copy of the same size, from another job's folder say), and then tokenizes as before;
    either way the outputs are the uninterrupted run's."""
    make, reference = crash_job
    name = f"kept-{damage}"
    job = make(name)
    out = job.parent / name
    _kill_once_tokens_kept(job, out)
    prepared = out / "checkpoint" / "prepared"
    if damage == "tokens":  # one token short: not the file the record describes
        tokens = prepared / "tokens.int32"
        os.truncate(tokens, tokens.stat().st_size - 4)
    elif damage == "copied":  # the very bytes, in another file put in its place
        shutil.copyfile(prepared / "tokens.int32", tmp := prepared / "copy")
        os.replace(tmp, prepared / "tokens.int32")
    elif damage == "record":
        (prepared / "prepared.json").write_bytes(b'{"format": 2, "key": \xff')
    elif damage == "edited":  # still valid JSON, of the right shape: a value changed
        record = json.loads((prepared / "prepared.json").read_text())
        record["locations"][0][0] += 1
        (prepared / "prepared.json").write_text(json.dumps(record))
    elif damage == "arrays":  # cut short, then given back its size, times and all
        arrays = prepared / "prepared-arrays.npz"
        stat = arrays.stat()
        with open(arrays, "r+b") as f:
            f.seek(stat.st_size // 2)
            f.write(b"\0" * 64)
        os.utime(arrays, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    resumed = cli_again("run", str(job))
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr
    assert (REUSED in resumed.stderr) == (damage is None), resumed.stderr
    _assert_same_outputs(out, reference)
    assert not prepared.exists()  # a finished job keeps no spill files


def _requests(n: int) -> list[dict]:
    """OpenAI batch requests, chat and completions, with their own settings; a few that cannot
    run (no prompt, an unknown url) fail as rows."""
    out = []
    for i, row in enumerate(sample_prompts(n)):
        body = {"model": "m", "max_tokens": 1 + i % 7, "temperature": 0.7, "seed": i}
        if i % 3:
            body["messages"] = [{"role": "user", "content": row["prompt"]}]
            url = "/v1/chat/completions"
        else:
            body["prompt"] = None if i % 29 == 0 else row["prompt"]
            url = "/v1/completions" if i % 31 else "/v1/unknown"
        out.append({"custom_id": row["id"], "method": "POST", "url": url, "body": body})
    return out


@pytest.mark.parametrize("kind", ["parquet", "openai"])
def test_a_resume_from_kept_tokens_gives_the_outputs_of_one_run(tmp_path, tiny_model, kind):
    """What the kept record must carry beside the tokens: failed rows, kept columns of several
    types, shared prefixes; an OpenAI batch file's per-request settings."""
    if kind == "parquet":
        rows = [
            {
                **r,
                "prompt": None if i % 23 == 0 else "shared opening words " * 6 + r["prompt"],
                "meta": {"n": i, "tags": [r["source"]] * (i % 3)},
            }
            for i, r in enumerate(sample_prompts(90))
        ]
        inputs = write_parquet(tmp_path / "in.parquet", rows)
        sections = {"input": {"keep_columns": ["source", "meta"]}}
        sections["batching"] = {"max_tokens": 400, "max_batch_size": 4, "min_shared_prefix": 8}
    else:
        inputs = tmp_path / "requests.jsonl"
        inputs.write_text("".join(json.dumps(r) + "\n" for r in _requests(90)))
        sections = {"batching": {"max_tokens": 400, "max_batch_size": 4}}
    jobs = {
        name: write_job(
            tmp_path / f"{name}.yaml",
            tiny_model,
            inputs,
            tmp_path / name,
            task={"max_new_tokens": 6, "temperature": 0.8, "seed": 5},
            checkpoint={"every_rows": 4},
            **sections,
        )
        for name in ("reference", "killed")
    }
    assert cli("run", str(jobs["reference"])).exit_code == 0
    _kill_once_tokens_kept(jobs["killed"], tmp_path / "killed")
    resumed = cli_again("run", str(jobs["killed"]))
    assert resumed.returncode == 0, resumed.stderr
    assert REUSED in resumed.stderr, resumed.stderr
    expected = read_outputs(tmp_path / "reference")
    assert expected.column("error").null_count < expected.num_rows  # some rows failed
    assert read_outputs(tmp_path / "killed").equals(expected)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_graceful_signal_writes_batch_in_flight_and_exits_nonzero(crash_job, sig):
    make, reference = crash_job
    job = make(f"signal-{sig.name}")
    out = job.parent / f"signal-{sig.name}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "bulkinfer", "run", str(job)],
        # slowed like the random-kill test, so the signal lands mid-run however loaded the box
        env={**child_env(), "BULKINFER_SLOW_BATCH_SECONDS": "0.3"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    manifest = out / "checkpoint" / "manifest.jsonl"
    deadline = time.monotonic() + 120
    while not (manifest.exists() and manifest.read_text().count("\n") >= 2):
        assert time.monotonic() < deadline and proc.poll() is None, "the run never got going"
        time.sleep(0.05)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, stderr
    assert "rerun the same command to resume" in stderr
    assert not (out / "summary.json").exists()
    resumed = cli_again("run", str(job))
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr
    # its rows count the first run's, its tokens are its own: the line says which is which
    last = [line for line in resumed.stderr.splitlines() if " rows (" in line][-1]
    assert " before), " in last and " tokens this run, " in last, last
    _assert_same_outputs(out, reference)


@pytest.mark.parametrize(
    "sig, overwrite",
    [(signal.SIGTERM, False), (signal.SIGUSR1, False), (signal.SIGTERM, True)],
)
def test_a_stop_before_the_first_batch_says_so_and_resumes(crash_job, sig, overwrite):
    """SIGTERM (scancel) or Slurm's time warning while the job sets up: no batch is in flight,
    so the run ends at once, with the stopped run's line and exit code, and resumes. A run
    with --overwrite is resumed without it (the same command would start afresh)."""
    make, reference = crash_job
    name = f"early-{sig.name}" + ("-overwrite" if overwrite else "")
    job = make(name)
    out = job.parent / name
    proc = subprocess.Popen(
        [sys.executable, "-m", "bulkinfer", "run", str(job)] + ["--overwrite"] * overwrite,
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lock = out / ".lock"  # written as the run takes its folder, before the set-up
    deadline = time.monotonic() + 120
    while not (lock.exists() and lock.read_text().strip()):
        assert time.monotonic() < deadline and proc.poll() is None, "the run never got going"
        time.sleep(0.01)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, stderr
    assert f"stopped by {sig.name} before its first batch" in stderr, stderr
    advice = "rerun it without --overwrite" if overwrite else "rerun the same command"
    assert advice in stderr, stderr
    assert ("give it more time (--time)" in stderr) == (sig == signal.SIGUSR1), stderr
    assert "Traceback" not in stderr
    # nothing committed: no manifest yet, or the empty one a new job's folder starts with (a
    # stop that lands after the plan is recorded, as on a loaded machine)
    manifest = out / "checkpoint" / "manifest.jsonl"
    assert not manifest.exists() or not manifest.read_text().strip()
    resumed = cli_again("run", str(job))
    assert resumed.returncode == 0, resumed.stderr
    _assert_same_outputs(out, reference)


def _wait_for_handler(pid: int, sig: int, seconds: float = 60) -> None:
    """Until the process catches `sig` (its SigCgt mask in /proc): before that the signal's
    default action, not bulkinfer, would end it."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        status = Path(f"/proc/{pid}/status").read_text()
        caught = int(
            next(line for line in status.splitlines() if line.startswith("SigCgt:")).split()[1], 16
        )
        if caught >> (sig - 1) & 1:
            return
        time.sleep(0.002)
    raise AssertionError(f"the process never caught signal {sig}")


@pytest.mark.parametrize(
    "sig, overwrite", [(signal.SIGTERM, False), (signal.SIGUSR1, False), (signal.SIGTERM, True)]
)
def test_a_stop_while_the_command_starts_says_so(crash_job, sig, overwrite):
    """SIGTERM (scancel) or Slurm's warning a moment after the command starts, while its
    modules import (before the run has handlers of its own): one line and exit 128 + the
    signal, not a silent death by it; the rerun finishes the job. A run with --overwrite is
    resumed without it."""
    make, reference = crash_job
    name = f"starting-{sig.name}" + ("-overwrite" if overwrite else "")
    job = make(name)
    proc = subprocess.Popen(
        [sys.executable, "-m", "bulkinfer", "--log-format", "plain", "run", str(job)]
        + ["--overwrite"] * overwrite,
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_for_handler(proc.pid, sig)  # as early as the command can answer it
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, stderr
    advice = "rerun it without --overwrite" if overwrite else "rerun the same command"
    assert f"stopped by {sig.name}" in stderr and advice in stderr, stderr
    assert "Traceback" not in stderr
    resumed = cli_again("run", str(job))
    assert resumed.returncode == 0, resumed.stderr
    _assert_same_outputs(job.parent / name, reference)


STOP_IN_IMPORT = r"""
import pathlib, sys, time
from bulkinfer.errors import StopRequested
from bulkinfer.job.exits import stops_at_once

folder = pathlib.Path(sys.argv[1])
(folder / "stopping_module.py").write_text(
    "import signal\nsignal.raise_signal(signal.SIGTERM)\nfinished = True\n"
)
sys.path.insert(0, str(folder))
with stops_at_once():
    try:
        import stopping_module
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            time.sleep(0.01)
        print("not stopped")
    except StopRequested:
        print("stopped", getattr(sys.modules.get("stopping_module"), "finished", False))
"""


def test_a_stop_landing_inside_an_import_waits_for_the_import(tmp_path):
    """SIGTERM raised as StopRequested inside a module torch's C++ side was importing aborted
    the process (an 88-line C++ dump, exit 134, not the stopped run's 143). A stop inside
    any import now comes again a moment later: the import completes, then the run stops."""
    done = subprocess.run(
        [sys.executable, "-c", STOP_IN_IMPORT, str(tmp_path)],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["stopped", "True"], done.stdout + done.stderr


CTRL_C_IN_CALLBACK = r"""
import weakref
from bulkinfer.job.exits import stops_at_once

class Held:
    pass

def interrupt(_):
    raise KeyboardInterrupt  # as Ctrl-C's does, landing in an import-lock callback

with stops_at_once() as at_once:
    held = Held()
    ref = weakref.ref(held, interrupt)
    del held  # the callback runs; Python drops what it raises
    try:
        at_once.check()
        print("ran on")
    except KeyboardInterrupt:
        print("interrupted")
"""


def test_a_ctrl_c_dropped_in_a_callback_still_stops_the_run():
    """A KeyboardInterrupt raised inside a weakref or import-lock callback is printed as
    'Exception ignored' and dropped: one Ctrl-C during start-up then ran the whole job to the
    end, exit 0. The run's next check raises it again."""
    done = subprocess.run(
        [sys.executable, "-c", CTRL_C_IN_CALLBACK],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["interrupted"], done.stdout + done.stderr
    assert "Exception ignored" not in done.stderr


def test_a_finished_job_whose_outputs_were_removed_writes_them_again(crash_job):
    make, reference = crash_job
    job = make("outputs-removed")
    out = job.parent / "outputs-removed"
    assert cli_subprocess("run", str(job)).returncode == 0
    shutil.rmtree(out / "outputs")
    again = cli_again("run", str(job))
    assert again.returncode == 0, again.stderr
    assert "outputs is missing from a finished job" in again.stderr
    _assert_same_outputs(out, reference)


def test_corrupt_part_is_detected_and_recomputed(crash_job):
    make, reference = crash_job
    job = make("corrupt")
    env = {**child_env(), "BULKINFER_KILL_AT": "batch_start:12"}
    subprocess.run(
        [sys.executable, "-m", "bulkinfer", "run", str(job)], env=env, capture_output=True
    )
    parts = sorted((job.parent / "corrupt" / "checkpoint" / "parts").glob("*.parquet"))
    assert len(parts) >= 2
    data = parts[1].read_bytes()
    parts[1].write_bytes(data[: len(data) // 2])
    resumed = cli_again("run", str(job))
    assert resumed.returncode == 0, resumed.stderr
    assert "corrupt" in resumed.stderr
    _assert_same_outputs(job.parent / "corrupt", reference)


def test_a_removed_manifest_is_a_warning_and_keeps_the_folder_the_job_s(crash_job):
    """Part files without their manifest: the rerun warns and recomputes their rows, and a
    different job is refused there (the folder once looked like one without results, which
    any job took over silently)."""
    make, reference = crash_job
    job = make("no-manifest")
    out = job.parent / "no-manifest"
    env = {**child_env(), "BULKINFER_KILL_AT": "batch_start:12"}
    subprocess.run(
        [sys.executable, "-m", "bulkinfer", "run", str(job)], env=env, capture_output=True
    )
    assert list((out / "checkpoint" / "parts").glob("*.parquet"))
    (out / "checkpoint" / "manifest.jsonl").unlink()
    other = cli_again("run", str(job), "--set", "task.max_new_tokens=2")
    assert other.returncode == 2 and "--overwrite" in other.stderr, other.stderr
    resumed = cli_again("run", str(job))
    assert resumed.returncode == 0, resumed.stderr
    assert "manifest.jsonl is missing" in resumed.stderr, resumed.stderr
    _assert_same_outputs(out, reference)


def test_finished_job_is_a_noop_and_other_jobs_are_refused(crash_job, tmp_path):
    make, reference = crash_job
    job = make("reference")
    out = job.parent / "reference"
    before = (out / "summary.json").read_text()
    again = cli("run", str(job))
    assert again.exit_code == 0
    assert "already finished" in again.output
    assert f"outputs          {out / 'outputs'}/" in again.output  # and where they are
    assert (out / "summary.json").read_text() == before

    other = cli("run", str(job), "--set", "task.max_new_tokens=3")
    assert other.exit_code == 2
    assert "another job" in other.output and "--overwrite" in other.output

    inputs = job.parent / "in.jsonl"
    original = inputs.read_text()
    inputs.write_text(original.replace("fox", "cat", 1))
    try:
        changed = cli("run", str(job))
        assert changed.exit_code == 2
        assert "input files changed" in changed.output
    finally:
        inputs.write_text(original)


def test_overwrite_starts_afresh(crash_job):
    make, reference = crash_job
    job = make("overwrite")
    assert cli("run", str(job), "--set", "task.max_new_tokens=2").exit_code == 0
    result = cli("run", str(job), "--overwrite")
    assert result.exit_code == 0, result.output
    _assert_same_outputs(job.parent / "overwrite", reference)
    summary = json.loads((job.parent / "overwrite" / "summary.json").read_text())
    assert summary["rows_out"] == N_ROWS


def test_output_folder_with_foreign_files_is_refused(tmp_path, tiny_model):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    job = write_job(
        tmp_path / "job.yaml",
        tiny_model,
        write_jsonl(tmp_path / "in.jsonl", sample_prompts(3)),
        out,
    )
    result = cli("run", str(job))
    assert result.exit_code == 2
    assert "not empty" in result.output
    assert os.listdir(out) == ["notes.txt"]

    # --overwrite removes only what bulkinfer made: the user's files under the names it writes
    # (a README.md, a stats/ folder) were deleted, and the README replaced by the dataset card
    (out / "README.md").write_text("my notes")
    (out / "stats").mkdir()
    (out / "stats" / "results.csv").write_text("a,b")
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    # the plain run's refusal does not send the user to an --overwrite that refuses too
    result = cli("run", str(job))
    assert result.exit_code == 2 and "pass --overwrite" not in result.output, result.output
    assert "--overwrite would not remove" in result.output, result.output
    assert "README.md" in result.output and "stats/" in result.output
    result = cli("run", str(job), "--overwrite")
    assert result.exit_code == 2, result.output
    assert "there are not bulkinfer's" in result.output
    assert "deleted nothing" in result.output
    assert sorted(p.relative_to(out) for p in out.rglob("*") if p.name != ".lock") == before
    (out / "README.md").unlink()
    shutil.rmtree(out / "stats")
    result = cli("run", str(job), "--overwrite")  # beside the user's other files
    assert result.exit_code == 0, result.output
    assert (out / "notes.txt").read_text() == "mine"
    killed = subprocess.run(
        [sys.executable, "-m", "bulkinfer", "run", str(job), "--overwrite"],
        env={**child_env(), "BULKINFER_KILL_AT": "overwrite_removed:2"},
        capture_output=True,
        text=True,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    refused = cli("run", str(job))  # half emptied: no job to resume; --overwrite goes on
    assert refused.exit_code == 2 and "--overwrite" in refused.output, refused.output
    # said as what it is (it spoke of a lost job.json to put back, which bulkinfer set aside)
    assert "an --overwrite was stopped while emptying" in refused.output, refused.output
    status = cli("status", str(out))  # said it was no bulkinfer job's folder, exit 2
    assert status.exit_code == 0, status.output
    assert "job  stopped" in status.output and "stopped while emptying" in status.output
    assert cli("run", str(job), "--overwrite").exit_code == 0
    assert read_outputs(out).num_rows == 3 and (out / "notes.txt").exists()


@pytest.mark.parametrize("nth", [2, 5])
def test_full_disk_stops_cleanly_and_a_rerun_resumes(crash_job, nth):
    make, reference = crash_job
    job = make(f"enospc-{nth}")
    env = {**child_env(), "BULKINFER_FAIL_WRITE": str(nth)}
    failed = subprocess.run(
        [sys.executable, "-m", "bulkinfer", "run", str(job)],
        env=env,
        capture_output=True,
        text=True,
    )
    assert failed.returncode == 74, failed.stderr
    assert "No space left on device" in failed.stderr
    assert "Traceback" not in failed.stderr
    assert not list((job.parent / f"enospc-{nth}").rglob(".*.tmp-*"))
    resumed = cli_again("run", str(job))
    assert resumed.returncode == 0, resumed.stderr
    _assert_same_outputs(job.parent / f"enospc-{nth}", reference)


@pytest.mark.parametrize(
    "task",
    [{"type": "score"}, {"type": "generate", "max_new_tokens": 4}],
    ids=["score", "generate"],
)
def test_a_failing_row_s_bisection_is_not_counted_as_out_of_memory(tmp_path, tiny_model, task):
    """The batch halves down to the row that fails (a generation stream first falls back to a
    batch at a time): its splits are in the batch's stats, but the summary's oom_splits counts
    only splits for out of memory (none here); every other row is as a clean run gives it."""
    import pyarrow.parquet as pq

    inputs = write_jsonl(tmp_path / "in.jsonl", sample_prompts(16))
    outputs = {}
    for name, fail in (("clean", None), ("out", "5")):
        job = write_job(tmp_path / f"{name}.yaml", tiny_model, inputs, tmp_path / name, task=task)
        env = {**child_env(), **({"BULKINFER_FAIL_ROW": fail} if fail else {})}
        command = [sys.executable, "-m", "bulkinfer", "run", str(job)]
        proc = subprocess.run(command, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-2000:]
        outputs[name] = read_outputs(tmp_path / name).sort_by("id").to_pylist()
    errors = [r["error"] for r in outputs["out"]]
    assert [i for i, e in enumerate(errors) if e] == [5] and "injected" in errors[5]
    column = "logprob_sum" if task["type"] == "score" else "text"
    for i, (got, want) in enumerate(zip(outputs["out"], outputs["clean"], strict=True)):
        if i != 5:
            assert got[column] == pytest.approx(want[column], rel=1e-4), i
    stats = pq.read_table(tmp_path / "out" / "stats" / "batches.parquet").to_pylist()
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert sum(s["splits"] for s in stats) > 0
    assert summary["oom_splits"] == 0 and sum(s["oom_splits"] for s in stats) == 0


def test_out_of_memory_splits_the_batch_and_later_batches_run_smaller(tmp_path, tiny_model):
    import pyarrow.parquet as pq

    inputs = write_jsonl(tmp_path / "in.jsonl", sample_prompts(N_ROWS))
    jobs = {
        name: write_job(
            tmp_path / f"{name}.yaml",
            tiny_model,
            inputs,
            tmp_path / name,
            task={"max_new_tokens": 6},
            batching={"max_tokens": 3000, "max_batch_size": 64},
        )
        for name in ("plain", "oom")
    }
    assert cli("run", str(jobs["plain"])).exit_code == 0
    env = {**child_env(), "BULKINFER_OOM_ABOVE_TOKENS": "800"}
    proc = subprocess.run(
        [sys.executable, "-m", "bulkinfer", "run", str(jobs["oom"])],
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    reference, got = read_outputs(tmp_path / "plain"), read_outputs(tmp_path / "oom")
    assert got.column("error").null_count == N_ROWS
    assert got.column("text").to_pylist() == reference.column("text").to_pylist()
    stats = pq.read_table(tmp_path / "oom" / "stats" / "batches.parquet").to_pylist()
    summary = json.loads((tmp_path / "oom" / "summary.json").read_text())
    assert summary["oom_splits"] == sum(s["splits"] for s in stats) > 0
    assert summary["oom_splits"] == sum(s["oom_splits"] for s in stats)
    # After the first split the smaller size holds: later oversized batches need no split.
    oversized = [s for s in stats if s["padded_tokens"] + 6 * s["rows"] > 800]
    assert len(oversized) > 1
    assert sum(s["splits"] > 0 for s in oversized) < len(oversized)


def test_what_a_kill_leaves_in_finished_folders_goes_at_the_next_run(tmp_path, tiny_model):
    """A kill between writing summary.json and removing the tokenized input kept the spill (~4
    bytes a token) for good; temporary files of writes a kill cut short stayed in the parts and
    stats folders, and at the top of a sharded job (written by its merges)."""
    rows = [{"id": i, "prompt": text} for i, text in enumerate(sample_prompts(12))]
    job = write_job(
        tmp_path / "job.yaml",
        tiny_model,
        write_jsonl(tmp_path / "in.jsonl", rows),
        tmp_path / "out",
    )
    out = tmp_path / "out"
    assert cli("run", str(job)).exit_code == 0
    reference = read_outputs(out)
    left = [
        out / "checkpoint" / "prepared" / "tokens.int32",
        out / "checkpoint" / "parts" / ".part-b0000001.parquet.tmp-4242",
        out / "stats" / ".batches.parquet.tmp-4242",
    ]
    for path in left:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    result = cli("run", str(job))
    assert result.exit_code == 0 and "already finished" in result.output
    assert not any(path.exists() for path in left)
    assert not (out / "checkpoint" / "prepared").exists()
    assert read_outputs(out).equals(reference)

    sharded = tmp_path / "sharded"
    job = write_job(tmp_path / "s.yaml", tiny_model, tmp_path / "in.jsonl", sharded)
    for i in range(2):
        assert cli("run", str(job), "--shard", f"{i}/2").exit_code == 0
    left = [sharded / ".summary.json.tmp-4242", sharded / "stats" / ".batches.parquet.tmp-4242"]
    for path in left:
        path.write_bytes(b"x")
    assert cli("merge", str(sharded)).exit_code == 0
    assert not any(path.exists() for path in left)
    assert read_outputs(sharded).equals(reference)


def test_the_same_files_in_another_order_are_another_input(tmp_path, tiny_model):
    """Rows are known by their position, so a run resumed, or a shard run, on input.path's
    files in another order would put answers on the wrong ids; it was taken for the same input
    (each file's bytes were hashed, not their order). Now it is refused, naming the input."""
    rows = sample_prompts(24)
    first = write_jsonl(tmp_path / "b.jsonl", rows[:12])
    second = write_jsonl(tmp_path / "a.jsonl", [{**r, "id": f"a-{r['id']}"} for r in rows[12:]])
    orders = {"given": [first, second], "sorted": [second, first]}
    jobs = {
        name: write_job(tmp_path / f"{name}.yaml", tiny_model, files, tmp_path / "out")
        for name, files in orders.items()
    }
    killed = subprocess.run(
        [sys.executable, "-m", "bulkinfer", "run", str(jobs["given"])],
        env={**child_env(), "BULKINFER_KILL_AT": "part_committed:1"},
        capture_output=True,
        text=True,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    refused = cli("run", str(jobs["sorted"]))
    assert refused.exit_code == 2 and "input files changed" in refused.output, refused.output
    assert cli("run", str(jobs["given"])).exit_code == 0
    reference = write_job(tmp_path / "ref.yaml", tiny_model, orders["given"], tmp_path / "ref")
    assert cli("run", str(reference)).exit_code == 0
    assert_every_id_once(tmp_path / "out", read_outputs(tmp_path / "ref"), len(rows))

    for index, name in enumerate(orders):  # shards of one job, given the files each way round
        job = write_job(tmp_path / f"s{index}.yaml", tiny_model, orders[name], tmp_path / "sh")
        result = cli("run", str(job), "--shard", f"{index}/2")
    assert result.exit_code == 2 and "input" in result.output, result.output
    assert not (tmp_path / "sh" / "outputs").exists()


def _auto_picks_fast(monkeypatch) -> None:
    """`model.engine: auto` as on a GPU box whose compile cache makes any job pay back the fast
    engine (the CPU picks the reference engine)."""
    from bulkinfer.engines import select

    monkeypatch.setattr(select, "wants_fast", lambda options: options.engine in ("auto", "fast"))
    monkeypatch.setattr(select, "AUTO_FAST_TOKENS_COLD", 0)
    monkeypatch.setattr(select, "AUTO_FAST_TOKENS_WARM", 0)


def _engine_job(tmp_path, model, name: str):
    """A generate job of 40 rows whose two engines plan other batches, writing to
    tmp_path/NAME."""
    return write_job(
        tmp_path / f"{name}.yaml",
        model,
        write_jsonl(tmp_path / "in.jsonl", sample_prompts(40)),
        tmp_path / name,
        task={"max_new_tokens": 8},  # (at 6 both engines plan the same batches)
        batching={"max_tokens": 400, "max_batch_size": 6},
        checkpoint={"every_rows": 4},
    )


def _killed(job):
    """`job` run once and killed after its third part."""
    killed = cli_subprocess("run", str(job), env={"BULKINFER_KILL_AT": "part_committed:3"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    return job


def test_a_resume_runs_the_engine_that_ran_the_committed_rows(tmp_path, tiny_model, monkeypatch):
    """`model.engine: auto` resolves by the machine and the rows left (a warm compile cache,
    a GPU); the engines plan other batches (one pads, one packs), and parts name the batches
    they complete by number: a resume under the other engine left rows missing and others
    doubled, and every rerun failed at the end. The engine that ran the folder's rows runs the
    rest."""
    assert cli("run", str(_engine_job(tmp_path, tiny_model, "whole"))).exit_code == 0
    job = _killed(_engine_job(tmp_path, tiny_model, "out"))
    recorded = json.loads((tmp_path / "out" / "job.json").read_text())
    assert recorded["engine"] == "reference"
    _auto_picks_fast(monkeypatch)
    resumed = cli("run", str(job))
    assert resumed.exit_code == 0, resumed.output
    assert "the reference engine runs the rest of this job" in resumed.output
    assert_every_id_once(tmp_path / "out", read_outputs(tmp_path / "whole"), 40)


def test_a_resume_that_plans_other_batches_is_refused_in_one_line(tmp_path, tiny_model):
    """Where the rows left would be planned into other batches than the committed parts name
    (the input tokenized otherwise by another library version; here a record saying the other
    engine ran them), the rerun stops before running anything, saying so, and the folder
    resumes once the record is back."""
    spec = _killed(_engine_job(tmp_path, tiny_model, "out"))
    record = tmp_path / "out" / "job.json"
    kept = record.read_text()
    record.write_text(json.dumps({**json.loads(kept), "engine": "fast"}))
    parts = sorted(p.name for p in (tmp_path / "out" / "checkpoint" / "parts").iterdir())
    refused = cli_subprocess("run", str(spec))
    assert refused.returncode == 2, refused.stderr
    assert "plans other batches than the run that committed its parts" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert sorted(p.name for p in (tmp_path / "out" / "checkpoint" / "parts").iterdir()) == parts
    record.write_text(kept)
    assert cli("run", str(spec)).exit_code == 0

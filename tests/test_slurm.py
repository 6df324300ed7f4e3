"""A real one-node Slurm cluster: an array of 4 shards, one preempted and requeued mid-run, merged
output identical to a single-process run of the same job."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import cli, read_outputs, sample_prompts, write_job, write_jsonl
from slurm_fixture import slurm_cluster, wait_for_jobs  # noqa: F401  (the fixture, by import)

pytestmark = pytest.mark.usefixtures("slurm_cluster")


def _batch_shell(job, shard: str) -> int:
    """The pid of the batch shell running `shard` of this job file (its bulkinfer's parent)."""
    for proc in Path("/proc").iterdir():
        try:
            args = (proc / "cmdline").read_bytes().decode().split("\0")
            stat = (proc / "stat").read_text()
        except OSError:
            continue
        if str(job) in args and shard in args and "--shard" in args:
            return int(stat.rsplit(")", 1)[1].split()[1])
    raise AssertionError(f"no bulkinfer of shard {shard} of {job} is running")


def _manifest_lines(folder) -> int:
    manifest = folder / "checkpoint" / "manifest.jsonl"
    return manifest.read_text().count("\n") if manifest.exists() else 0


def test_array_with_a_preempted_task_merges_to_the_single_run(tmp_path, tiny_model, monkeypatch):
    inputs = write_jsonl(tmp_path / "in.jsonl", sample_prompts(80))

    def make(name: str):
        return write_job(
            tmp_path / f"{name}.yaml",
            tiny_model,
            inputs,
            tmp_path / name,
            task={"temperature": 0.7, "seed": 11, "max_new_tokens": 4},
            input={"keep_columns": ["source"]},
            batching={"max_tokens": 400, "max_batch_size": 2},
            checkpoint={"every_rows": 2},
        )

    assert cli("run", str(make("single"))).exit_code == 0
    reference = read_outputs(tmp_path / "single")

    job = make("array")
    out = tmp_path / "array"
    monkeypatch.setenv("BULKINFER_SLOW_BATCH_SECONDS", "0.5")  # sbatch passes the environment on
    submitted = cli("slurm", str(job), "--array", "4", "--grace", "5")
    assert submitted.exit_code == 0, submitted.output
    job_id = re.search(r"submitted array job (\d+)", submitted.output).group(1)

    victim = out / "shards" / "shard-00001-of-00004"
    deadline = time.monotonic() + 180
    while _manifest_lines(victim) < 1:
        assert time.monotonic() < deadline, "array task 1 never committed a part"
        time.sleep(0.2)
    # Slurm's warning (--signal=B:USR1@S) goes to the task's batch shell. Sent here straight
    # to it: `scancel --batch --signal=USR1` retries its request for seconds and can signal the
    # requeued task again as it starts, which ends it unrequeued (a warning before the first
    # batch means start-up outlasts the time limit)
    os.kill(_batch_shell(job, "1/4"), signal.SIGUSR1)

    states = wait_for_jobs(job_id, timeout=600)
    assert set(states.values()) == {"COMPLETED"}, states
    logs = "".join(p.read_text() for p in sorted((out / "logs").glob(f"{job_id}_1.log")))
    assert "requeueing" in logs and "resuming" in logs, logs[-2000:]

    got = read_outputs(out)
    ids = got.column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 80
    assert got.equals(reference)
    status = cli("status", str(out))
    assert "4 of 4 shards done" in status.output


def test_a_batch_script_of_several_tasks_without_srun_runs_the_whole_job(tmp_path, tiny_model):
    """The batch script of `sbatch --ntasks=2` sees SLURM_NTASKS=2 and SLURM_PROCID=0 as srun's
    first task does: a plain `bulkinfer run` there ran shard 0 of 2, and no run ever did shard
    1. It now runs the whole job and says how to use the tasks; under srun each task is a shard."""
    import sys

    inputs = write_jsonl(tmp_path / "in.jsonl", sample_prompts(12))
    jobs = {
        name: write_job(tmp_path / f"{name}.yaml", tiny_model, inputs, tmp_path / name)
        for name in ("plain", "srun", "single")
    }
    assert cli("run", str(jobs["single"])).exit_code == 0
    run = f"{sys.executable} -m bulkinfer run"
    script = tmp_path / "two_tasks.sh"
    script.write_text(
        "#!/bin/bash\n"
        f"#SBATCH --ntasks=2\n#SBATCH --output={tmp_path}/slurm-%j.out\n"
        f"{run} {jobs['plain']}\n"
        f"srun {run} {jobs['srun']}\n"
    )
    submitted = subprocess.run(
        ["sbatch", "--parsable", str(script)], capture_output=True, text=True, check=True
    )
    states = wait_for_jobs(submitted.stdout, timeout=300)
    log = next(tmp_path.glob("slurm-*.out")).read_text()
    assert set(states.values()) == {"COMPLETED"}, log[-3000:]
    assert "has 2 tasks but bulkinfer was not started by srun" in log, log[-3000:]
    reference = read_outputs(tmp_path / "single")
    assert not (tmp_path / "plain" / "shards").exists()
    assert read_outputs(tmp_path / "plain").equals(reference)
    assert sorted(p.name for p in (tmp_path / "srun" / "shards").iterdir()) == [
        "shard-00000-of-00002",
        "shard-00001-of-00002",
    ]
    assert read_outputs(tmp_path / "srun").equals(reference)


def test_tasks_submitted_apart_run_their_own_shards_of_one_split(tmp_path, tiny_model):
    """Resubmitting one task of the array, as Slurm users do (`sbatch --array=1 sbatch.sh`),
    gave it SLURM_ARRAY_TASK_COUNT=1 and it was refused as a split into 1; tasks submitted
    apart now run the shards their ids name, and the last merges. The output folder's name
    has a space, which the #SBATCH lines once split on."""
    inputs = write_jsonl(tmp_path / "in.jsonl", sample_prompts(30))
    job = write_job(tmp_path / "apart.yaml", tiny_model, inputs, tmp_path / "single")
    assert cli("run", str(job)).exit_code == 0
    reference = read_outputs(tmp_path / "single")
    out = tmp_path / "by hand"
    dry = cli("slurm", str(job), "--array", "3", "--output", str(out), "--dry-run")
    assert dry.exit_code == 0, dry.output
    out.mkdir()
    (out / "logs").mkdir()
    script = out / "sbatch.sh"
    script.write_text(dry.output)
    for tasks in ("0,2", "1"):
        submitted = subprocess.run(
            ["sbatch", "--parsable", f"--array={tasks}", str(script)],
            capture_output=True,
            text=True,
        )
        assert submitted.returncode == 0, submitted.stderr
        states = wait_for_jobs(submitted.stdout.strip().split(";")[0], timeout=300)
        logs = "".join(p.read_text() for p in (out / "logs").glob("*.log"))
        assert set(states.values()) == {"COMPLETED"}, logs[-3000:]
    assert read_outputs(out).equals(reference)
    assert "3 of 3 shards done" in cli("status", str(out)).output


def test_status_tells_tasks_waiting_in_the_queue_and_how_to_resubmit_cancelled_ones(
    tmp_path, tiny_model, monkeypatch
):
    """The folder alone cannot tell a shard whose task waits in Slurm's queue from one whose
    task was cancelled (both have no folder, or a stopped one): `status` asks squeue about the
    array `bulkinfer slurm` submitted, says which tasks wait and how to resubmit those that
    ended, and a resubmission into the folder finishes the job."""
    inputs = write_jsonl(tmp_path / "in.jsonl", sample_prompts(24))
    job = write_job(
        tmp_path / "queued.yaml",
        tiny_model,
        inputs,
        tmp_path / "out",
        batching={"max_tokens": 400, "max_batch_size": 2},
        checkpoint={"every_rows": 2},
    )
    single = write_job(tmp_path / "single.yaml", tiny_model, inputs, tmp_path / "single")
    assert cli("run", str(single)).exit_code == 0
    out = tmp_path / "out"
    monkeypatch.setenv("BULKINFER_SLOW_BATCH_SECONDS", "1")
    submitted = cli("slurm", str(job), "--array", "3", "--max-parallel", "1")
    assert submitted.exit_code == 0, submitted.output
    job_id = re.search(r"submitted array job (\d+)", submitted.output).group(1)

    deadline = time.monotonic() + 120
    while True:
        status = cli("status", str(out)).output
        if re.search(r"0/3\s+running", status):
            break
        assert time.monotonic() < deadline, status
        time.sleep(0.5)
    for shard in (1, 2):
        assert re.search(rf"{shard}/3\s+pending.*Slurm task {job_id}_{shard} waiting", status), (
            status
        )
    twice = cli("slurm", str(job), "--array", "3")  # its shards would run twice
    assert twice.exit_code == 2 and "still in Slurm's queue" in twice.output, twice.output
    subprocess.run(["scancel", job_id], check=True)
    wait_for_jobs(job_id, timeout=120)
    status = cli("status", str(out)).output
    for shard in (1, 2):
        assert f"resubmit it with: sbatch --array={shard} {out}/sbatch.sh" in status, status
    assert "waiting in the queue" not in status, status
    by_hand = subprocess.run(
        ["sbatch", "--parsable", "--array=1", str(out / "sbatch.sh")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    status = cli("status", str(out)).output  # the task resubmitted by hand is seen
    assert "sbatch --array=1" not in status and "sbatch --array=2" in status, status
    wait_for_jobs(by_hand, timeout=120)

    monkeypatch.delenv("BULKINFER_SLOW_BATCH_SECONDS")
    again = cli("slurm", str(job), "--array", "3")
    assert again.exit_code == 0, again.output
    second = re.search(r"submitted array job (\d+)", again.output).group(1)
    states = wait_for_jobs(second, timeout=300)
    assert set(states.values()) == {"COMPLETED"}, states
    assert read_outputs(out).equals(read_outputs(tmp_path / "single"))
    assert "3 of 3 shards done" in cli("status", str(out)).output


def test_a_folder_left_by_a_submission_cancelled_before_any_task_started_takes_a_new_one(
    tmp_path, tiny_model
):
    """`bulkinfer slurm` into a folder holding only an earlier submission's script, record and
    empty logs folder (its tasks cancelled while queued) was refused as "not empty and holds
    no bulkinfer job", and the command has no --overwrite; `status` showed one pending job,
    not the array's shards."""
    inputs = write_jsonl(tmp_path / "in.jsonl", sample_prompts(10))
    job = write_job(tmp_path / "again.yaml", tiny_model, inputs, tmp_path / "out")
    out = tmp_path / "out"
    (out / "logs").mkdir(parents=True)
    (out / "sbatch.sh").write_text("#!/bin/bash\n# the user's own\n")
    refused = cli("slurm", str(job), "--array", "2")  # no record of ours: the script is theirs
    assert refused.exit_code == 2, refused.output
    assert (out / "sbatch.sh").read_text() == "#!/bin/bash\n# the user's own\n"
    (out / "sbatch.sh").write_text(cli("slurm", str(job), "--array", "2", "--dry-run").output)
    (out / "slurm-jobs.json").write_text('{"jobs": [{"job_id": "999999", "tasks": 2}]}\n')
    status = cli("status", str(out))
    assert status.exit_code == 0, status.output
    assert re.search(r"0/2\s+pending", status.output) and re.search(r"1/2\s+pending", status.output)
    assert "0 of 2 shards done" in status.output

    submitted = cli("slurm", str(job), "--array", "2")
    assert submitted.exit_code == 0, submitted.output
    job_id = re.search(r"submitted array job (\d+)", submitted.output).group(1)
    assert set(wait_for_jobs(job_id, timeout=300).values()) == {"COMPLETED"}
    assert len(read_outputs(out)) == 10

"""One writer per output folder: a second run is refused while the first holds the folder's
lock, and a killed run leaves no lock behind."""

from __future__ import annotations

import fcntl
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import (
    assert_every_id_once,
    child_env,
    cli,
    cli_subprocess,
    read_outputs,
    sampled_job,
    write_job,
    write_jsonl,
)

N_ROWS = 40


@pytest.fixture(scope="module")
def lock_job(tmp_path_factory, tiny_model):
    """A job of many small batches, and the outputs of one uninterrupted run of it."""
    task = {"temperature": 0.8, "seed": 3, "max_new_tokens": 4}
    batching = {"max_tokens": 300, "max_batch_size": 4}
    return sampled_job(tmp_path_factory.mktemp("lock"), tiny_model, N_ROWS, task, batching)


def assert_same_outputs(out_dir, reference):
    assert_every_id_once(out_dir, reference, N_ROWS)


def start_slow(*args: str, seconds: float = 0.3) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "bulkinfer", *args],
        env={**child_env(), "BULKINFER_SLOW_BATCH_SECONDS": str(seconds)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def run_killed_at(job: Path, point: str) -> None:
    """`bulkinfer run job`, killed at the named fault point (bulkinfer/faults.py)."""
    env = {**child_env(), "BULKINFER_KILL_AT": point}
    killed = subprocess.run([sys.executable, "-m", "bulkinfer", "run", str(job)], env=env)
    assert killed.returncode == -signal.SIGKILL


def wait_for_new_part(manifest: Path, deadline: float) -> None:
    lines = manifest.read_text().count("\n") if manifest.exists() else 0
    while time.monotonic() < deadline:
        if manifest.exists() and manifest.read_text().count("\n") > lines:
            return
        time.sleep(0.05)


def wait_for_parts(folder, proc, lines: int = 1) -> None:
    manifest = folder / "checkpoint" / "manifest.jsonl"
    deadline = time.monotonic() + 120
    while not (manifest.exists() and manifest.read_text().count("\n") >= lines):
        assert time.monotonic() < deadline and proc.poll() is None, "the run never got going"
        time.sleep(0.05)


def test_second_run_on_a_busy_folder_is_refused_naming_the_holder(lock_job):
    make, reference = lock_job
    job = make("busy")
    out = job.parent / "busy"
    first = start_slow("run", str(job))
    try:
        wait_for_parts(out, first)
        running = cli("status", str(out)).output
        second = cli_subprocess("run", str(job))
        overwrite = cli_subprocess("run", str(job), "--overwrite")
        manifest_before = (out / "checkpoint" / "manifest.jsonl").exists()
    finally:
        first.kill()
        first.wait()
    for refused in (second, overwrite):
        assert refused.returncode == 2, refused.stderr
        lines = refused.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in refused.stderr
        assert f"pid {first.pid} on {socket.gethostname()} since" in lines[0]
        assert "in use by another bulkinfer run" in lines[0]
    assert manifest_before and (out / "job.json").exists()  # --overwrite deleted nothing
    assert "running" in running.splitlines()[1]
    assert "stopped" in cli("status", str(out)).output.splitlines()[1]  # at once, once killed
    holder = json.loads((out / ".lock").read_text())
    assert holder["pid"] == first.pid
    # killed, the holder leaves no stale lock: the rerun resumes at once
    rerun = cli_subprocess("run", str(job))
    assert rerun.returncode == 0, rerun.stderr
    assert "resuming" in rerun.stderr
    assert_same_outputs(out, reference)


def test_a_shard_locks_its_own_folder(lock_job):
    make, reference = lock_job
    job = make("shard-lock")
    shard = job.parent / "shard-lock" / "shards" / "shard-00000-of-00002"
    first = start_slow("run", str(job), "--shard", "0/2")
    try:
        wait_for_parts(shard, first)
        same = cli_subprocess("run", str(job), "--shard", "0/2")
        other = cli_subprocess("run", str(job), "--shard", "1/2")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert same.returncode == 2 and "in use by another bulkinfer run" in same.stderr
    assert other.returncode == 0, other.stderr  # the other shard's folder is free
    assert cli_subprocess("run", str(job), "--shard", "0/2").returncode == 0
    assert_same_outputs(job.parent / "shard-lock", reference)


@pytest.mark.parametrize("damage", ["line_twice", "batches_in_two_parts"])
def test_a_doubled_manifest_heals_on_resume(lock_job, damage):
    """What two writers or a killed launcher leave: the later copy is ignored, with a warning."""
    make, reference = lock_job
    job = make(f"heal-{damage}")
    out = job.parent / f"heal-{damage}"
    run_killed_at(job, "part_committed:3")
    manifest = out / "checkpoint" / "manifest.jsonl"
    lines = manifest.read_text().splitlines()
    assert len(lines) >= 2
    if damage == "line_twice":
        extra = lines[0]
    else:
        record = json.loads(lines[1])
        copy = "part-b9999999.parquet"
        (out / "checkpoint" / "parts" / copy).write_bytes(
            (out / "checkpoint" / "parts" / record["file"]).read_bytes()
        )
        extra = json.dumps({**record, "file": copy})
    manifest.write_text("\n".join([lines[0], extra, *lines[1:], extra]) + "\n")

    resumed = cli_subprocess("run", str(job))
    assert resumed.returncode == 0, resumed.stderr
    assert "later copy is ignored" in resumed.stderr
    assert_same_outputs(out, reference)
    healed = manifest.read_text().splitlines()
    files = [json.loads(line)["file"] for line in healed]
    batches = [b for line in healed for b in json.loads(line)["batches"]]
    assert len(files) == len(set(files)) and len(batches) == len(set(batches))


def test_a_run_killed_writing_its_job_record_leaves_a_folder_the_next_run_takes(lock_job):
    """Killed between writing job.json's temporary file and renaming it: what is left is ours."""
    make, reference = lock_job
    job = make("killed-record")
    out = job.parent / "killed-record"
    run_killed_at(job, "temp_written:1")
    pid = json.loads((out / ".lock").read_text())["pid"]
    assert sorted(p.name for p in out.iterdir()) == [f".job.json.tmp-{pid}", ".lock"]
    rerun = cli_subprocess("run", str(job))
    assert rerun.returncode == 0, rerun.stderr
    assert_same_outputs(out, reference)
    assert not list(out.glob(".*.tmp-*"))


def test_a_job_without_results_killed_while_replaced_is_replaced_by_the_next_run(lock_job):
    """A job that committed no row is replaced without --overwrite; killed after the first path
    of it went, the folder still holds that job, and the next run replaces it again."""
    make, reference = lock_job
    job = make("killed-replace")
    out = job.parent / "killed-replace"
    manifest = out / "checkpoint" / "manifest.jsonl"
    for point in ("part_written:1", "overwrite_removed:1"):
        run_killed_at(job, point)
        assert (out / "job.json").exists()
        assert not (manifest.exists() and manifest.read_text().strip())
    rerun = cli_subprocess("run", str(job))
    assert rerun.returncode == 0, rerun.stderr
    assert_same_outputs(out, reference)


def test_a_held_folder_between_writes_is_refused_as_in_use(lock_job):
    """While a run holds the lock the folder may hold pieces of a job but no job.json yet (it
    is replacing one): a second run says the folder is in use, not that it is someone else's."""
    make, _ = lock_job
    job = make("between")
    out = job.parent / "between"
    (out / "checkpoint").mkdir(parents=True)
    fd = os.open(out / ".lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        busy = cli_subprocess("run", str(job))
        status = cli_subprocess("status", str(out))  # a run in its first seconds
    finally:
        os.close(fd)
    assert status.returncode == 0 and "running" in status.stdout, status.stderr
    free = cli_subprocess("run", str(job))
    assert busy.returncode == 2 and len(busy.stderr.strip().splitlines()) == 1, busy.stderr
    assert "in use by another bulkinfer run (holder not yet recorded)" in busy.stderr
    assert free.returncode == 2 and "holds no bulkinfer job" in free.stderr, free.stderr


def alive(pid: int) -> bool:
    """Running, as opposed to gone or a zombie waiting for its new parent to reap it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_workers_die_with_their_launcher(lock_job):
    make, reference = lock_job
    job = make("launcher")
    out = job.parent / "launcher"
    launcher = start_slow("run", str(job), "--gpus", "2", seconds=1.0)  # outlives the wait below
    shards = [out / "shards" / f"shard-0000{i}-of-00002" for i in range(2)]
    try:
        for shard in shards:
            wait_for_parts(shard, launcher)
        workers = [json.loads((shard / ".lock").read_text())["pid"] for shard in shards]
        busy = cli_subprocess("run", str(job), "--gpus", "2")
        assert busy.returncode == 2 and f"pid {launcher.pid} " in busy.stderr
    finally:
        launcher.kill()
        launcher.wait()
    deadline = time.monotonic() + 3
    while any(alive(pid) for pid in workers):
        assert time.monotonic() < deadline, "a worker outlived its launcher"
        time.sleep(0.05)
    rerun = cli_subprocess("run", str(job), "--gpus", "2")
    assert rerun.returncode == 0, rerun.stderr
    assert_same_outputs(out, reference)


def start_launcher(job: Path, seconds: float) -> subprocess.Popen:
    """`bulkinfer run job --gpus 2` (two CPU workers) in a process group of its own, as a shell
    starts a command: a Ctrl-C there reaches the launcher and both workers."""
    return subprocess.Popen(
        [sys.executable, "-m", "bulkinfer", "run", str(job), "--gpus", "2"],
        env={**child_env(), "BULKINFER_SLOW_BATCH_SECONDS": str(seconds)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def stop_launcher(launcher: subprocess.Popen, signum: int, group: bool) -> str:
    try:
        if group:
            os.killpg(launcher.pid, signum)
        else:
            os.kill(launcher.pid, signum)
        return launcher.communicate(timeout=120)[1]
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()


def test_one_ctrl_c_lets_each_worker_finish_its_batch(lock_job):
    """A Ctrl-C reaches each worker twice, from the terminal and from the launcher: that is one
    stop, not the second Ctrl-C that aborts."""
    make, reference = lock_job
    job = make("ctrl-c")
    out = job.parent / "ctrl-c"
    launcher = start_launcher(job, seconds=0.5)
    for index in range(2):
        wait_for_parts(out / "shards" / f"shard-0000{index}-of-00002", launcher)
    err = stop_launcher(launcher, signal.SIGINT, group=True)
    assert launcher.returncode == 130, err
    assert err.count("stopped by SIGINT: the batch in flight was written") == 2, err
    assert "interrupted" not in err and "Traceback" not in err
    rerun = cli_subprocess("run", str(job), "--gpus", "2")
    assert rerun.returncode == 0, rerun.stderr
    assert_same_outputs(out, reference)


def test_a_launcher_stopped_while_its_workers_start_exits_as_stopped(lock_job):
    """SIGTERM to the launcher while its workers are still setting up: they end at once, and
    the launcher says so in one line and exits 143 (128 + SIGTERM), as a single run would."""
    make, reference = lock_job
    job = make("stop-starting")
    out = job.parent / "stop-starting"
    launcher = start_launcher(job, seconds=0.5)
    locks = [out / "shards" / f"shard-0000{i}-of-00002" / ".lock" for i in range(2)]
    deadline = time.monotonic() + 120
    while not all(lock.exists() and lock.read_text().strip() for lock in locks):
        assert time.monotonic() < deadline and launcher.poll() is None, "no worker started"
        time.sleep(0.01)
    err = stop_launcher(launcher, signal.SIGTERM, group=False)
    assert launcher.returncode == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM" in err and "Traceback" not in err, err
    rerun = cli_subprocess("run", str(job), "--gpus", "2")
    assert rerun.returncode == 0, rerun.stderr
    assert_same_outputs(out, reference)


def test_status_of_a_killed_doubled_job_is_stopped_and_never_past_the_total(lock_job):
    make, _ = lock_job
    job = make("doubled-status")
    out = job.parent / "doubled-status"
    run_killed_at(job, "part_committed:3")
    manifest = out / "checkpoint" / "manifest.jsonl"
    manifest.write_text(manifest.read_text() * 4)
    status = cli("status", str(out))
    assert status.exit_code == 0
    row = status.output.splitlines()[1].split()
    assert row[1] == "stopped"
    done, total = int(row[2].replace(",", "")), int(row[4].replace(",", ""))
    assert 0 < done < total == N_ROWS
    assert "ETA -" not in status.output
    # an unsharded job is one row named `job`, not a shard 0/1 of 1
    assert row[0] == "job" and "shard" not in status.output, status.output
    assert status.output.splitlines()[-1] == "job stopped; ETA none: not running now"


def test_status_of_a_run_stopped_before_it_planned_its_rows_is_stopped(lock_job):
    """A run killed while it read and tokenized the input (minutes, on millions of rows) has
    recorded its job but not yet its rows: `status` called it pending, as if never started."""
    make, _ = lock_job
    job = make("stopped-early")
    out = job.parent / "stopped-early"
    run_killed_at(job, "part_committed:1")
    record = json.loads((out / "job.json").read_text())  # as it was before the plan was kept
    (out / "job.json").write_text(json.dumps({**record, "rows": None}))
    shutil.rmtree(out / "checkpoint")
    status = cli("status", str(out))
    assert status.exit_code == 0, status.output
    assert status.output.splitlines()[1].split()[:5] == ["job", "stopped", "0", "/", "?"]


def test_status_of_an_overwrite_under_way_is_running(lock_job):
    """While `run --overwrite` empties a folder (its job record set aside, the lock held),
    status said it had been stopped and to pass --overwrite again."""
    from bulkinfer.io.layout import OutputLayout
    from bulkinfer.io.lock import folder_lock

    make, _ = lock_job
    job = make("overwriting")
    out = job.parent / "overwriting"
    assert cli("run", str(job)).exit_code == 0
    with folder_lock(OutputLayout(out)):  # as the overwrite holds it, job.json set aside
        os.replace(out / "job.json", out / ".overwriting-job.json")
        status = cli("status", str(out))
    assert status.exit_code == 0, status.output
    assert status.output.splitlines()[1].split()[:2] == ["job", "running"], status.output
    assert "was stopped" not in status.output


@pytest.mark.parametrize("oddity", ["outputs_is_a_link", "summary_is_a_folder"])
def test_overwrite_refuses_before_deleting_anything(lock_job, tmp_path, oddity):
    make, _ = lock_job
    job = make(f"odd-{oddity}")
    out = job.parent / f"odd-{oddity}"
    assert cli("run", str(job)).exit_code == 0
    if oddity == "outputs_is_a_link":
        (out / "outputs").rename(tmp_path / "elsewhere")
        (out / "outputs").symlink_to(tmp_path / "elsewhere")
    else:
        (out / "summary.json").unlink()
        (out / "summary.json").mkdir()
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    proc = cli_subprocess("run", str(job), "--overwrite")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "deleted nothing" in lines[0], proc.stderr
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert oddity != "outputs_is_a_link" or list((tmp_path / "elsewhere").glob("*.parquet"))


def test_merge_of_a_missing_folder_is_refused_and_creates_nothing(tmp_path):
    proc = cli_subprocess("merge", str(tmp_path / "missing"))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "no such output folder" in lines[0], proc.stderr
    assert not (tmp_path / "missing").exists()


@pytest.mark.stress
def test_concurrent_runs_killed_at_random_end_with_the_uninterrupted_outputs(lock_job, tmp_path):
    """Two or three runs of one job at once, one of them killed at random, round after round:
    the lock lets one write, the others exit 2 with one line, and a final run completes the job
    with the outputs of an uninterrupted run."""
    make, reference = lock_job
    job = make("stress")
    rng = random.Random(7)
    env = {**child_env(), "BULKINFER_SLOW_BATCH_SECONDS": "0.2"}
    manifest = job.parent / "stress" / "checkpoint" / "manifest.jsonl"
    alive: list[tuple[subprocess.Popen, Path]] = []
    codes = []

    def reap(proc: subprocess.Popen, log: Path) -> None:
        text = log.read_text()
        assert proc.returncode in (0, 2, -signal.SIGKILL), text
        assert "Traceback" not in text, text
        assert proc.returncode != 2 or "in use by another bulkinfer run" in text, text
        codes.append(proc.returncode)

    for round_ in range(20):  # all 20 rounds, however loaded the machine
        for i in range(rng.choice([2, 3]) - len(alive)):
            log = tmp_path / f"{round_}-{i}.log"
            with log.open("w") as sink:
                cmd = [sys.executable, "-m", "bulkinfer", "run", str(job)]
                alive.append((subprocess.Popen(cmd, env=env, stdout=sink, stderr=sink), log))
        time.sleep(rng.uniform(0.5, 2.5))
        if round_ % 4 == 3:  # now and then the writer gets to commit before the next kill
            wait_for_new_part(manifest, deadline=time.monotonic() + 6)
        victim = rng.choice(alive)[0]
        if rng.random() < 0.5 and victim.poll() is None:
            victim.kill()
        for proc, log in [(p, f) for p, f in alive if p.poll() is not None]:
            reap(proc, log)
            alive.remove((proc, log))
    for proc, log in alive:
        proc.kill()
        proc.wait()
        reap(proc, log)
    assert codes.count(-signal.SIGKILL) >= 3 and 2 in codes and manifest.exists()
    final = cli_subprocess("run", str(job))
    assert final.returncode == 0, final.stderr
    assert_same_outputs(job.parent / "stress", reference)


def test_status_counts_the_work_left_in_tokens_not_rows(tmp_path, tiny_model):
    """status's ETA divided the rows left by the rows a second so far; rows run longest first,
    so it read several times the time left. The work left is the prompt tokens not yet run and
    as many new tokens a row left as the rows done made."""
    import pyarrow.parquet as pq

    from bulkinfer.io.layout import OutputLayout
    from bulkinfer.sharding import Shard
    from bulkinfer.state.status import read_state

    rows = [{"id": f"r{i}", "prompt": "word " * (2 + (i * 7) % 60)} for i in range(60)]
    inputs = write_jsonl(tmp_path / "in.jsonl", rows)
    task = {"type": "generate", "max_new_tokens": 8}
    every = {"every_rows": 10}
    full = write_job(tmp_path / "full.yaml", tiny_model, inputs, tmp_path / "full", task=task)
    assert cli("run", str(full)).exit_code == 0
    made = {r["id"]: r for r in read_outputs(tmp_path / "full").to_pylist()}
    part = write_job(
        tmp_path / "part.yaml", tiny_model, inputs, tmp_path / "part", task=task, checkpoint=every
    )
    env = {**child_env(), "BULKINFER_KILL_AT": "part_committed:2"}
    killed = subprocess.run(
        [sys.executable, "-m", "bulkinfer", "run", str(part)], env=env, capture_output=True
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    parts = (tmp_path / "part" / "checkpoint" / "parts").glob("*.parquet")
    done = {f"r{i}" for p in parts for i in pq.read_table(p, columns=["row"])["row"].to_pylist()}
    left = [i for i in made if i not in done]
    assert done and left
    per_row = sum(made[i]["output_tokens"] for i in done) / len(done)
    want = sum(made[i]["prompt_tokens"] for i in left) + len(left) * per_row
    state = read_state(OutputLayout(tmp_path / "part"), Shard(0, 1))
    assert state.work_left == pytest.approx(want)
    # the rows left are the shorter ones: fewer tokens each than the rows done took
    took = sum(made[i]["prompt_tokens"] + made[i]["output_tokens"] for i in done) / len(done)
    assert state.work_left / len(left) < took
    # a part removed by hand is not counted done: the rerun computes its rows again
    parts_done = sorted((tmp_path / "part" / "checkpoint" / "parts").glob("*.parquet"))
    lost = pq.read_metadata(parts_done[0]).num_rows
    parts_done[0].unlink()
    after = read_state(OutputLayout(tmp_path / "part"), Shard(0, 1))
    assert after.rows_done == state.rows_done - lost and len(parts_done) > 1

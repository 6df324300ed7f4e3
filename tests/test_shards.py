"""Shards: every row in exactly one shard, merged output equal to a single-process run."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import cli, cli_subprocess, read_outputs, sample_prompts, write_job, write_jsonl

from bulkinfer.errors import SpecError
from bulkinfer.sharding import Shard, shard_from_env, slurm_tasks_unused

N_ROWS = 60


@pytest.fixture(scope="module")
def shard_job(tmp_path_factory, tiny_model):
    tmp = tmp_path_factory.mktemp("shards")
    inputs = write_jsonl(tmp / "in.jsonl", sample_prompts(N_ROWS))

    def make(name: str):
        return write_job(
            tmp / f"{name}.yaml",
            tiny_model,
            inputs,
            tmp / name,
            task={"temperature": 0.7, "seed": 5, "max_new_tokens": 5},
            input={"keep_columns": ["source"]},
            batching={"max_tokens": 500, "max_batch_size": 6},
            checkpoint={"every_rows": 6},
        )

    single = make("single")
    assert cli("run", str(single)).exit_code == 0
    return make, read_outputs(tmp / "single")


def _same(out_dir, reference):
    got = read_outputs(out_dir)
    assert got.column("id").to_pylist() == reference.column("id").to_pylist()
    assert got.equals(reference)


def test_shards_run_one_by_one_then_merge_automatically(shard_job):
    make, reference = shard_job
    job = make("sharded")
    out = job.parent / "sharded"
    for i in range(3):
        result = cli("run", str(job), "--shard", f"{i}/3")
        assert result.exit_code == 0, result.output
        assert (out / "outputs").exists() == (i == 2)
    _same(out, reference)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["shards"] == 3 and summary["rows_out"] == N_ROWS
    # a string, as a single run's summary has (a list before, printed as one)
    assert isinstance(summary["device"], str) and summary["device"].startswith("cpu (")
    assert f"device           {summary['device']}\n" in result.output
    # the keys a single run's summary has: the model's share of the shards' own seconds
    parts = [json.loads(p.read_text()) for p in sorted((out / "shards").glob("*/summary.json"))]
    walls, model = sum(p["wall_seconds"] for p in parts), sum(p["model_seconds"] for p in parts)
    assert summary["model_share_of_wall"] == pytest.approx(model / walls)
    assert summary["seconds_outside_model"] == pytest.approx(walls - model)
    assert 0 <= summary["padding_fraction_file_order"] < 1
    assert summary["engine"] == parts[0]["engine"]  # and start-up as the slowest shard's
    assert summary["first_batch_seconds"] == max(p["first_batch_seconds"] for p in parts)
    status = cli("status", str(out))
    assert "3 of 3 shards done" in status.output
    single = json.loads((job.parent / "single" / "summary.json").read_text())
    _same_keys(single, summary)


def _same_keys(single: dict, merged: dict) -> None:
    """A merged summary has every key a single run's has, each of the same type (a reader of
    many summary.json files sees one schema), and says how many shards it merged."""
    kinds = {k: type(v).__name__ for k, v in single.items() if v is not None}
    merged_kinds = {k: type(merged.get(k)).__name__ for k in kinds}
    assert merged_kinds == kinds
    assert merged["shards"] > 1


def test_a_merged_summary_of_failed_rows_has_a_single_runs_keys(tmp_path, tiny_model):
    inputs = write_jsonl(tmp_path / "in.jsonl", [{"id": k, "prompt": k} for k in range(6)])
    summaries = []
    for name, flags in (
        ("single", []),
        ("sharded", ["--shard", "0/2"]),
        ("sharded", ["--shard", "1/2"]),
    ):
        job = write_job(tmp_path / f"{name}.yaml", tiny_model, inputs, tmp_path / name)
        assert cli("run", str(job), *flags).exit_code == 0
    for name in ("single", "sharded"):
        summaries.append(json.loads((tmp_path / name / "summary.json").read_text()))
    assert summaries[0]["rows_by_status"] == summaries[1]["rows_by_status"] == {"ok": 0, "error": 6}
    _same_keys(*summaries)
    assert isinstance(summaries[0]["model_seconds"], float)  # 0.0, not 0, with no batch run


def test_a_merged_summary_keeps_the_jobs_fp8_settings(tmp_path, tiny_model):
    """kv_cache_dtype (and quantization) say how a job ran: the merge of its shards kept
    neither."""
    from conftest import set_model

    inputs = write_jsonl(tmp_path / "in.jsonl", sample_prompts(6))
    job = write_job(tmp_path / "job.yaml", tiny_model, inputs, tmp_path / "out")
    set_model(job, engine="fast", kv_cache_dtype="fp8")
    for k in range(2):
        assert cli("run", str(job), "--shard", f"{k}/2").exit_code == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["shards"] == 2 and summary["kv_cache_dtype"] == "fp8"


def test_a_finished_sharded_job_run_again_is_not_merged_again(shard_job):
    """Every rerun of a finished shard (a requeued array task, `--gpus` run again) merged all
    the shards again, rewriting the outputs (briefly missing to readers) once per shard. A
    merge whose outputs were removed since is redone."""
    make, reference = shard_job
    job = make("done-twice")
    out = job.parent / "done-twice"
    for k in range(2):
        assert cli("run", str(job), "--shard", f"{k}/2").exit_code == 0
    summary = (out / "summary.json").read_text()
    part = next((out / "outputs").glob("*.parquet"))
    written = part.stat().st_mtime_ns
    for k in range(2):
        again = cli("run", str(job), "--shard", f"{k}/2")
        assert again.exit_code == 0, again.output
        assert "shards done: merged" not in again.output, again.output
    merged = cli("merge", str(out))  # nor `bulkinfer merge`, which said "merged" again
    assert merged.exit_code == 0 and "merged already" in merged.output, merged.output
    assert (out / "summary.json").read_text() == summary
    assert part.stat().st_mtime_ns == written
    import shutil

    shutil.rmtree(out / "outputs")
    again = cli("run", str(job), "--shard", "1/2")
    assert again.exit_code == 0 and "shards done: merged" in again.output, again.output
    _same(out, reference)


@pytest.mark.parametrize("shards", [2, 1])
def test_status_of_shards_whose_merge_was_killed_says_they_are_not_merged(shard_job, shards):
    """Every shard done but the merge killed as it wrote: the outputs are not there, and
    `status` says so and how to merge, where it said only "2 of 2 shards done"."""
    import subprocess
    import sys

    from conftest import child_env

    make, reference = shard_job
    job = make(f"merge-killed-{shards}")
    out = job.parent / f"merge-killed-{shards}"
    for k in range(shards - 1):
        assert cli("run", str(job), "--shard", f"{k}/{shards}").exit_code == 0
    env = {**child_env(), "BULKINFER_KILL_AT": "outputs_written:2"}  # the merge's write
    last = f"{shards - 1}/{shards}"
    command = [sys.executable, "-m", "bulkinfer", "run", str(job), "--shard", last]
    assert subprocess.run(command, env=env, capture_output=True).returncode == -9
    assert not (out / "outputs").exists()
    status = cli("status", str(out)).output
    done = f"{shards} of {shards} shard{'s' * (shards > 1)} done"
    assert done in status and f"outputs not merged: bulkinfer merge {out}" in status
    assert cli("merge", str(out)).exit_code == 0
    assert "; outputs merged" in cli("status", str(out)).output
    _same(out, reference)


def test_gpus_flag_runs_one_worker_per_device_and_merges(shard_job):
    make, reference = shard_job
    job = make("workers")
    proc = cli_subprocess("run", str(job), "--gpus", "3")
    assert proc.returncode == 0, proc.stderr
    _same(job.parent / "workers", reference)
    # the merged job's summary on stdout, once (each worker printed its shard's, never the
    # job's); the workers' lines, sharing the terminal, name their shards
    rows = reference.num_rows
    said = [line.split() for line in proc.stdout.splitlines()]
    assert [w[:4] for w in said if w[:1] == ["rows"]] == [["rows", str(rows), "of", str(rows)]]
    assert any(w[:1] == ["next"] for w in said), proc.stdout
    for i in range(3):
        assert f"[bulkinfer {i}/3] shard {i}/3:" in proc.stderr, proc.stderr
    # run again, finished: each worker says so, and the launcher does not print the summary again
    again = cli_subprocess("run", str(job), "--gpus", "3")
    assert again.returncode == 0 and again.stdout == "", again.stdout
    assert again.stderr.count("already finished") == 3, again.stderr
    # another count on that folder: one line naming --gpus 3, before any worker starts (each
    # worker refused it, naming --shard, and the launcher then said to rerun the same command)
    other = cli_subprocess("run", str(job), "--gpus", "2")
    assert other.returncode == 2, other.stderr
    lines = other.stderr.strip().splitlines()
    assert len(lines) == 1 and "--gpus 3" in lines[0], other.stderr
    assert "rerun the same command" not in other.stderr
    # other settings: each worker refuses its shard, and the launcher does not say to resume
    changed = cli_subprocess("run", str(job), "--gpus", "3", "--set", "task.max_new_tokens=2")
    assert changed.returncode != 0 and "ran another job" in changed.stderr, changed.stderr
    assert "rerun the same command" not in changed.stderr, changed.stderr
    # each worker's error line names its shard, as its log lines do
    for i in range(3):
        assert f"\nbulkinfer {i}/3: error: " in f"\n{changed.stderr}", changed.stderr


def test_gpus_beyond_what_the_cpus_can_take_is_refused_before_any_worker(shard_job):
    """Without a GPU, --gpus N starts N CPU workers, each loading the model: a GPU count typed
    on a machine without GPUs is refused in one line, before any worker starts."""
    make, _ = shard_job
    job = make("many")
    proc = cli_subprocess("run", str(job), "--gpus", "100000")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "no GPU is visible" in lines[0] and "give at most" in lines[0]
    assert not (job.parent / "many" / "shards").exists()


def test_status_and_merge_on_a_half_finished_job_with_a_failed_shard(shard_job):
    make, _ = shard_job
    job = make("half")
    out = job.parent / "half"
    assert cli("run", str(job), "--shard", "0/3").exit_code == 0
    (out / "shards" / "shard-00001-of-00003").mkdir(parents=True)
    (out / "shards" / "shard-00001-of-00003" / "failed.json").write_text(
        json.dumps({"error": "OutOfMemoryError: CUDA out of memory"})
    )
    status = cli("status", str(out))
    assert status.exit_code == 0
    lines = status.output.splitlines()
    assert any("0/3" in line and "done" in line for line in lines)
    assert any("1/3" in line and "failed" in line and "OutOfMemoryError" in line for line in lines)
    assert any("2/3" in line and "pending" in line for line in lines)
    assert "1 of 3 shards done" in status.output
    merged = cli("merge", str(out))
    assert merged.exit_code == 2
    assert "2 of 3 shards are not done" in merged.output
    assert "1/3 (failed)" in merged.output and "2/3 (pending)" in merged.output
    assert not (out / "outputs").exists()


def test_shard_from_slurm_and_srun_environment():
    assert shard_from_env({}) is None
    env = {"SLURM_ARRAY_TASK_ID": "12", "SLURM_ARRAY_TASK_MIN": "10", "SLURM_ARRAY_TASK_COUNT": "4"}
    assert shard_from_env(env) == Shard(2, 4)
    step = {"SLURM_JOB_ID": "7", "SLURM_STEP_ID": "0"}  # srun's tasks
    assert shard_from_env({**env, **step, "SLURM_NTASKS": "2", "SLURM_PROCID": "1"}) == Shard(5, 8)
    assert shard_from_env({**step, "SLURM_NTASKS": "3", "SLURM_PROCID": "2"}) == Shard(2, 3)
    # the batch script itself (no step): its allocation's tasks are not shards of this run
    batch = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "3", "SLURM_PROCID": "0"}
    assert shard_from_env(batch) is None
    assert shard_from_env({**env, **batch}) == Shard(2, 4)
    assert slurm_tasks_unused(batch) == 3 and slurm_tasks_unused({**batch, **step}) == 0
    assert shard_from_env({"JOB_COMPLETION_INDEX": "1", "BULKINFER_SHARD_COUNT": "5"}) == Shard(
        1, 5
    )
    stepped = {
        "SLURM_ARRAY_TASK_ID": "4",
        "SLURM_ARRAY_TASK_COUNT": "6",
        "SLURM_ARRAY_TASK_STEP": "2",
    }
    assert shard_from_env(stepped) == Shard(2, 6)  # --array=0-10:2
    for bad, fragment in [
        ({"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_COUNT": "3"}, "between 0 and N-1"),
        (
            {
                "SLURM_ARRAY_TASK_ID": "1",
                "SLURM_ARRAY_TASK_MIN": "2",
                "SLURM_ARRAY_TASK_COUNT": "3",
            },
            "between",
        ),
        ({"SLURM_ARRAY_TASK_ID": "x", "SLURM_ARRAY_TASK_COUNT": "3"}, "SLURM_ARRAY_TASK_ID"),
    ]:
        with pytest.raises(SpecError, match=fragment):
            shard_from_env(bad)


def test_bad_shard_flags(shard_job):
    make, _ = shard_job
    job = make("bad")
    for flag in ("3/3", "x", "1/0", "0/100000"):
        result = cli("run", str(job), "--shard", flag)
        assert result.exit_code == 2 and "--shard" in result.output


def test_sbatch_script_dry_run(shard_job):
    make, _ = shard_job
    job = make("slurm-dry")
    result = cli(
        "slurm", str(job), "--array", "4", "--gpus-per-task", "1", "--time", "01:00:00", "--dry-run"
    )
    assert result.exit_code == 0, result.output
    script = result.output
    for needle in (
        "#SBATCH --array=0-3",
        "#SBATCH --signal=B:USR1@120",
        "#SBATCH --requeue",
        "%A_%a.log",
        "scontrol requeue",
    ):
        assert needle in script
    throttled = cli("slurm", str(job), "--array", "64", "--max-parallel", "8", "--dry-run")
    assert throttled.exit_code == 0, throttled.output
    assert "#SBATCH --array=0-63%8\n" in throttled.output
    assert cli("slurm", str(job), "--array", "4", "--max-parallel", "0", "--dry-run").exit_code == 2


def test_a_submission_sbatch_refuses_leaves_no_folder_behind(shard_job, tmp_path, monkeypatch):
    """`bulkinfer slurm` where sbatch cannot submit (here: not on PATH) says so and leaves no
    sbatch.sh or logs folder, which made a later `run` of the job refuse the folder."""
    make, _ = shard_job
    job = make("unsubmitted")
    monkeypatch.setenv("PATH", str(tmp_path / "no-slurm-here"))
    result = cli("slurm", str(job), "--array", "2")
    assert result.exit_code == 2 and "sbatch is not on PATH" in result.output, result.output
    assert not (job.parent / "unsubmitted").exists()
    monkeypatch.undo()
    assert cli("run", str(job)).exit_code == 0


def test_unsharded_run_on_a_sharded_folder_is_refused_clearly(shard_job):
    make, _ = shard_job
    job = make("mixed")
    assert cli("run", str(job), "--shard", "0/2").exit_code == 0
    result = cli("run", str(job))
    assert result.exit_code == 2
    assert "sharded run" in result.output and "--shard" in result.output


def test_validate_reads_a_sharded_folder_and_an_unreadable_record_as_run_does(shard_job):
    """validate read only the top folder's job.json: on a sharded folder it said "run resumes
    it" (a plain run is refused there) and passed settings every shard would refuse; on an
    unreadable job.json it passed a folder run refuses."""
    make, _ = shard_job
    job = make("validated")
    out = job.parent / "validated"
    assert cli("run", str(job), "--shard", "0/2").exit_code == 0
    same = cli("validate", str(job))
    assert same.exit_code == 0, same.output
    assert "split into 2 shards" in same.output and "--shard I/2" in same.output, same.output
    other = cli("validate", str(job), "--set", "task.max_new_tokens=7")
    assert other.exit_code == 2 and "another job's outputs" in other.output, other.output
    assert "task.max_new_tokens" in other.output
    (out / "shards").rename(out / "kept")
    (out / "job.json").write_text("{bad")
    refused = cli("validate", str(job))
    assert refused.exit_code == 2 and "job.json is unreadable" in refused.output, refused.output


def test_a_sharded_run_on_an_unsharded_folder_is_refused_clearly(shard_job):
    """Its merge would write another run's outputs under the finished job's record."""
    make, reference = shard_job
    job = make("single")  # the folder of the fixture's finished, unsharded run
    for args in (["--shard", "0/1", "--set", "task.max_new_tokens=1"], ["--gpus", "2"]):
        result = cli("run", str(job), *args)
        assert result.exit_code == 2, result.output
        assert "without shards" in result.output and "--overwrite" in result.output
    _same(job.parent / "single", reference)


def test_a_shard_with_overwrite_retires_the_unsharded_job_for_its_siblings(shard_job):
    """`--shard 0/2 --overwrite` over a finished unsharded job left its record and summary:
    `status` and `report` showed the half-run split job as done, and shard 1 was refused
    without --overwrite (which, on a requeue, would drop the shard's own checkpoint)."""
    make, reference = shard_job
    job = make("split-over-single")
    out = job.parent / "split-over-single"
    assert cli("run", str(job)).exit_code == 0
    result = cli("run", str(job), "--shard", "0/2", "--overwrite")
    assert result.exit_code == 0, result.output
    assert not (out / "summary.json").exists() and not (out / "checkpoint").exists()
    status = cli("status", str(out))
    assert status.exit_code == 0 and "1 of 2 shards done" in status.output, status.output
    result = cli("run", str(job), "--shard", "1/2")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "summary.json").read_text())["shards"] == 2
    _same(out, reference)


def test_shards_of_another_split_and_folders_without_a_job_are_refused_before_any_work(
    shard_job, tmp_path
):
    make, _ = shard_job
    job = make("splits")
    out = job.parent / "splits"
    assert cli("run", str(job), "--shard", "0/3").exit_code == 0
    other = cli("run", str(job), "--shard", "0/2")
    assert other.exit_code == 2 and "split into 3, not 2" in other.output, other.output
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["shard-00000-of-00003"]
    both = cli("run", str(job), "--gpus", "2", "--shard", "0/2")
    assert both.exit_code == 2 and "--shard" in both.output
    assert both.output.strip().startswith("bulkinfer: error:") and "\n" not in both.output.strip()

    empty = tmp_path / "empty"
    empty.mkdir()
    for command in ("status", "merge"):
        result = cli(command, str(empty))
        assert result.exit_code == 2 and "bulkinfer:" in result.output, result.output
    assert list(empty.iterdir()) == []  # merge wrote no lock file there


def test_a_done_shard_whose_outputs_or_summary_were_damaged_is_named_before_the_merge_writes(
    shard_job,
):
    """Outputs removed, a part cut short, a summary edited: merge says which shard to rerun
    in one line and writes nothing (it stopped half-way with a traceback); rerunning that
    shard rewrites it from its checkpoint and merges."""
    make, reference = shard_job
    job = make("damaged")
    out = job.parent / "damaged"
    for i in range(3):
        assert cli("run", str(job), "--shard", f"{i}/3").exit_code == 0
    merged = (out / "summary.json").read_text()
    middle = out / "shards" / "shard-00001-of-00003"
    first_part = sorted((middle / "outputs").glob("*.parquet"))[0]
    summary = json.loads((middle / "summary.json").read_text())
    damages = [
        lambda: first_part.write_bytes(first_part.read_bytes()[:100]),
        lambda: [p.unlink() for p in (middle / "outputs").glob("*.parquet")],
        lambda: (middle / "summary.json").write_text(json.dumps({**summary, "rows_out": "x"})),
    ]
    for damage in damages:
        damage()
        result = cli("merge", str(out))
        assert result.exit_code == 2, result.output
        line = result.output.strip()
        assert "\n" not in line and "1/3" in line, line  # the shard to rerun
        assert (out / "summary.json").read_text() == merged  # nothing written
        assert cli("status", str(out)).exit_code == 0
        assert cli("run", str(job), "--shard", "1/3").exit_code == 0
        _same(out, reference)
        merged = (out / "summary.json").read_text()


def test_overwrite_with_another_split_retires_the_old_split_and_its_merge(shard_job):
    """Shards of 3 merged, then the job split in 2 with --overwrite: the old split's shards and
    merged summary go (they stayed: the new merge failed on two counts, and status called the
    old outputs this split's merge), and the new split merges to the same outputs."""
    make, reference = shard_job
    job = make("resplit")
    out = job.parent / "resplit"
    for i in range(3):
        assert cli("run", str(job), "--shard", f"{i}/3").exit_code == 0
    first = cli("run", str(job), "--shard", "0/2", "--overwrite")
    assert first.exit_code == 0, first.output
    assert [p.name for p in (out / "shards").iterdir()] == ["shard-00000-of-00002"]
    assert not (out / "summary.json").exists()
    status = cli("status", str(out)).output
    assert "1 of 2 shards done; ETA none: no shard is running now" in status, status
    assert "merged" not in status
    assert cli("run", str(job), "--shard", "1/2").exit_code == 0
    _same(out, reference)
    assert json.loads((out / "summary.json").read_text())["shards"] == 2
    assert "2 of 2 shards done; ETA done; outputs merged" in cli("status", str(out)).output


def test_a_shard_run_with_other_settings_than_its_siblings_is_refused_before_any_batch(
    shard_job,
):
    """Its merge could never run: it was found there, after every batch had run."""
    make, reference = shard_job
    job = make("unlike")
    out = job.parent / "unlike"
    assert cli("run", str(job), "--shard", "0/2").exit_code == 0
    other = cli("run", str(job), "--shard", "1/2", "--set", "task.max_new_tokens=3")
    assert other.exit_code == 2, other.output
    line = other.output.strip()
    assert "\n" not in line and "shard 0/2" in line and "task.max_new_tokens" in line, line
    parts = out / "shards" / "shard-00001-of-00002" / "checkpoint" / "parts"
    assert not parts.exists() or not list(parts.iterdir())  # no batch ran
    again = cli("run", str(job), "--shard", "1/2")
    assert again.exit_code == 0, again.output
    _same(out, reference)


def test_a_shard_run_again_unlike_the_others_is_named_and_the_old_merge_not_shown(shard_job):
    """A shard run again with --overwrite and other settings runs (its siblings are not
    checked then), and the merge it ends with is refused: the refusal names the shard and
    what differs, and status no longer calls the old merge the job's outputs."""
    make, reference = shard_job
    job = make("again")
    out = job.parent / "again"
    for i in range(2):
        assert cli("run", str(job), "--shard", f"{i}/2").exit_code == 0
    assert "outputs merged" in cli("status", str(out)).output
    other = cli("run", str(job), "--shard", "1/2", "--overwrite", "--set", "task.max_new_tokens=3")
    assert other.exit_code == 2, other.output
    assert "1/2 (spec)" in other.output, other.output
    status = cli("status", str(out))
    assert "2 of 2 shards done" in status.output and "outputs merged" not in status.output
    assert cli("run", str(job), "--shard", "1/2", "--overwrite").exit_code == 0
    assert "outputs merged" in cli("status", str(out)).output
    _same(out, reference)


def test_slurm_options_a_task_could_not_use_are_refused_and_paths_with_spaces_quoted(
    shard_job, tmp_path
):
    """--gpus-per-task 2 gave each task two GPUs and used one; a grace period as long as the
    time limit warned every task as it started; a space in a path broke the #SBATCH line."""
    make, _ = shard_job
    job = make("slurm-options")
    two = cli("slurm", str(job), "--array", "2", "--gpus-per-task", "2", "--dry-run")
    assert two.exit_code == 2 and "--array 4 --gpus-per-task 1" in two.output, two.output
    late = cli("slurm", str(job), "--array", "2", "--time", "1", "--grace", "60", "--dry-run")
    assert late.exit_code == 2 and "--time 1 is 60 s" in late.output, late.output
    for limit in ("2", "1-00", "0:01:05"):  # 120, 86,400 and 65 seconds: room for 60 s
        ok = cli("slurm", str(job), "--array", "2", "--time", limit, "--grace", "60", "--dry-run")
        assert ok.exit_code == 0, ok.output
    spaced = cli(
        "slurm", str(job), "--array", "4", "--output", str(tmp_path / "my out"), "--dry-run"
    )
    assert spaced.exit_code == 0, spaced.output
    assert f'#SBATCH --output="{tmp_path}/my out/logs/%A_%a.log"' in spaced.output
    assert '--shard "${SLURM_ARRAY_TASK_ID}/4" &' in spaced.output


def test_slurm_refuses_a_folder_every_task_would_refuse_before_submitting(
    shard_job, tmp_path, monkeypatch
):
    """`bulkinfer slurm --array 2` on a folder split 3 ways (or holding a job run without
    shards) submitted an array whose every task failed, and overwrote sbatch.sh."""
    make, _ = shard_job
    monkeypatch.setenv("PATH", str(tmp_path / "no-slurm-here"))  # never reach sbatch
    split = make("split-three")
    assert cli("run", str(split), "--shard", "0/3").exit_code == 0
    result = cli("slurm", str(split), "--array", "2")
    assert result.exit_code == 2, result.output
    assert "split into 3, not 2" in result.output and "--array 3" in result.output
    assert not (split.parent / "split-three" / "sbatch.sh").exists()
    whole = make("whole-then-array")
    assert cli("run", str(whole)).exit_code == 0
    result = cli("slurm", str(whole), "--array", "2")
    assert result.exit_code == 2 and "without shards" in result.output, result.output
    assert not (whole.parent / "whole-then-array" / "sbatch.sh").exists()
    # a dry run says the same; so do a split past the shard folders' names and a kept `row`
    # column, which every task refused
    for args, fragment in [
        ([str(whole), "--array", "2", "--dry-run"], "without shards"),
        ([str(split), "--array", "100000", "-o", str(tmp_path / "wide")], "at most 99,999"),
        ([str(split), "--array", "2", "--set", "input.keep_columns=[row]"], "row"),
    ]:
        result = cli("slurm", *args)
        assert result.exit_code == 2 and fragment in result.output, (args, result.output)
        assert "#SBATCH" not in result.output
    assert not (tmp_path / "wide").exists()


def test_the_sbatch_script_runs_where_it_was_submitted(shard_job, tmp_path, monkeypatch):
    """Relative paths given with --set name files of the folder the submission ran in: a task
    resubmitted from another folder (`sbatch --array=I OUT/sbatch.sh`) read them elsewhere."""
    make, _ = shard_job
    job = make("slurm-chdir")
    (tmp_path / "in.jsonl").write_bytes((job.parent / "in.jsonl").read_bytes())
    monkeypatch.chdir(tmp_path)
    result = cli("slurm", str(job), "--array", "2", "--set", "input.path=in.jsonl", "--dry-run")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert f"#SBATCH --chdir={tmp_path}" in lines, result.output


def test_the_sbatch_script_does_not_requeue_a_task_warned_before_its_first_batch(
    shard_job, tmp_path
):
    """A task whose start-up outlasts its time limit less the grace period was warned before
    its first batch, exited 138 and was requeued, to stop at the same place again, forever.
    The script, run here as Slurm runs it (a stand-in scontrol records any requeue), requeues
    only a task that committed a part, and says why it lets this one end."""
    import os
    import signal
    import subprocess
    import time

    from conftest import child_env

    make, _ = shard_job
    job = make("warned-early")
    out = job.parent / "warned-early"
    script = tmp_path / "sbatch.sh"
    dry = cli("slurm", str(job), "--array", "2", "--dry-run")
    assert dry.exit_code == 0, dry.output
    script.write_text(dry.output)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    requeued = tmp_path / "requeued"
    (bin_dir / "scontrol").write_text(f'#!/bin/bash\necho "$@" >> {requeued}\n')
    (bin_dir / "scontrol").chmod(0o755)
    env = {
        **child_env(),
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SLURM_ARRAY_JOB_ID": "7",
        "SLURM_ARRAY_TASK_ID": "1",
    }

    def warned_when(ready, **settings) -> str:
        """The task run as Slurm runs it, warned once `ready()` (what --signal=B:USR1@S sends
        the batch shell); its output. It exits as stopped by the warning."""
        task = subprocess.Popen(
            ["bash", str(script)],
            env={**env, **settings},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 120
        while not ready():
            assert time.monotonic() < deadline and task.poll() is None, "the task never got there"
            time.sleep(0.01)
        task.send_signal(signal.SIGUSR1)
        stdout, stderr = task.communicate(timeout=120)
        assert task.returncode == 128 + signal.SIGUSR1, stdout + stderr
        return stdout

    lock = out / "shards" / "shard-00001-of-00002" / ".lock"
    stdout = warned_when(lambda: lock.exists() and lock.read_text().strip())
    assert "before committing anything; not requeued" in stdout, stdout
    assert "raise --time or lower --grace" in stdout
    assert not requeued.exists(), requeued.read_text()
    # warned after committing a part: requeued
    manifest = out / "shards" / "shard-00001-of-00002" / "checkpoint" / "manifest.jsonl"
    slow = {"BULKINFER_SLOW_BATCH_SECONDS": "0.3"}
    stdout = warned_when(lambda: manifest.exists() and manifest.read_text().strip(), **slow)
    assert "requeueing" in stdout and requeued.read_text().split() == ["requeue", "7_1"]
    # warned after committing fewer parts than its run dropped as it started (repeated lines):
    # requeued all the same (the script counted lines, fewer than before the run, and let the
    # task end with its shard unfinished)
    last = manifest.read_text().splitlines()[-1]
    with manifest.open("a") as f:
        f.write((last + "\n") * 3)
    lines = len(manifest.read_text().splitlines())
    stdout = warned_when(lambda: manifest.read_text().splitlines()[-1:] != [last], **slow)
    assert len(manifest.read_text().splitlines()) < lines
    assert "requeueing" in stdout and requeued.read_text().split() == ["requeue", "7_1"] * 2
    # the task's own shard, named by its array id: resubmitted alone, it runs shard 1 of 2
    rerun = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert (out / "shards" / "shard-00001-of-00002" / "summary.json").exists()
    assert not (out / "shards" / "shard-00000-of-00002").exists()


def _worker_pid(job, shard: str, timeout: float = 120) -> int:
    """The pid of the `--gpus` worker running `shard` ("1/2") of this job file."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in Path("/proc").iterdir():
            try:
                args = (proc / "cmdline").read_bytes().decode().split("\0")
            except OSError:
                continue
            if str(job) in args and "--shard" in args and shard in args:
                return int(proc.name)
        time.sleep(0.05)
    raise AssertionError(f"no worker for shard {shard} of {job}")


def test_gpus_overwrite_never_merges_a_slow_siblings_old_shard(shard_job):
    """`--gpus 2 --overwrite` with new settings: each worker cleared only its own shard, so
    the first to finish took its slow sibling's old summary for done and merged (here: refused
    to merge, exit 2). The launcher now clears every shard before its workers start."""
    import signal
    import subprocess
    import sys
    import time

    from conftest import child_env

    make, _ = shard_job
    single = make("single-3")
    assert cli("run", str(single), "--set", "task.max_new_tokens=3").exit_code == 0
    reference = read_outputs(single.parent / "single-3")
    job = make("overwrite-workers")
    out = job.parent / "overwrite-workers"
    assert cli_subprocess("run", str(job), "--gpus", "2").returncode == 0
    again = [sys.executable, "-m", "bulkinfer", "run", str(job), "--gpus", "2", "--overwrite"]
    launcher = subprocess.Popen(
        [*again, "--set", "task.max_new_tokens=3"],
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    slow = _worker_pid(job, "1/2")
    os.kill(slow, signal.SIGSTOP)
    try:
        fast = _worker_pid(job, "0/2")
        deadline = time.monotonic() + 180
        while Path(f"/proc/{fast}").exists() and launcher.poll() is None:
            assert time.monotonic() < deadline, "shard 0 never finished"
            time.sleep(0.1)
    finally:
        os.kill(slow, signal.SIGCONT)
    _, stderr = launcher.communicate(timeout=180)
    assert launcher.returncode == 0, stderr
    _same(out, reference)


def test_a_gpus_worker_killed_from_outside_is_named_and_the_rerun_resumes(shard_job):
    import signal
    import subprocess
    import sys

    from conftest import child_env

    make, reference = shard_job
    job = make("killed-worker")
    launcher = subprocess.Popen(
        [sys.executable, "-m", "bulkinfer", "run", str(job), "--gpus", "2"],
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    os.kill(_worker_pid(job, "1/2"), signal.SIGKILL)
    _, stderr = launcher.communicate(timeout=180)
    assert launcher.returncode == 137, stderr
    assert "shard 1/2 was killed by SIGKILL" in stderr and "rerun the same command" in stderr
    assert cli_subprocess("run", str(job), "--gpus", "2").returncode == 0
    _same(job.parent / "killed-worker", reference)


def test_a_shard_done_before_others_says_which_are_not_and_the_last_never_ends_unmerged_silently(
    shard_job,
):
    """A shard that finished before its siblings said nothing of them; and when the last to
    finish found a sibling damaged (its outputs cut short), the job stayed unmerged with every
    shard's exit 0 and no word of why."""
    make, reference = shard_job
    job = make("left")
    out = job.parent / "left"
    first = cli_subprocess("run", str(job), "--shard", "1/3")
    assert first.returncode == 0, first.stderr
    assert "shard 1/3 done; 1 of 3 shards done, not done: 0/3 (pending), 2/3 (pending)" in (
        first.stderr
    )
    assert "rerun" not in first.stderr  # pending shards may be waiting in a queue
    assert cli_subprocess("run", str(job), "--shard", "0/3").returncode == 0
    (part,) = (out / "shards" / "shard-00000-of-00003" / "outputs").glob("*.parquet")
    part.write_bytes(part.read_bytes()[:300])
    last = cli_subprocess("run", str(job), "--shard", "2/3")
    assert last.returncode == 0, last.stderr
    assert "not done: 0/3 (stopped); rerun --shard 0/3" in last.stderr, last.stderr
    assert not (out / "outputs").exists()
    again = cli_subprocess("run", str(job), "--shard", "0/3")  # rewrites its outputs, merges
    assert again.returncode == 0 and "all 3 shards done: merged" in again.stderr, again.stderr
    _same(out, reference)

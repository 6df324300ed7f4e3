"""What a rerun on a job's folder may change and what it may not: settings that change outputs
only in name resume (a model staged to another path, a dtype or pooling set to what `auto`
gave), settings `auto` resolves otherwise are refused; folders that lost their record, runs
whose input folder holds output folders, validate's view of a changed setting."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from conftest import (
    assert_every_id_once,
    child_env,
    cli,
    read_outputs,
    sample_prompts,
    write_job,
    write_jsonl,
)
from tiny_model import build_tiny_encoder

ROWS = 24


def _finished(tmp_path: Path, weights: Path, name: str = "out", *args: str, **sections) -> Path:
    """A finished job on ROWS sample prompts (a part every 10 rows); its job file."""
    inputs = tmp_path / "in.jsonl"
    if not inputs.exists():
        write_jsonl(inputs, sample_prompts(ROWS))
    job = write_job(tmp_path / f"{name}.yaml", weights, inputs, tmp_path / name, **sections)
    result = cli("run", str(job), *args)
    assert result.exit_code == 0, result.output
    return job


def _lose_last_part(out: Path) -> None:
    """As if the run had been killed before its last part: the rerun computes those rows."""
    parts = sorted((out / "checkpoint" / "parts").glob("part-*.parquet"))
    assert len(parts) > 1
    parts[-1].unlink()
    shutil.rmtree(out / "outputs")
    (out / "summary.json").unlink()


def _record(out: Path) -> dict:
    return json.loads((out / "job.json").read_text())


def test_rows_computed_in_a_dtype_auto_no_longer_gives_are_refused(tmp_path, tiny_model):
    """model.dtype auto resolves by the device (bf16 on a GPU, float32 on a CPU): a folder
    begun on a GPU node and resumed on a CPU one mixed bf16 rows with float32 ones, its spec
    unchanged. The dtype rows ran in is recorded; another is refused, naming the setting that
    resumes the folder as it ran, and that setting resumes it."""
    job = _finished(tmp_path, tiny_model)
    out = tmp_path / "out"
    assert _record(out)["resolved"] == {"dtype": "float32"}
    reference = read_outputs(out)

    record = _record(out)  # the folder as a GPU node would have left it
    record["resolved"]["dtype"] = "bfloat16"
    (out / "job.json").write_text(json.dumps(record))
    _lose_last_part(out)
    refused = cli("run", str(job))
    assert refused.exit_code == 2, refused.output
    assert "model.dtype auto resolved to bfloat16" in refused.output, refused.output
    assert "--set model.dtype=bfloat16" in refused.output, refused.output
    assert not (out / "outputs").exists()
    checked = cli("validate", str(job))  # said run would resume the folder
    assert checked.exit_code == 2 and "--set model.dtype=bfloat16" in checked.output, checked.output
    assert cli("validate", str(job), "--set", "model.dtype=bfloat16").exit_code == 0

    other = cli("run", str(job), "--set", "model.dtype=float16")
    assert other.exit_code == 2 and "(model.dtype: auto there, float16 here)" in other.output

    resumed = cli("run", str(job), "--set", "model.dtype=bfloat16")
    assert resumed.exit_code == 0, resumed.output
    assert "resuming" in resumed.output
    got = read_outputs(out)
    assert sorted(got.column("id").to_pylist()) == sorted(reference.column("id").to_pylist())

    # a folder started with the dtype set resumes with it set, and with auto where auto gives it
    job = _finished(tmp_path, tiny_model, "pinned", "--set", "model.dtype=float32")
    _lose_last_part(tmp_path / "pinned")
    auto = cli("run", str(job))
    assert auto.exit_code == 0, auto.output
    assert_every_id_once(tmp_path / "pinned", reference, ROWS)


def test_the_same_model_files_at_another_path_resume_the_folder(tmp_path, tiny_model):
    """A Slurm task that stages the model to its node's disk names another path for the same
    files: refused as "the model files differ" before. The files' hashes decide; a file
    changed in the copy is still refused, named."""
    job = _finished(tmp_path, tiny_model)
    out = tmp_path / "out"
    reference = read_outputs(out)
    staged = shutil.copytree(tiny_model, tmp_path / "staged")
    _lose_last_part(out)
    resumed = cli("run", str(job), "--set", f"model.path={staged}")
    assert resumed.exit_code == 0, resumed.output
    assert_every_id_once(out, reference, ROWS)

    record = _record(out)  # staged on a GPU node, where auto gave bf16: refused all the same
    (out / "job.json").write_text(json.dumps({**record, "resolved": {"dtype": "bfloat16"}}))
    refused = cli("run", str(job), "--set", f"model.path={staged}")
    assert refused.exit_code == 2 and "--set model.dtype=bfloat16" in refused.output
    (out / "job.json").write_text(json.dumps(record))

    config = json.loads((staged / "config.json").read_text())
    (staged / "config.json").write_text(json.dumps({**config, "initializer_range": 0.5}))
    _lose_last_part(out)
    refused = cli("run", str(job), "--set", f"model.path={staged}")
    assert refused.exit_code == 2, refused.output
    assert "model files changed since the checkpoint: config.json" in refused.output, refused.output


def test_a_score_job_resumes_whatever_the_generate_keys_it_ignores_say(tmp_path, tiny_model):
    """A score job takes generate's keys and says they have no effect: a changed one refused
    the resume of its folder all the same, as another job's outputs. A key that does change
    the scores is still refused."""
    job = _finished(tmp_path, tiny_model, task={"type": "score", "max_new_tokens": 128})
    out = tmp_path / "out"
    reference = read_outputs(out)
    _lose_last_part(out)
    for command in ("validate", "run"):
        result = cli(command, str(job), "--set", "task.max_new_tokens=64", "--set", "task.n=2")
        assert result.exit_code == 0, result.output
        assert "have no effect on a score job" in result.output
    assert_every_id_once(out, reference, ROWS)

    _lose_last_part(out)
    refused = cli(
        "run", str(job), "--set", "task.max_new_tokens=64", "--set", "task.chat_template=never"
    )
    assert refused.exit_code == 2 and "task.chat_template" in refused.output, refused.output
    assert "max_new_tokens" not in refused.output.split("holds another job's outputs")[1]


def test_shards_given_the_model_at_other_paths_merge(tmp_path, tiny_model):
    """Array tasks that each stage the model to their node's disk: each shard was refused by
    its siblings' record, and where it was not, the merge refused the shards for differing."""
    job = _finished(tmp_path, tiny_model)
    staged = shutil.copytree(tiny_model, tmp_path / "staged")
    sharded = tmp_path / "sharded"
    for index, model in enumerate((tiny_model, staged)):
        result = cli(
            "run", str(job), "--shard", f"{index}/2", "-o", str(sharded),
            "--set", f"model.path={model}",
        )  # fmt: skip
        assert result.exit_code == 0, result.output
    assert_every_id_once(sharded, read_outputs(tmp_path / "out"), ROWS)


def test_an_embed_pooling_changed_in_the_model_files_is_refused(tmp_path):
    """task.pooling auto reads the model's 1_Pooling/config.json, which the model's fingerprint
    (its top-level files) does not cover: a folder begun with mean pooling resumed with cls
    pooling and mixed the two. The pooling rows ran with is recorded and compared."""
    encoder = build_tiny_encoder(tmp_path / "enc")
    (encoder / "modules.json").write_text(
        json.dumps(
            [
                {
                    "idx": 0,
                    "name": "0",
                    "path": "",
                    "type": "sentence_transformers.models.Transformer",
                },
                {
                    "idx": 1,
                    "name": "1",
                    "path": "1_Pooling",
                    "type": "sentence_transformers.models.Pooling",
                },
            ]
        )
    )
    pooling = encoder / "1_Pooling" / "config.json"
    pooling.parent.mkdir()
    pooling.write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    task = {"type": "embed", "pooling": "auto", "max_new_tokens": 128}  # (128: its default)
    job = _finished(tmp_path, encoder, task=task)
    out = tmp_path / "out"
    reference = read_outputs(out)
    assert _record(out)["resolved"] == {"dtype": "float32", "pooling": "mean", "normalize": False}

    pooling.write_text(json.dumps({"pooling_mode_cls_token": True}))
    _lose_last_part(out)
    refused = cli("run", str(job))
    assert refused.exit_code == 2, refused.output
    assert (
        "task.pooling auto resolved to mean" in refused.output
        and "--set task.pooling=mean" in refused.output
    )
    resumed = cli("run", str(job), "--set", "task.pooling=mean")
    assert resumed.exit_code == 0, resumed.output
    assert_every_id_once(out, reference, ROWS)


def test_a_folder_that_lost_its_job_json_asks_for_overwrite_which_then_works(tmp_path, tiny_model):
    """Its error asked for --overwrite, which then refused the folder as not bulkinfer's: the
    only way out was removing files by hand."""
    job = _finished(tmp_path, tiny_model)
    out = tmp_path / "out"
    reference = read_outputs(out)
    (out / "job.json").unlink()
    for command in ("run", "validate"):
        refused = cli(command, str(job))
        assert refused.exit_code == 2, refused.output
        assert "no job.json" in refused.output and "--overwrite" in refused.output
    status = cli("status", str(out))  # not 'no bulkinfer job folder': what run says of it
    assert status.exit_code == 0 and "job  stopped" in status.output, status.output
    assert "no job.json" in status.output, status.output
    killed = subprocess.run(  # killed while --overwrite empties the folder: it asks again
        [sys.executable, "-m", "bulkinfer", "run", str(job), "--overwrite"],
        env={**child_env(), "BULKINFER_KILL_AT": "overwrite_removed:5"},
        capture_output=True,
        text=True,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    refused = cli("run", str(job))  # not 'its job record is set aside': there was none
    assert "it had lost its job.json before" in refused.output, refused.output
    again = cli("run", str(job), "--overwrite")
    assert again.exit_code == 0, again.output
    assert read_outputs(out).equals(reference)


def test_validate_names_a_setting_the_folder_ran_without(tmp_path, tiny_model):
    """validate said the folder would resume; run then refused it."""
    job = _finished(tmp_path, tiny_model)
    refused = cli("validate", str(job), "--set", "task.max_new_tokens=9")
    assert refused.exit_code == 2, refused.output
    assert "task.max_new_tokens (task.max_new_tokens: 6 there, 9 here)" in refused.output, (
        refused.output
    )
    assert cli("validate", str(job)).exit_code == 0
    run = cli("run", str(job), "--set", "task.max_new_tokens=9")
    assert run.exit_code == 2 and "task.max_new_tokens: 6 there, 9 here" in run.output


def test_an_input_folder_holding_job_folders_reads_only_its_data(tmp_path, tiny_model):
    """Jobs writing into a shared data folder read each other's outputs (and job.json, as JSON
    lines) as input: only a job's own output folder was passed over."""
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "rows.jsonl", sample_prompts(ROWS))
    first = write_job(tmp_path / "a.yaml", tiny_model, data, data / "a")
    assert cli("run", str(first)).exit_code == 0
    second = write_job(tmp_path / "b.yaml", tiny_model, data, data / "b")
    result = cli("run", str(second))
    assert result.exit_code == 0, result.output
    assert read_outputs(data / "b").num_rows == ROWS
    assert read_outputs(data / "b").equals(read_outputs(data / "a"))


def test_an_input_folder_holding_a_failed_run_s_folder_reads_only_its_data(tmp_path, tiny_model):
    """A run that failed before writing its record leaves its lock and failed.json (one JSON
    object over several lines): the next job on the folder read that as JSON lines input and
    stopped on it."""
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "rows.jsonl", sample_prompts(ROWS))
    job = write_job(tmp_path / "a.yaml", tiny_model, data, data / "failed")
    failed = cli("run", str(job), "--set", "model.device=cuda:7")
    assert failed.exit_code != 0 and (data / "failed" / "failed.json").is_file(), failed.output
    result = cli("run", str(job), "-o", str(data / "ok"))
    assert result.exit_code == 0, result.output
    assert read_outputs(data / "ok").num_rows == ROWS


def test_a_finished_job_missing_its_stats_or_card_writes_them_again(tmp_path, tiny_model):
    """A removed stats/ ended in pyarrow's error cut mid-word; a removed README.md stayed gone."""
    job = _finished(tmp_path, tiny_model)
    out = tmp_path / "out"
    for removed in (out / "stats", out / "README.md"):
        shutil.rmtree(removed) if removed.is_dir() else removed.unlink()
        result = cli("run", str(job))
        assert result.exit_code == 0, result.output
        assert "is missing from a finished job" in result.output, result.output
        assert removed.exists()


def test_status_and_report_on_a_finished_job_whose_files_are_damaged(tmp_path, tiny_model):
    """`status` said `done` for a finished job whose outputs were removed or corrupted (run
    writes them again: stopped, as the README says), and `report` died in pyarrow's traceback
    on a corrupted stats or output file."""
    job = _finished(tmp_path, tiny_model)
    out = tmp_path / "out"
    pristine = tmp_path / "pristine"
    shutil.copytree(out, pristine)
    part = next((out / "outputs").glob("*.parquet"))
    damages = {
        "outputs removed": lambda: shutil.rmtree(out / "outputs"),
        "an output corrupted": lambda: part.write_bytes(b"garbage"),
        "stats corrupted": lambda: (out / "stats" / "batches.parquet").write_bytes(b"garbage"),
    }
    for name, damage in damages.items():
        shutil.rmtree(out)
        shutil.copytree(pristine, out)
        damage()
        status = cli("status", str(out))
        assert status.exit_code == 0, status.output
        state = next(line.split() for line in status.output.splitlines() if "job" in line)
        assert state[:2] == ["job", "stopped"] and "rerun" in status.output, (name, status.output)
        report = cli("report", str(out))
        if report.exit_code != 0:  # said in one line, how to repair it too
            assert "Traceback" not in report.output and "rerun" in report.output, report.output
        rerun = cli("run", str(job))
        assert rerun.exit_code == 0, rerun.output
        assert read_outputs(out).equals(read_outputs(pristine)), name
        # outputs written again in place of the damaged ones (swapped in one step on Linux)
        assert not (out / "outputs.tmp").exists() and not (out / "outputs.old").exists()
        assert "job  done" in cli("status", str(out)).output


def test_status_of_a_finished_job_whose_record_is_unreadable(tmp_path, tiny_model):
    """A finished job whose job.json was cut short showed `done`; run refuses the folder."""
    _finished(tmp_path, tiny_model)
    out = tmp_path / "out"
    (out / "job.json").write_text("{cut")
    status = cli("status", str(out))
    assert status.exit_code == 0, status.output
    assert "job  stopped" in status.output and "unreadable" in status.output, status.output


def test_a_shard_an_older_version_finished_merges_with_one_of_this_version(tmp_path, tiny_model):
    """A shard written before a column was added (its stats without constrained_cut_short,
    an OpenAI job's outputs without top_logprobs) failed the merge with Arrow's traceback, on
    every rerun. Its rows merge, null in the columns it lacks."""
    import pyarrow.parquet as pq

    job = _finished(tmp_path, tiny_model)
    sharded = tmp_path / "sharded"
    first = cli("run", str(job), "--shard", "0/2", "-o", str(sharded))
    assert first.exit_code == 0, first.output
    old = sharded / "shards" / "shard-00000-of-00002"
    stats = old / "stats" / "batches.parquet"
    pq.write_table(pq.read_table(stats).drop(["constrained_cut_short"]), stats)
    (part,) = (old / "outputs").glob("*.parquet")
    pq.write_table(pq.read_table(part).drop(["finish_reason"]), part)
    second = cli("run", str(job), "--shard", "1/2", "-o", str(sharded))
    assert second.exit_code == 0, second.output
    merged = read_outputs(sharded)
    assert sorted(merged.column("id").to_pylist()) == sorted(
        read_outputs(tmp_path / "out").column("id").to_pylist()
    )
    reasons = merged.column("finish_reason").to_pylist()
    assert None in reasons and {"length", "stop"} & set(reasons)
    assert (
        "constrained_cut_short" in pq.read_table(sharded / "stats" / "batches.parquet").schema.names
    )


def test_a_folder_written_before_dtypes_were_recorded_is_judged_by_its_device(tmp_path, tiny_model):
    """Folders of earlier versions record no resolved dtype, only the device their plan named:
    one begun on a GPU resumed on a CPU without a word, mixing bf16 and float32 rows."""
    job = _finished(tmp_path, tiny_model)
    out = tmp_path / "out"
    reference = read_outputs(out)
    record = {k: v for k, v in _record(out).items() if k != "resolved"}
    (out / "job.json").write_text(json.dumps({**record, "device": "NVIDIA H100 80GB HBM3"}))
    _lose_last_part(out)
    refused = cli("run", str(job))
    assert refused.exit_code == 2 and "--set model.dtype=bfloat16" in refused.output
    assert cli("run", str(job), "--set", "model.dtype=float16").exit_code == 0

    (out / "job.json").write_text(json.dumps(record))  # a CPU's: float32 set resumes it
    _lose_last_part(out)
    resumed = cli("run", str(job), "--set", "model.dtype=float32")
    assert resumed.exit_code == 0, resumed.output
    assert_every_id_once(out, reference, ROWS)


def test_a_folder_written_before_a_setting_was_added_resumes(tmp_path, tiny_model):
    """A setting added since a folder was written (input.max_line_bytes) changed the spec's
    hash: every folder of the earlier version was refused, the message listing the new
    settings at their defaults as differences."""
    from bulkinfer.state.fingerprint import fingerprint

    job = _finished(tmp_path, tiny_model)
    out = tmp_path / "out"
    reference = read_outputs(out)
    record = _record(out)
    del record["spec"]["input"]["max_line_bytes"]
    record["fingerprint"]["spec"] = fingerprint(record["spec"], {}, {})["spec"]
    (out / "job.json").write_text(json.dumps(record))
    _lose_last_part(out)
    resumed = cli("run", str(job))
    assert resumed.exit_code == 0, resumed.output
    assert_every_id_once(out, reference, ROWS)
    _lose_last_part(out)
    refused = cli("run", str(job), "--set", "task.max_new_tokens=5")
    assert refused.exit_code == 2, refused.output
    assert "max_line_bytes" not in refused.output and "task.max_new_tokens" in refused.output

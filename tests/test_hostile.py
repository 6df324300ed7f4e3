"""Hostile files: nothing in an input or a model folder makes bulkinfer write outside its output
folder or run code it was not told to trust."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
from conftest import (
    child_env,
    cli,
    cli_subprocess,
    read_outputs,
    sample_prompts,
    write_job,
    write_jsonl,
)


def _snapshot(root) -> set[str]:
    return {
        os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(root) for f in files
    }


def test_ids_and_keep_columns_cannot_write_outside_the_output_folder(tmp_path, tiny_model):
    rows = [
        {"id": "../../escape", "prompt": "the fox", "../../evil": "x", "/etc/passwd": "y"},
        {"id": "/tmp/abs", "prompt": "the dog", "../../evil": "z", "/etc/passwd": "w"},
    ]
    inputs = write_jsonl(tmp_path / "in.jsonl", rows)
    job = write_job(
        tmp_path / "job.yaml",
        tiny_model,
        inputs,
        tmp_path / "out",
        input={"keep_columns": ["../../evil", "/etc/passwd"]},
    )
    before = _snapshot(tmp_path.parent)
    assert cli("run", str(job)).exit_code == 0
    created = _snapshot(tmp_path.parent) - before
    assert created and all(path.startswith(f"{tmp_path.name}/out/") for path in created), created
    out = read_outputs(tmp_path / "out")
    assert out.column("id").to_pylist() == ["../../escape", "/tmp/abs"]
    assert out.column("../../evil").to_pylist() == ["x", "z"]


def test_remote_code_in_a_model_folder_is_never_run_unless_trusted(tmp_path, tiny_model):
    model = tmp_path / "remote-code-model"
    shutil.copytree(tiny_model, model)
    marker = tmp_path / "code-ran"
    (model / "evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import LlamaConfig\n"
        "class EvilConfig(LlamaConfig):\n    model_type = 'evil'\n"
    )
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {
        "AutoConfig": "evil.EvilConfig",
        "AutoModelForCausalLM": "evil.EvilConfig",
    }
    config["model_type"] = "evil"
    (model / "config.json").write_text(json.dumps(config))
    job = write_job(
        tmp_path / "job.yaml",
        model,
        write_jsonl(tmp_path / "in.jsonl", [{"prompt": "hi"}]),
        tmp_path / "out",
    )
    result = cli("run", str(job))
    assert result.exit_code == 2, result.output
    assert "bulkinfer: error: model.path" in result.output
    assert "Traceback" not in result.output
    assert not marker.exists()


def _killed_midway(tmp_path, model):
    """A job on `model` killed (SIGKILL) after its second committed part; returns its spec."""
    job = write_job(
        tmp_path / "job.yaml",
        model,
        write_jsonl(tmp_path / "in.jsonl", sample_prompts(40)),
        tmp_path / "out",
        checkpoint={"every_rows": 4},
        batching={"max_tokens": 300, "max_batch_size": 4},
    )
    env = {**child_env(), "BULKINFER_KILL_AT": "part_committed:2"}
    command = [sys.executable, "-m", "bulkinfer", "run", str(job)]
    first = subprocess.run(command, capture_output=True, text=True, env=env)
    assert first.returncode == -signal.SIGKILL, first.stderr
    return job


def test_weights_replaced_by_others_of_the_same_size_are_refused_on_resume(tmp_path, tiny_model):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    job = _killed_midway(tmp_path, model)
    weights = model / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-64:] = bytes(64)  # the last weights' bytes, same size
    weights.write_bytes(bytes(data))
    second = cli_subprocess("run", str(job))
    assert second.returncode == 2, second.stderr
    message = second.stderr.strip().splitlines()[-1]
    assert "Traceback" not in second.stderr
    assert "model files changed since the checkpoint: model.safetensors" in message, message


def test_model_file_hashes_are_kept_in_the_cache_folder(tmp_path, monkeypatch):
    from bulkinfer import digests

    monkeypatch.setenv("BULKINFER_CACHE", str(tmp_path / "cache"))
    weights = tmp_path / "w.bin"
    weights.write_bytes(b"a" * 1000)
    first = digests.cached_file_blake2b(weights)
    assert first == digests.file_blake2b(weights)
    monkeypatch.setattr(digests, "file_blake2b", lambda path: "read again")
    assert digests.cached_file_blake2b(weights) == first  # unchanged: not read again
    weights.write_bytes(b"b" * 1000)
    assert digests.cached_file_blake2b(weights) == "read again"


def _without_root_powers(*args: str) -> subprocess.CompletedProcess:
    """bulkinfer run as root that obeys file permissions (no CAP_DAC_OVERRIDE), as a user would."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to stand in for another user's files")
    drop = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search,-fowner", "--"]
    command = [*drop, sys.executable, "-m", "bulkinfer", *args]
    return subprocess.run(command, capture_output=True, text=True, env=child_env())


def test_a_leftover_folder_owned_by_another_user_is_reported_as_permission_denied(
    tmp_path, tiny_model
):
    job = _killed_midway(tmp_path, tiny_model)
    nobody = 65534
    for folder, _, names in os.walk(tmp_path / "out"):
        for name in [folder, *(os.path.join(folder, n) for n in names)]:
            os.chown(name, nobody, nobody)
    second = _without_root_powers("run", str(job))
    assert second.returncode == 74, second.stderr
    message = second.stderr.strip().splitlines()[-1]
    assert "Permission denied" in message and "File exists" not in message, message
    assert "Traceback" not in second.stderr


@pytest.mark.parametrize("engine", ["fast", "reference"])
def test_a_model_whose_scores_are_nan_stops_the_job_instead_of_writing_empty_answers(
    tmp_path, tiny_model, engine
):
    """NaN scores make argmax pick an arbitrary token (often the end of text): every row would
    come back `ok` and empty. The job stops with one line and writes no part."""
    import torch
    from transformers import AutoModelForCausalLM

    broken = tmp_path / "nan-model"
    shutil.copytree(tiny_model, broken)
    model = AutoModelForCausalLM.from_pretrained(broken)
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))
    model.save_pretrained(broken)
    inputs = write_jsonl(tmp_path / "in.jsonl", sample_prompts(6))
    job = write_job(tmp_path / "job.yaml", tiny_model, inputs, tmp_path / "out")
    spec = job.read_text().replace(str(tiny_model), str(broken))
    job.write_text(spec)
    done = cli_subprocess("run", str(job), "--set", f"model.engine={engine}")
    assert done.returncode == 2, done.stderr
    assert "next-token scores for row" in done.stderr and "are NaN" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert not list((tmp_path / "out" / "outputs").glob("*.parquet"))
    # scoring the same rows (plain, and with choices) stops the same way: never `ok` and NaN
    rows = [{**r, "choices": [" yes", " no"]} for r in sample_prompts(6)]
    write_jsonl(tmp_path / "choices.jsonl", rows)
    for name, extra in (("score", ()), ("choices", ("--set", "input.choices_column=choices"))):
        scored = cli_subprocess(
            "run",
            str(job),
            "--set",
            f"model.engine={engine}",
            "--set",
            "task.type=score",
            "--set",
            f"input.path={tmp_path / 'choices.jsonl'}",
            "--output",
            str(tmp_path / name),
            *extra,
        )
        assert scored.returncode == 2, scored.stderr
        assert "the model's scores for row" in scored.stderr and "are NaN" in scored.stderr
        assert not list((tmp_path / name / "outputs").glob("*.parquet"))

"""Hostile files: nothing in an input or a model folder makes bulkinfer write outside its output
folder or run code it was not told to trust."""

from __future__ import annotations

import json
import os
import shutil

from conftest import cli, read_outputs, write_job, write_jsonl


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

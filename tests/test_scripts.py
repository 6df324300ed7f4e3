"""The benchmark still runs end to end on the CPU with a tiny model (no timing is asserted)."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT, child_env


def test_bench_runs_on_the_cpu_with_a_tiny_model(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench.py"), "--tiny", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    paths = {(r["work"], r["path"].split(",")[0]) for r in rows if "path" in r}
    for engine in ("reference", "fast"):
        assert ("score", f"bulkinfer {engine}") in paths
        assert ("generate", f"bulkinfer {engine}") in paths
    assert ("generate", "bulkinfer run (reference)") in paths  # the CLI end to end
    assert any(r["work"] == "step_costs" and r["costs"] for r in rows)
    checks = {r["work"]: r for r in rows if r["work"].endswith("_check")}
    assert checks["float32_check"]["rows_all_equal"] == 1.0  # greedy, token for token
    assert 0.0 <= checks["bfloat16_check"]["tokens_before_first_difference"] <= 1.0
    sampler = next(r["costs"] for r in rows if r["work"] == "sampler_costs")
    assert sampler["greedy_ms"] > 0 and sampler["t0.8_top_p_ms"] > 0
    assert all("error" not in r for r in rows)
    for r in rows:
        if r["work"] == "score" and r["path"].startswith("bulkinfer ") and "run" not in r["path"]:
            assert r["max_rel_diff_vs_plain"] < 1e-4
        if r["work"] == "generate" and "teacher_forced" in r:
            assert r["teacher_forced"]["argmax_share"] == 1.0  # float32 on the CPU


def test_bench_jobs_saves_an_fp8_checkpoint_across_disks_and_runs_it(tmp_path):
    """The 70B benchmark's path on the CPU: the model saved as an fp8 checkpoint whose shards go
    to a second folder when the disk would keep less than --keep-free (here always), linked
    from the model folder; its jobs run with model.quantization: fp8 and make tokens."""
    work, spill, out = tmp_path / "work", tmp_path / "spill", tmp_path / "out"
    args = ["--tiny", "--checkpoint", "fp8", "--spill", str(spill), "--keep-free", "1e9"]
    args += ["--jobs", "sharegpt:8,score:8", "--work", str(work), "--out", str(out)]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_jobs.py"), *args],
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    shards = sorted((work / "model").glob("*.safetensors"))
    assert shards and all(s.is_symlink() and s.resolve().parent == spill for s in shards)
    config = json.loads((work / "model" / "config.json").read_text())
    assert config["quantization_config"]["format"] == "float-quantized"
    report = json.loads((out / "bench_jobs.json").read_text())
    assert report["model"]["spilled_bytes"] == report["model"]["weight_bytes"] > 0
    generate, score = report["rows"]
    assert generate["output_tokens"] > 0 and score["input_tokens"] > 0
    job = json.loads((work / "sharegpt-8.yaml").read_text())
    assert job["model"]["quantization"] == "fp8"


def test_drift_places_the_first_difference_in_texts_held_one_a_sample():
    """An OpenAI batch job's text column holds a list (one text a sample): a row that differs
    between two runs is counted as differing text, not as a row without text."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from bench_jobs import drift

    ours = {"same": ["xy"], "other": ["abc", "q"], "failed": None, 7: ["é"]}
    theirs = {"same": ["xy"], "other": ["abd", "q"], "failed": ["z"], 7: ["é"]}
    result = drift(ours, theirs)
    assert result["equal_rows"] == 2
    assert result["differing_rows_with_text"] == 1
    assert result["first_difference_char_median"] == 2.0
    assert result["without_text"] == [1, 0]

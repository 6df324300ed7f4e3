"""Fractions of the hardware's limits: known GPUs by name, the arithmetic, and what a CPU run
writes (no fraction, null per batch) in summary.json and the batch stats."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
from conftest import cli, sample_prompts, write_job, write_jsonl

from bulkinfer.observe.stats import ModelCost, device_peaks


def test_known_gpus_are_matched_by_name():
    assert device_peaks("NVIDIA H100 80GB HBM3") == (989e12, 3.35e12)
    assert device_peaks("NVIDIA H100 PCIe") == (756e12, 2.0e12)
    assert device_peaks("NVIDIA H200") == (989e12, 4.8e12)
    assert device_peaks("NVIDIA A100-SXM4-80GB")[1] == 2.04e12
    assert device_peaks("cpu (2 threads)") is None


def test_fractions_of_peak_flops_and_of_the_decode_roofline():
    cost = ModelCost(
        params=10**9, weight_bytes=2 * 10**9, kv_bytes_per_token=10**5, peaks=(1e15, 2e12)
    )
    score = cost.fractions(
        prompt_tokens=100_000, new_tokens=0, rows=500, seconds=1.0, in_flight=500
    )
    assert score == {"peak_flops_fraction": pytest.approx(0.2)}
    # 100 rows of 100 prompt + 100 new tokens, all in flight: context 150, a step reads
    # 2e9 + 100 x 150 x 1e5 = 3.5e9 bytes -> 1.75 ms -> 57,143 tokens/s at the roofline
    gen = cost.fractions(
        prompt_tokens=10_000, new_tokens=10_000, rows=100, seconds=1.0, in_flight=100
    )
    assert gen["decode_roofline_fraction"] == pytest.approx(10_000 / (100 * 2e12 / 3.5e9))
    assert ModelCost(1, 1, 1, None).fractions(1, 1, 1, 1.0, 1) == {}


def test_a_cpu_run_reports_time_outside_the_model_and_no_fraction(tmp_path, tiny_model):
    job = write_job(
        tmp_path / "job.yaml",
        tiny_model,
        write_jsonl(tmp_path / "in.jsonl", sample_prompts(12)),
        tmp_path / "out",
    )
    result = cli("run", str(job))
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["engine"] == "reference"
    assert 0 <= summary["seconds_outside_model"] <= summary["wall_seconds"]
    assert "peak_flops_fraction" not in summary
    stats = pq.read_table(tmp_path / "out" / "stats" / "batches.parquet").to_pylist()
    assert stats and all(s["peak_flops_fraction"] is None for s in stats)


def test_batch_figures_a_later_version_recorded_are_left_out_not_a_failure(tmp_path, tiny_model):
    """A folder whose manifest holds a batch figure this version does not know (written by a
    later one, then resumed here) finishes: the stats table keeps the figures it knows."""
    job = write_job(
        tmp_path / "job.yaml",
        tiny_model,
        write_jsonl(tmp_path / "in.jsonl", sample_prompts(12)),
        tmp_path / "out",
    )
    assert cli("run", str(job)).exit_code == 0
    manifest = tmp_path / "out" / "checkpoint" / "manifest.jsonl"
    lines = [json.loads(line) for line in manifest.read_text().splitlines()]
    for line in lines:
        for stats in line["stats"]:
            stats["a_later_figure"] = 1
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    (tmp_path / "out" / "summary.json").unlink()  # killed before its summary
    result = cli("run", str(job))
    assert result.exit_code == 0, result.output
    stats = pq.read_table(tmp_path / "out" / "stats" / "batches.parquet").to_pylist()
    assert len(stats) == sum(len(line["stats"]) for line in lines)
    assert "a_later_figure" not in stats[0]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["rows_out"] == 12

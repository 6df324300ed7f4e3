"""Check that a job runs on the GPU and matches the CPU: tiny model, generate and score.

Run on a GPU machine: `python scripts/smoke_gpu.py OUTDIR`. Greedy texts must equal the CPU's in
float32; scores must agree within 1e-4 relative. Prints one line per check and exits non-zero
on a mismatch.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # tiny_model
from tiny_model import build_tiny_model


def run_job(
    work: Path, name: str, model: Path, inputs: Path, device: str, task: dict
) -> list[dict]:
    spec = {
        "model": {"path": str(model), "device": device, "dtype": "float32"},
        "task": task,
        "input": {"path": str(inputs)},
        "output": {"path": str(work / name)},
        "batching": {"max_tokens": 4096},
    }
    job = work / f"{name}.yaml"
    job.write_text(yaml.safe_dump(spec))
    subprocess.run([sys.executable, "-m", "bulkinfer", "run", str(job)], check=True)
    return pq.read_table(next((work / name / "outputs").glob("*.parquet"))).to_pylist()


def main(work: Path) -> int:
    work = work.resolve()  # the job files name their paths absolutely
    work.mkdir(parents=True, exist_ok=True)
    model = build_tiny_model(work / "tiny", arch="qwen2")
    rows = [
        {"id": f"r{i}", "prompt": " ".join(["the fox"] * (1 + i % 37)) + f" {i}"}
        for i in range(200)
    ]
    inputs = work / "in.jsonl"
    inputs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    failures = 0
    for task in ({"type": "generate", "max_new_tokens": 16}, {"type": "score"}):
        cpu = run_job(work, f"cpu-{task['type']}", model, inputs, "cpu", task)
        gpu = run_job(work, f"gpu-{task['type']}", model, inputs, "cuda", task)
        if task["type"] == "generate":
            same = sum(a["text"] == b["text"] for a, b in zip(cpu, gpu, strict=True))
            print(f"generate: {same}/{len(cpu)} greedy texts equal on cpu and cuda (float32)")
            failures += same < len(cpu)
        else:
            worst = max(
                abs(a["logprob_sum"] - b["logprob_sum"]) / abs(a["logprob_sum"])
                for a, b in zip(cpu, gpu, strict=True)
            )
            print(f"score: worst relative difference cpu vs cuda {worst:.2e}")
            failures += worst > 1e-4
    print(json.loads((work / "gpu-generate" / "summary.json").read_text()))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1] if len(sys.argv) > 1 else "smoke-gpu")))

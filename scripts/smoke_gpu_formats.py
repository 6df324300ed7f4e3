"""Check choices scoring, n samples with log-probs and an OpenAI batch file on the GPU against
the CPU (tiny model, float32), and that they run in bfloat16.

Run on a GPU machine: `python scripts/smoke_gpu_formats.py OUTDIR`. Choice log-likelihoods must
agree within 1e-4 relative; sampled texts and token log-probs are reported (sampling may part
ways at a near-tie); the batch file must give one response per request. Exits non-zero on a
failed check.
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


def run_job(work: Path, name: str, model: Path, inputs: Path, device: str, **sections) -> list:
    spec = {
        "model": {"path": str(model), "device": device, "dtype": sections.pop("dtype", "float32")},
        "input": {"path": str(inputs)},
        "output": {"path": str(work / name)},
        "batching": {"max_tokens": 4096},
        **sections,
    }
    job = work / f"{name}.yaml"
    job.write_text(yaml.safe_dump(spec))
    subprocess.run([sys.executable, "-m", "bulkinfer", "run", str(job), "--overwrite"], check=True)
    return pq.read_table(next((work / name / "outputs").glob("*.parquet"))).to_pylist()


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def main(work: Path) -> int:
    work = work.resolve()  # the job files name their paths absolutely
    work.mkdir(parents=True, exist_ok=True)
    model = build_tiny_model(work / "tiny", arch="qwen2")
    failures = 0
    questions = write_jsonl(
        work / "mc.jsonl",
        [
            {
                "id": i,
                "prompt": " ".join(["the fox"] * (1 + i % 23)) + f" {i}",
                "choices": [" dog", " quick brown fox" * (1 + i % 3), f" {i}", " 東京"][
                    : 2 + i % 3
                ],
            }
            for i in range(200)
        ],
    )
    score = {
        "task": {"type": "score"},
        "input": {"path": str(questions), "choices_column": "choices"},
    }
    cpu = run_job(work, "cpu-mc", model, questions, "cpu", **score)
    gpu = run_job(work, "gpu-mc", model, questions, "cuda", **score)
    worst = max(
        abs(x - y) / abs(x)
        for a, b in zip(cpu, gpu, strict=True)
        for x, y in zip(a["choice_logprobs"], b["choice_logprobs"], strict=True)
    )
    print(f"choices: worst relative difference cpu vs cuda {worst:.2e}")
    failures += worst > 1e-4
    bf16 = run_job(work, "gpu-mc-bf16", model, questions, "cuda", dtype="bfloat16", **score)
    agree = sum(a["best_choice"] == b["best_choice"] for a, b in zip(cpu, bf16, strict=True))
    print(f"choices bfloat16: best choice equal to float32 cpu on {agree}/{len(cpu)} rows")

    prompts = write_jsonl(
        work / "in.jsonl",
        [
            {"id": f"r{i}", "prompt": " ".join(["the fox"] * (1 + i % 37)) + f" {i}"}
            for i in range(100)
        ],
    )
    task = {
        "max_new_tokens": 12,
        "temperature": 0.8,
        "n": 3,
        "logprobs": True,
        "chat_template": "never",
    }
    cpu = run_job(work, "cpu-n", model, prompts, "cpu", task=task)
    gpu = run_job(work, "gpu-n", model, prompts, "cuda", task=task)
    same = sum(a["text"] == b["text"] for a, b in zip(cpu, gpu, strict=True))
    diffs = [
        abs(x - y)
        for a, b in zip(cpu, gpu, strict=True)
        if a["token_ids"] == b["token_ids"]
        for xs, ys in zip(a["token_logprobs"], b["token_logprobs"], strict=True)
        for x, y in zip(xs, ys, strict=True)
    ]
    print(f"n=3 sampled: {same}/{len(cpu)} rows with all samples equal on cpu and cuda")
    print(f"token logprobs: worst difference cpu vs cuda {max(diffs):.2e} over {len(diffs)} tokens")
    failures += same < 0.9 * len(cpu) or max(diffs) > 1e-3

    requests = [
        {
            "custom_id": f"request-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": "x",
                "messages": [{"role": "user", "content": f"the fox {i}"}],
                "max_tokens": 1 + i % 9,
                "temperature": [0, 0.7, 1.0][i % 3],
                "n": 1 + i % 2,
                "logprobs": i % 4 == 0,
            },
        }
        for i in range(100)
    ]
    batch = write_jsonl(work / "batch.jsonl", requests)
    run_job(work, "gpu-batch", model, batch, "cuda", task={"max_new_tokens": 16})
    lines = (work / "gpu-batch" / "responses.jsonl").read_text().splitlines()
    ids = [json.loads(line)["custom_id"] for line in lines]
    ok = ids == [r["custom_id"] for r in requests]
    print(f"openai batch on cuda: {len(lines)} responses, keyed in order: {ok}")
    failures += not ok
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1] if len(sys.argv) > 1 else "smoke-formats")))

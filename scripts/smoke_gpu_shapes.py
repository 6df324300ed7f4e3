"""Check the fast engine on the GPU across the model shapes it takes, against the reference engine.

Run on a GPU machine: `PYTHONPATH=. python scripts/smoke_gpu_shapes.py OUTDIR [--shapes a,b]`.
Each shape is a random-weight model of a real head layout (head size 64 or 128, grouped query
heads 1 to 7 a KV head, biases, q/k norms, tied embeddings), two layers, saved to disk; each job
runs through `bulkinfer.run` as a user's would. Per shape, on the same prompts (5 to ~900
tokens, so decode steps split long rows and combine them):

- generate, greedy: the reference engine in bf16 (the baseline), the fast engine in bf16
  (Triton decode attention, CUDA graphs, compiled layers), in bf16 with an fp8 KV cache, and
  with fp8 weights and KV, against the reference engine in float32; the share of rows whose
  first 4 tokens equal the reference's;
- score: the fast engine in bf16 against the reference in float32, relative error of each
  row's log-prob sum (median, max).

The random weights' LM head is scaled up (as the CPU tests do) so greedy choices are not
near-ties. Prints a table, writes OUTDIR/shapes.json, exits non-zero where a job fails, a row
has an error, or the fast engine in bf16 agrees with float32 on 5 points fewer rows than the
reference engine in bf16 does (the baseline: what bf16 rounding alone moves).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # tiny_model
from tiny_model import train_tokenizer

# name: (model type, hidden, heads, KV heads, head size, extra config)
SHAPES = {
    "smollm2": ("llama", 576, 9, 3, 64, {"tie_word_embeddings": True}),
    "qwen2.5-0.5b": ("qwen2", 896, 14, 2, 64, {"tie_word_embeddings": True}),
    "qwen2.5-7b": ("qwen2", 896, 28, 4, 128, {}),
    "qwen3": ("qwen3", 1024, 16, 8, 128, {}),
    "llama-mha": ("llama", 1024, 8, 8, 128, {}),
    "mistral": ("mistral", 1024, 16, 4, 128, {"sliding_window": None}),
}
RUNS = {
    "reference bf16": {"model.dtype": "bfloat16", "model.engine": "reference"},  # the baseline
    "bf16": {"model.dtype": "bfloat16"},
    "bf16+fp8 kv": {"model.dtype": "bfloat16", "model.kv_cache_dtype": "fp8"},
    "fp8": {"model.dtype": "bfloat16", "model.quantization": "fp8", "model.kv_cache_dtype": "fp8"},
}
AGREE = 4  # first tokens compared


def build(folder: Path, name: str) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    arch, hidden, heads, kv_heads, head_dim, extra = SHAPES[name]
    tokenizer = train_tokenizer(vocab_size=2048)
    config = AutoConfig.for_model(
        arch,
        hidden_size=hidden,
        intermediate_size=hidden * 3,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=4096,
        vocab_size=len(tokenizer),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        **{"tie_word_embeddings": False, **extra},
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        if not config.tie_word_embeddings:
            model.get_output_embeddings().weight.mul_(20.0)
        for layer in model.model.layers:  # random biases where the shape has them
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                if proj.bias is not None:
                    proj.bias.normal_(0, 0.5)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def rows(work: Path) -> Path:
    words = ["the", "fox", "jumps", "over", "a", "lazy", "dog", "in", "Paris", "snow"]
    path = work / "in.jsonl"
    with path.open("w") as f:
        for i in range(160):
            n = 2 + (i * 37) % 400 if i % 8 else 600 + i  # a few long rows
            text = " ".join(words[(i + k) % len(words)] for k in range(n))
            f.write(json.dumps({"id": f"r{i}", "prompt": text}) + "\n")
    return path


DEVICE = ["cuda"]  # --device


def run(work: Path, name: str, model: Path, inputs: Path, task: dict, **settings) -> tuple:
    import bulkinfer

    job = {
        "model": {"path": str(model), "device": DEVICE[0]},
        "input": {"path": str(inputs)},
        "output": {"path": str(work / name)},
        "task": task,
    }
    started = time.monotonic()
    summary = bulkinfer.run(bulkinfer.load(job, **settings), overwrite=True)
    table = pq.read_table(work / name / "outputs")
    return table.to_pylist(), summary, time.monotonic() - started


def first_tokens(row: dict) -> list | None:
    ids = row.get("token_ids")
    return None if ids is None else list(ids[:AGREE])


def check(work: Path, name: str) -> dict:
    model = build(work / name, name)
    inputs = rows(work)
    generate = {"type": "generate", "max_new_tokens": 24, "logprobs": True}
    result: dict = {"shape": name}
    ref, _, _ = run(
        work,
        f"{name}-ref",
        model,
        inputs,
        generate,
        **{"model.engine": "reference", "model.dtype": "float32"},
    )
    for label, settings in RUNS.items():
        got, summary, seconds = run(
            work, f"{name}-{label}", model, inputs, generate, **{"model.engine": "fast", **settings}
        )
        errors = sum(r["error"] is not None for r in got)
        same = sum(first_tokens(a) == first_tokens(b) for a, b in zip(ref, got, strict=True))
        result[label] = {"agree": same / len(ref), "errors": errors, "seconds": round(seconds, 1)}
    score = {"type": "score"}
    ref, _, _ = run(
        work,
        f"{name}-score-ref",
        model,
        inputs,
        score,
        **{"model.engine": "reference", "model.dtype": "float32"},
    )
    got, _, _ = run(
        work,
        f"{name}-score",
        model,
        inputs,
        score,
        **{"model.engine": "fast", "model.dtype": "bfloat16"},
    )
    rel = [
        abs(a["logprob_sum"] - b["logprob_sum"]) / max(abs(a["logprob_sum"]), 1e-9)
        for a, b in zip(ref, got, strict=True)
    ]
    result["score"] = {
        "median": statistics.median(rel),
        "max": max(rel),
        "errors": sum(r["error"] is not None for r in got),
    }
    return result


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--device", default="cuda", help="cpu: the script's own dry run")
    args = parser.parse_args()
    DEVICE[0] = args.device
    work = Path(args.out).resolve()
    work.mkdir(parents=True, exist_ok=True)
    results, failures = [], 0
    for name in args.shapes.split(","):
        try:
            result = check(work, name)
        except Exception as exc:  # one shape's failure is reported, the others still run
            result = {"shape": name, "failed": f"{type(exc).__name__}: {exc}"}
            failures += 1
        results.append(result)
        print(json.dumps(result), flush=True)
        if "failed" not in result:
            failures += result["bf16"]["agree"] < result["reference bf16"]["agree"] - 0.05
            failures += sum(result[k]["errors"] for k in (*RUNS, "score")) > 0
        (work / "shapes.json").write_text(json.dumps(results, indent=1))
    print(f"| shape | {' | '.join(f'{k} agree' for k in RUNS)} | score rel. err median / max |")
    for r in results:
        if "failed" in r:
            print(f"| {r['shape']} | failed: {r['failed'][:120]} |")
            continue
        agree = " | ".join(f"{r[k]['agree']:.0%}" for k in RUNS)
        print(f"| {r['shape']} | {agree} | {r['score']['median']:.1e} / {r['score']['max']:.1e} |")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

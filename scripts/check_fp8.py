"""fp8 on a GPU against what the CPU tests pin down, and the fidelity table of docs/perf.md.

1. Kernels (CUDA only): `fp8.linear` through `torch._scaled_mm` against the same fp8 operands
   multiplied dequantized in float32 (the CPU's path), the Triton decode kernel reading an
   fp8 KV cache against the reference attention over the cache dequantized, the fused fp8
   KV write against kv.quantize_heads (bytes equal), and the fused SiLU-and-quantize kernel
   of the down projection's input, eager and compiled, against the torch code (bytes equal).
2. Fidelity, as a user runs it (`bulkinfer run`, fast engine): the shipped score, sample and
   choices jobs on a model (the sample SmolLM2 by default; a trained model: random weights have
   flat logits) in float32, bf16, fp8 weights, fp8 KV cache and both: per-row score relative
   error against float32 (median, p95, max), greedy texts equal to float32's, choices accuracy.

    python scripts/check_fp8.py --out OUT [--model /tmp/smol.gguf] [--rows 48] [--kernels-only]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RUNS = {
    "float32": ["model.dtype=float32"],
    "bf16": ["model.dtype=bfloat16"],
    "fp8": ["model.dtype=bfloat16", "model.quantization=fp8"],
    "fp8-kv": ["model.dtype=bfloat16", "model.kv_cache_dtype=fp8"],
    "fp8-both": ["model.dtype=bfloat16", "model.quantization=fp8", "model.kv_cache_dtype=fp8"],
}


def kernels() -> dict:
    """Relative errors of the GPU's fp8 paths against their definitions."""
    import torch

    from bulkinfer.engines import decode_attention as da
    from bulkinfer.engines.fp8 import linear, quantize_rows, quantize_weight
    from bulkinfer.engines.kv import quantize_heads
    from bulkinfer.engines.packed_attention import Packed, _reference

    out = {"device": torch.cuda.get_device_name(), "linear": [], "decode_attention": []}
    g = torch.Generator(device="cuda").manual_seed(0)
    for tokens, k, n in [(1, 4096, 6144), (37, 4096, 28672), (1024, 14336, 4096)]:
        x = torch.randn(tokens, k, device="cuda", generator=g).bfloat16()
        w = quantize_weight(torch.randn(n, k, device="cuda", generator=g) * 0.02)
        got = linear(x, w, None).float()
        x8, scale = quantize_rows(x)
        want = (x8.float() * scale) @ (w.weight.float() * w.scale[:, None]).T
        error = ((got - want).norm() / want.norm()).item()
        out["linear"].append({"tokens": tokens, "k": k, "n": n, "relative_error": error})
    for rows, heads, kv_heads, dim, max_len in [(64, 32, 8, 128, 1500), (512, 14, 2, 64, 300)]:
        used = torch.randint(1, max_len + 1, (rows,), device="cuda", generator=g)
        starts = torch.zeros(rows + 1, dtype=torch.int64, device="cuda")
        starts[1:rows] = torch.cumsum(used[:-1], 0)
        total = int(starts[rows - 1] + used[-1])
        keys = torch.randn(total, kv_heads, dim, device="cuda", generator=g).bfloat16()
        values = torch.randn(total, kv_heads, dim, device="cuda", generator=g).bfloat16()
        (k8, ks), (v8, vs) = quantize_heads(keys), quantize_heads(values)
        q = torch.randn(rows, heads, dim, device="cuda", generator=g).bfloat16()
        starts, used = starts.int(), used.int()
        got = da.decode_attention(q, k8, v8, starts, used, max_len, dim**-0.5, ks, vs).float()
        packed = Packed(
            torch.arange(rows + 1, dtype=torch.int32, device="cuda"),
            max_len,
            dim**-0.5,
            decode=True,
            region_start=starts,
            used=used,
        )
        deq_k, deq_v = k8.float() * ks[..., None], v8.float() * vs[..., None]
        want = _reference(q.float(), deq_k, deq_v, packed)
        error = ((got - want).norm() / want.norm()).item()
        out["decode_attention"].append({"rows": rows, "heads": heads, "relative_error": error})
    k = torch.randn(4096, 8, 128, device="cuda", generator=g).bfloat16() * 3
    at = torch.randperm(8192, device="cuda", generator=g)[:4096]
    pool = [torch.zeros(8192, 8, 128, dtype=k8.dtype, device="cuda") for _ in range(2)]
    scales = [torch.zeros(8192, 8, device="cuda") for _ in range(2)]
    back, _ = da.store_fp8(at, k, k, pool[0], pool[1], scales[0], scales[1], read_back=True)
    want, want_scale = quantize_heads(k)
    read = (pool[0][at].float() * scales[0][at][..., None]).to(k.dtype)  # KVPool.read's
    out["kv_store"] = {
        "bytes_equal": (pool[0][at].view(torch.uint8) == want.view(torch.uint8))
        .float()
        .mean()
        .item(),
        "scale_relative_error": ((scales[0][at] - want_scale) / want_scale).abs().max().item(),
        "read_back_equal": (back == read).float().mean().item(),
    }
    out["silu_mul_fp8"] = silu_mul_kernel()
    return out


def silu_mul_kernel() -> list[dict]:
    """fp8_kernels.silu_mul_quantized, called as it is and inside torch.compile with dynamic
    tokens (as the decoder calls it), against quantize_rows(silu(gate) * up) in torch."""
    import torch

    from bulkinfer.engines import fp8_kernels
    from bulkinfer.engines.fp8 import quantize_rows

    fp8_kernels.prepare(torch.device("cuda"))

    def through(x):
        return fp8_kernels.silu_mul_quantized(x)

    compiled_fn = torch.compile(through, fullgraph=True)

    def compiled(x):  # the token count dynamic, as the decoder marks it
        torch._dynamo.maybe_mark_dynamic(x, 0)
        return compiled_fn(x)

    g = torch.Generator(device="cuda").manual_seed(1)
    results = []
    for tokens, n in [(1, 14336), (1000, 14336), (16384, 14336), (77, 4864), (3, 28672)]:
        x = (torch.randn(tokens, 2 * n, device="cuda", generator=g) * 2).bfloat16()
        gate, up = x.chunk(2, dim=-1)
        want, want_scale = quantize_rows(torch.nn.functional.silu(gate) * up)
        for name, fn in (("eager", through), ("compiled", compiled)):
            got, scale = fn(x)
            same = got.view(torch.uint8) == want.view(torch.uint8)
            results.append(
                {
                    "tokens": tokens,
                    "n": n,
                    "call": name,
                    "bytes_equal": same.float().mean().item(),
                    # where bytes differ, by how much (the rows' scales are the same)
                    "largest_difference_of_row_max": (got.float() - want.float()).abs().max().item()
                    / 448,
                    "scale_relative_error": ((scale - want_scale) / want_scale).abs().max().item(),
                }
            )
    return results


def run_job(job: str, name: str, settings: list[str], work: Path, extra: list[str]) -> list | str:
    out = work / f"{Path(job).stem}-{name}"
    args = [sys.executable, "-m", "bulkinfer", "run", str(ROOT / "jobs" / job), "--overwrite"]
    for setting in [*settings, "model.engine=fast", *extra]:
        args += ["--set", setting]
    done = subprocess.run(args + ["--output", str(out)], cwd=ROOT, capture_output=True, text=True)
    if done.returncode:  # the job's one-line error in place of its rows
        return done.stderr.strip().splitlines()[-1]
    files = sorted((out / "outputs").glob("*.parquet"))
    return pa.concat_tables(pq.read_table(f) for f in files).to_pylist()


def fidelity(model: str | None, rows: int, work: Path) -> dict:
    prompts = pq.read_table(ROOT / "sample_data" / "prompts.parquet").slice(0, rows)
    pq.write_table(prompts, work / "prompts.parquet")
    quick = (ROOT / "sample_data" / "quick.jsonl").read_text().splitlines(True)[:rows]
    (work / "quick.jsonl").write_text("".join(quick))
    common = [f"model.path={model}"] if model else []
    table = {}
    got = {}
    for name, settings in RUNS.items():
        got[name] = {
            "score": run_job(
                "score.yaml", name, settings, work, [*common, f"input.path={work}/prompts.parquet"]
            ),
            "sample": run_job(
                "sample.yaml",
                name,
                settings,
                work,
                [*common, f"input.path={work}/quick.jsonl", "task.max_new_tokens=32"],
            ),
            "choices": run_job("choices.yaml", name, settings, work, common),
        }
    base = got["float32"]
    for name, runs in got.items():
        row = {}
        failed = [f"{job}: {rows}" for job, rows in runs.items() if isinstance(rows, str)]
        if failed or any(isinstance(rows, str) for rows in base.values()):
            table[name] = {"failed": failed or "the float32 runs failed"}
            continue
        ours = np.array([r["logprob_sum"] for r in runs["score"]], dtype=float)
        theirs = np.array([r["logprob_sum"] for r in base["score"]], dtype=float)
        rel = np.abs(ours - theirs) / np.abs(theirs)
        row["score_relative_error"] = {
            "median": float(np.median(rel)),
            "p95": float(np.quantile(rel, 0.95)),
            "max": float(rel.max()),
        }
        row["greedy_texts_equal"] = sum(
            a["text"] == b["text"] for a, b in zip(runs["sample"], base["sample"], strict=True)
        )
        row["greedy_rows"] = len(base["sample"])
        choices = runs["choices"]
        row["choices_accuracy"] = sum(r["best_choice"] == r["answer"] for r in choices) / len(
            choices
        )
        table[name] = row
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model.path (default: the sample job's)")
    parser.add_argument("--rows", type=int, default=48)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--skip-kernels", action="store_true")
    parser.add_argument("--kernels-only", action="store_true", help="no fidelity runs")
    args = parser.parse_args()
    import torch

    args.out.mkdir(parents=True, exist_ok=True)
    result = {}
    if torch.cuda.is_available() and not args.skip_kernels:
        result["kernels"] = kernels()
        print(json.dumps(result["kernels"], indent=1), flush=True)
    if not args.kernels_only:
        with tempfile.TemporaryDirectory(prefix="check_fp8_") as work:
            result["fidelity"] = fidelity(args.model, args.rows, Path(work))
        print(json.dumps(result["fidelity"], indent=1))
    (args.out / "check_fp8.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

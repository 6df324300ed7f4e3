"""Prefill attention alone, over packed sequences of a real model's heads: ms for 32 layers and
the useful TFLOP/s (causal pairs only) of FlashAttention 2 (`_flash_attention_forward`, as the
engine calls it), cuDNN's ragged attention (`_cudnn_attention_forward` with cumulative lengths)
and, for reference, the memory-efficient kernel, with each one's largest difference from
FlashAttention's output and the cost of a first call at a token count not seen before.

    python scripts/tune_prefill_attention.py [--heads 32 --kv-heads 8 --dim 128] --out $OUT

Cases: `job` packs prompts of the sharegpt workload (bench_jobs.request_lengths) into forwards
of up to 16,384 tokens as the engine's prefill does; `score` into 73,728-token forwards, as a
score job's; `uniform-N` sequences of N tokens. GPU only; random bf16 inputs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_jobs import request_lengths  # noqa: E402


def packs(lengths: np.ndarray, budget: int, count: int) -> list[list[int]]:
    """The first `count` forwards of whole sequences of at most `budget` tokens, in order."""
    out, group, tokens = [], [], 0
    for n in lengths.tolist():
        if group and tokens + n > budget:
            out.append(group)
            if len(out) == count:
                return out
            group, tokens = [], 0
        group.append(n)
        tokens += n
    return out + ([group] if group else [])


def useful_flop(lengths: list[int], heads: int, dim: int) -> float:
    """Q.K and P.V over causal pairs: 4 * dim * heads * L(L+1)/2 a sequence."""
    return sum(4.0 * dim * heads * n * (n + 1) / 2 for n in lengths)


def kernels(scale: float):
    def flash(q, k, v, cu, max_len):
        out = torch.ops.aten._flash_attention_forward(
            q, k, v, cu, cu, max_len, max_len, 0.0, True, False, scale=scale
        )
        return out[0]

    def cudnn(q, k, v, cu, max_len):
        out = torch.ops.aten._cudnn_attention_forward(
            q, k, v, None, cu, cu, max_len, max_len, False, 0.0, True, False, scale=scale
        )
        return out[0]

    def efficient(q, k, v, cu, max_len):
        groups = q.shape[1] // k.shape[1]
        k, v = (t.repeat_interleave(groups, 1) for t in (k, v))
        out = torch.ops.aten._efficient_attention_forward(
            q[None], k[None], v[None], None, cu, cu, max_len, max_len, 0.0, 1, False, scale=scale
        )
        return out[0][0]

    return {"flash": flash, "cudnn": cudnn, "efficient": efficient}


def inputs(lengths: list[int], heads: int, kv_heads: int, dim: int, seed: int = 0):
    total = sum(lengths)
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v = (
        torch.randn(total, h, dim, device="cuda", dtype=torch.bfloat16, generator=gen)
        for h in (heads, kv_heads, kv_heads)
    )
    cu = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32, device="cuda")
    return q, k, v, cu, max(lengths)


def time_layers(fn, args, layers: int, repeats: int) -> float:
    """ms for `layers` calls (one forward's attention), the best of `repeats` forwards."""
    fn(*args)
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(layers):
            fn(*args)
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end))
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--forwards", type=int, default=4, help="forwards per case")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    heads, kv_heads, dim = args.heads, args.kv_heads, args.dim
    run = kernels(dim**-0.5)
    prompts, _ = request_lengths(10_000)
    cases = {
        "job": packs(prompts, 16_384, args.forwards),
        "score": packs(prompts[::-1], 73_728, 2),
        **{f"uniform-{n}": [[n] * (16_384 // n)] for n in (128, 512, 2048)},
    }
    rows = []
    for name, forwards in cases.items():
        for i, lengths in enumerate(forwards):
            a = inputs(lengths, heads, kv_heads, dim, seed=i)
            want = run["flash"](*a).float()
            row = {
                "case": name,
                "forward": i,
                "tokens": sum(lengths),
                "sequences": len(lengths),
                "longest": max(lengths),
            }
            flop = useful_flop(lengths, heads, dim) * args.layers
            for kernel, fn in run.items():
                try:
                    got = fn(*a).float()
                    ms = time_layers(fn, a, args.layers, args.repeats)
                except Exception as exc:  # a kernel this build lacks or refuses
                    row[f"{kernel}_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
                    continue
                row[f"{kernel}_ms"] = round(ms, 3)
                row[f"{kernel}_tflops"] = round(flop / ms / 1e9, 1)
                row[f"{kernel}_max_diff"] = float((got - want).abs().max())
            rows.append(row)
            print(json.dumps(row), flush=True)
    # a first call at a token count not seen before (cuDNN builds a graph per shape)
    first = {}
    for kernel in ("flash", "cudnn"):
        costs = []
        for j in range(6):
            lengths = [200 + j * 7 + 3 * kernel.startswith("c")] * 60
            a = inputs(lengths, heads, kv_heads, dim, seed=100 + j)
            torch.cuda.synchronize()
            start = time.perf_counter()
            try:
                run[kernel](*a)
                torch.cuda.synchronize()
            except Exception as exc:
                first[f"{kernel}_error"] = str(exc)[:200]
                break
            costs.append(round((time.perf_counter() - start) * 1e3, 2))
            start = time.perf_counter()
            run[kernel](*a)
            torch.cuda.synchronize()
            costs.append(round((time.perf_counter() - start) * 1e3, 2))
        first[kernel] = costs  # (first, second) call ms per new shape, one layer
    print(json.dumps({"first_calls_ms": first}), flush=True)
    result = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cudnn": torch.backends.cudnn.version(),
        "rows": rows,
        "first_calls_ms": first,
    }
    (args.out / "prefill_attention.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

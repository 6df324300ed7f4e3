"""Where a decode step's and a prefill forward's time goes, by kernel family (torch.profiler).

For each slot count: the CUDA-graph step time, then one eager step's kernels summed by family
(matrix products, attention, fused elementwise, KV writes, sampling, other) and the top
kernels, with FlashAttention and with the decode-attention kernel; then attention alone through
each, and how far their outputs differ; then the matrix products of one layer at decode and
prefill sizes, in TFLOP/s; then a packed prefill forward of PREFILL_TOKENS tokens by family.

Packed scoring batches of given sizes (--score-tokens) come first, before the KV pool takes the
memory.

With --fp8 the decoder's linears are quantized to fp8 and the KV pool is fp8 (as
`model.quantization: fp8` and `model.kv_cache_dtype: fp8` run them), and the matrix-product
table adds `torch._scaled_mm` alone and with its activations quantized.

On a GPU:  python scripts/profile_decode.py --shape llama-3.1-8b [--fp8] --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import build_model, word_tokenizer  # noqa: E402

from bulkinfer.engines.decode_attention import KERNEL_ENV, split_count  # noqa: E402
from bulkinfer.engines.fp8 import FP8, Fp8Linear, quantize_rows, quantize_weight  # noqa: E402
from bulkinfer.engines.kv import DecodeInputs  # noqa: E402
from bulkinfer.engines.packed_attention import Packed, attend  # noqa: E402
from bulkinfer.engines.select import engine_around  # noqa: E402

FAMILIES = (
    ("attention", ("flash", "fmha", "attention", "split_kernel", "combine_kernel")),
    ("matmul", ("gemm", "nvjet", "cutlass", "sm90_xmma", "cublas", "matmul")),
    ("kv write", ("index_copy", "indexing_backward", "index_put", "scatter")),
    ("fused elementwise", ("triton",)),
    ("sampling", ("argmax", "reduce", "max")),
)


def family(name: str) -> str:
    low = name.lower()
    for fam, keys in FAMILIES:
        if any(k in low for k in keys):
            return fam
    return "other"


def kernel_table(prof, steps: int) -> dict:
    by_family: dict[str, float] = defaultdict(float)
    by_kernel: dict[str, float] = defaultdict(float)
    for evt in prof.key_averages():
        us = getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0)
        if evt.device_type.name != "CUDA" and "DeviceType.CUDA" not in str(evt.device_type):
            continue
        by_family[family(evt.key)] += us / steps / 1e3
        by_kernel[evt.key[:90]] += us / steps / 1e3
    top = sorted(by_kernel.items(), key=lambda kv: -kv[1])[:12]
    return {
        "ms_by_family": {k: round(v, 3) for k, v in sorted(by_family.items())},
        "top_kernels_ms": [(k, round(v, 3)) for k, v in top],
    }


def profiled(fn, steps: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    return kernel_table(prof, steps)


def timed(fn, repeats: int = 10) -> float:
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats * 1e3


@torch.inference_mode()
def compare_attention(fast, model, size: int, ctx: int) -> dict:
    """Attention alone over all layers, through FlashAttention and through the decode kernel."""
    device = fast.device
    s = fast._state
    heads = model.config.num_attention_heads
    packed = Packed(
        s.query_offsets[: size + 1],
        max(1024, 1 << (ctx - 1).bit_length()),
        fast.decoder.scaling,
        fast._pool,
        s.write[:size],
        decode=True,
        region_start=s.starts[: size + 1],
        used=s.used[:size],
    )
    q = torch.randn(size, heads, fast.head_dim, device=device, dtype=torch.bfloat16)
    k = torch.randn(size, fast.kv_heads, fast.head_dim, device=device, dtype=torch.bfloat16)
    layers = fast.layers
    span = 1 + size * (ctx + 8)
    fast._pool.keys[0][:span].normal_()
    fast._pool.values[0][:span].normal_()

    def engine_attention():
        for i in range(layers):
            attend(i, q, k, k, packed)

    entry_attn = {"slots": size, "splits": split_count(size, fast.kv_heads, packed.max_len, 132)}
    outs = {}
    for kernel in ("flash", "triton"):
        os.environ[KERNEL_ENV] = kernel
        outs[kernel] = attend(0, q, k, k, packed)
        entry_attn[f"{kernel}_ms_all_layers"] = round(timed(engine_attention), 3)
    diff = (outs["flash"].float() - outs["triton"].float()).abs()
    entry_attn.update(
        {
            "max_abs_diff": float(diff.max()),
            "mean_abs_diff": float(diff.mean()),
            "kv_gb_read_once": round(
                2 * layers * size * ctx * fast.kv_heads * fast.head_dim * 2 / 1e9, 2
            ),
        }
    )
    return entry_attn


@torch.inference_mode()
def score_costs(fast, model, tokens: int) -> dict:
    """A packed scoring batch of about `tokens` tokens (sequences of 50-400): seconds of the
    first call (compiles) and of a second, its share of peak, and its kernels by family."""
    rng = np.random.default_rng(0)
    lengths = []
    while sum(lengths) < tokens:
        lengths.append(int(rng.integers(50, 400)))
    vocab = model.config.vocab_size
    sequences = [rng.integers(1, vocab, n).astype(np.int64) for n in lengths]
    score_from = [1] * len(sequences)
    run = lambda: fast.loglikelihood(sequences, score_from)  # noqa: E731
    started = time.perf_counter()
    run()
    torch.cuda.synchronize()
    first = time.perf_counter() - started
    ms = timed(run, 2)
    params = sum(p.numel() for n, p in model.named_parameters() if "embed" not in n)
    entry = {"tokens": sum(lengths), "rows": len(lengths), "first_s": round(first, 2)}
    entry["ms"] = round(ms, 1)
    entry["tflops"] = round(2 * params * entry["tokens"] / ms / 1e9, 1)
    entry.update(profiled(run, 1))
    return entry


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="llama-3.1-8b")
    parser.add_argument("--slots", default="64,256,1024", help="decode slot counts ('' for none)")
    parser.add_argument("--context", type=int, default=500)
    parser.add_argument(
        "--decode-only", action="store_true", help="skip the GEMM and prefill tables"
    )
    parser.add_argument(
        "--score-tokens", default="", help="packed scoring batches of these token counts"
    )
    parser.add_argument(
        "--fp8", action="store_true", help="fp8 weights and KV cache (model.quantization: fp8)"
    )
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    device = torch.device("cuda")
    started = time.perf_counter()
    model = build_model(args.shape, device, torch.bfloat16)
    if args.fp8:
        quantize_linears(model)
    fast = engine_around(
        model,
        word_tokenizer(model.config.vocab_size),
        "fast",
        kv_cache_dtype="fp8" if args.fp8 else "auto",
    )
    print(f"built in {time.perf_counter() - started:.1f} s", flush=True)
    report: dict = {
        "shape": args.shape,
        "context": args.context,
        "device": torch.cuda.get_device_name(),
    }
    for tokens in [int(t) for t in args.score_tokens.split(",") if t]:
        report[f"score_{tokens}"] = entry = score_costs(fast, model, tokens)
        print(json.dumps(entry, indent=1), flush=True)
    print(f"pool tokens {fast.reserve(0):,}", flush=True)
    ctx = args.context
    for size in [int(s) for s in args.slots.split(",") if s]:
        rows = DecodeInputs(
            last_tokens=[1] * size,
            lengths=[ctx] * size,
            starts=[1 + i * (ctx + 8) for i in range(size)],
            keys=[0] * size,
            generated=[1] * size,
        )
        fast.load_slots(rows, size)
        entry = {"slots": size}
        for kernel in ("triton",) if args.fp8 else ("flash", "triton"):  # flash reads no fp8
            os.environ[KERNEL_ENV] = kernel
            fast.use_graphs = True
            fast.drop_graphs()
            entry[f"graph_ms_{kernel}"] = round(timed(lambda s=size: fast.decode_step(s, ctx)), 3)
        fast.use_graphs = False
        entry["eager_ms"] = round(timed(lambda s=size: fast.decode_step(s, ctx), 3), 3)
        table = profiled(lambda s=size: fast.decode_step(s, ctx), 3)
        entry.update(table)
        report[f"decode_{size}"] = entry
        print(json.dumps(entry, indent=1), flush=True)

        if args.fp8:
            report[f"fp8_attention_{size}"] = tune_fp8_attention(fast, size, ctx)
            print(json.dumps(report[f"fp8_attention_{size}"]), flush=True)
        else:
            entry_attn = compare_attention(fast, model, size, ctx)
            report[f"attention_{size}"] = entry_attn
            print(json.dumps(entry_attn), flush=True)

    if args.decode_only:
        save(args.out, report)
        return
    # matrix products of one layer, decode and prefill sizes
    cfg = model.config
    hidden, inter = cfg.hidden_size, cfg.intermediate_size
    kvd = fast.kv_heads * fast.head_dim
    shapes = {
        "qkv": (hidden, cfg.num_attention_heads * fast.head_dim + 2 * kvd),
        "o": (cfg.num_attention_heads * fast.head_dim, hidden),
        "gate_up": (hidden, 2 * inter),
        "down": (inter, hidden),
        "lm_head": (hidden, cfg.vocab_size),
    }
    gemms = {}
    for m in (64, 256, 1024, 2048, 16384):
        for name, (k_in, n_out) in shapes.items():
            x = torch.randn(m, k_in, device=device, dtype=torch.bfloat16)
            w = torch.randn(n_out, k_in, device=device, dtype=torch.bfloat16)
            ms = timed(lambda x=x, w=w: torch.nn.functional.linear(x, w), 20)
            gemms[f"{name}@{m}"] = {
                "ms": round(ms, 4),
                "tflops": round(2 * m * k_in * n_out / ms / 1e9, 1),
            }
            if args.fp8 and name != "lm_head":  # the product alone, then with quantizing x
                w8 = quantize_weight(w)
                x8, scale = quantize_rows(x)
                for label, fast_accum in (("fp8", False), ("fp8_fast_accum", True)):
                    ms = timed(
                        lambda x8=x8, s=scale, w8=w8, f=fast_accum: torch._scaled_mm(
                            x8,
                            w8.weight.t(),
                            scale_a=s,
                            scale_b=w8.scale[None],
                            out_dtype=torch.bfloat16,
                            use_fast_accum=f,
                        ),
                        20,
                    )
                    gemms[f"{name}@{m}"][f"{label}_ms"] = round(ms, 4)
                    gemms[f"{name}@{m}"][f"{label}_tflops"] = round(
                        2 * m * k_in * n_out / ms / 1e9, 1
                    )
    report["gemms"] = gemms
    print(json.dumps(gemms), flush=True)

    # a packed prefill forward of PREFILL_TOKENS tokens
    from bulkinfer.engines.memory import PREFILL_TOKENS

    lengths = np.full(PREFILL_TOKENS // 256, 256)
    prompts = [np.ones(n, dtype=np.int64) for n in lengths]
    starts = list(1 + np.arange(len(lengths)) * 300)
    from bulkinfer.engines.sampling import SamplingParams

    greedy = SamplingParams(max_new_tokens=1)

    def prefill():
        fast.prefill(prompts, starts, [0] * len(prompts), greedy, False)

    prefill_ms = timed(prefill, 5)
    entry = {"tokens": int(lengths.sum()), "ms": round(prefill_ms, 2)}
    params = sum(p.numel() for n, p in model.named_parameters() if "embed" not in n)
    entry["tflops"] = round(2 * params * entry["tokens"] / prefill_ms / 1e9, 1)
    entry.update(profiled(prefill, 3))
    report["prefill"] = entry
    print(json.dumps(entry, indent=1), flush=True)
    save(args.out, report)


@torch.inference_mode()
def tune_fp8_attention(fast, size: int, ctx: int) -> dict:
    """The decode kernel over an fp8 cache alone (32 layers' worth), for tile sizes, warps and
    pipeline stages: ms each, the bytes it reads, and the fused fp8 KV write's ms."""
    from bulkinfer.engines import decode_attention as da

    pool, s = fast._pool, fast._state
    heads = fast.model.config.num_attention_heads
    q = torch.randn(size, heads, fast.head_dim, device=fast.device, dtype=torch.bfloat16)
    span = 1 + size * (ctx + 8)
    pool.keys[0][:span] = torch.randn_like(pool.keys[0][:span], dtype=torch.float32).to(FP8)
    pool.values[0][:span] = torch.randn_like(pool.values[0][:span], dtype=torch.float32).to(FP8)
    pool.key_scales[0][:span] = 0.01
    pool.value_scales[0][:span] = 0.01
    args = (q, pool.keys[0], pool.values[0], s.starts[:size], s.used[:size], ctx + 8, 0.088)
    scales = (pool.key_scales[0], pool.value_scales[0])
    entry = {"kv_gb_read": round(fast.layers * size * ctx * fast.kv_heads * 2 * 132 / 1e9, 2)}
    default = dict(da.TUNING)
    for block_n, warps, stages in [
        (64, 4, 2),
        (64, 4, 3),
        (64, 8, 2),
        (128, 4, 2),
        (128, 4, 3),
        (128, 8, 3),
        (32, 4, 2),
    ]:
        config = dict(BLOCK_N=block_n, num_warps=warps, num_stages=stages)
        da.TUNING.update({(True, False): config, (True, True): config})
        try:
            ms = timed(lambda: [da.decode_attention(*args, *scales) for _ in range(fast.layers)])
            entry[f"n{block_n}_w{warps}_s{stages}_ms"] = round(ms, 3)
        except Exception as exc:  # a configuration that does not fit the GPU's shared memory
            entry[f"n{block_n}_w{warps}_s{stages}_ms"] = str(exc).splitlines()[0][:80]
    da.TUNING.update(default)
    k = torch.randn(size, fast.kv_heads, fast.head_dim, device=fast.device, dtype=torch.bfloat16)
    at = s.write[:size]
    entry["store_fused_ms_all_layers"] = round(
        timed(lambda: [pool.store(0, at, k, k) for _ in range(fast.layers)]), 3
    )
    fused, da.triton = da.triton, None  # the same writes through torch's kernels
    entry["store_torch_ms_all_layers"] = round(
        timed(lambda: [pool.store(0, at, k, k) for _ in range(fast.layers)]), 3
    )
    da.triton = fused
    return entry


def quantize_linears(model) -> None:
    """The decoder layers' linears as fp8 ones, as engines/fp8_loading.py loads them."""
    from bulkinfer.engines.fp8_loading import LINEARS

    for layer in model.model.layers:
        for part, names in LINEARS:
            owner = getattr(layer, part)
            for name in names:
                m = getattr(owner, name)
                setattr(owner, name, Fp8Linear(quantize_weight(m.weight.detach()), m.bias))
    torch.cuda.empty_cache()


def save(out: Path | None, report: dict) -> None:
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "profile.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

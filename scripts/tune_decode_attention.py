"""The decode attention kernel alone, over a synthetic KV pool of a real model's heads: ms for
32 layers, the bandwidth it reaches against a plain copy of the same bytes, and its error
against the dequantized reference, with its own tiles and (--tiles) others.

    python scripts/tune_decode_attention.py [--rows 64,256,1024] [--context 550] [--tiles]
        [--cache bf16,fp8] [--block-n 32,64,128] [--warps 2,4,8] [--stages 2,3]
        [--lengths uniform,job] [--split-tokens 0,1024] --out $OUT

--tiles measures every combination of the three lists. --lengths job gives the rows the
cached lengths of a 10,000-request ShareGPT-like job in flight (prompt plus part of the answer,
rows with longer answers more often, as they hold their slots longer) and the attention length
bucket the engine passes; `job-sorted` the same with the longest rows first in the pool;
`job-longest` the pool as `job`, its programs started longest row first (the kernel's `order`,
as BULKINFER_DECODE_ORDER=longest runs it in the engine). --split-tokens
other than 0 splits every row's tokens into that many a program (at least the kernel's own
count), so long rows do not finish last alone.

GPU only. Pool contents are random (fp8 with per-token-head scales, or bf16); each row's cache
is contiguous, as the engine's pool allocates it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np
import torch
import triton

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from profile_decode import timed  # noqa: E402

from bulkinfer.engines import decode_attention as da  # noqa: E402
from bulkinfer.engines.fp8 import dequantize_rows  # noqa: E402
from bulkinfer.engines.kv import quantize_heads  # noqa: E402


def job_lengths(rows: int, seed: int = 0) -> np.ndarray:
    """Cached tokens of rows in flight in the sharegpt job: a request drawn with odds by its
    answer's length (the time it holds a slot), its prompt plus a uniform part of its answer."""
    from bench_jobs import request_lengths

    prompts, answers = request_lengths(10_000)
    rng = np.random.default_rng(seed)
    picked = rng.choice(len(answers), rows, p=answers / answers.sum())
    return prompts[picked] + rng.integers(0, answers[picked] + 1)


def pool(rows: int, context: int, kv_heads: int, dim: int, fp8: bool, lengths: str = "uniform"):
    gen = torch.Generator(device="cuda").manual_seed(0)
    if lengths == "uniform":
        used = torch.randint(context // 2, context + 1, (rows,), device="cuda", generator=gen)
    else:
        drawn = job_lengths(rows)
        if lengths == "job-sorted":
            drawn = np.sort(drawn)[::-1].copy()
        used = torch.from_numpy(drawn).to("cuda")
    used = used.to(torch.int32)
    ends = torch.cumsum(used.long(), 0)
    starts = (ends - used).to(torch.int32)
    shape = (int(ends[-1]), kv_heads, dim)
    keys = torch.randn(shape, device="cuda", generator=gen)
    values = torch.randn(shape, device="cuda", generator=gen)
    if not fp8:
        return keys.bfloat16(), values.bfloat16(), None, None, starts, used
    (keys, key_scales), (values, value_scales) = quantize_heads(keys), quantize_heads(values)
    return keys, values, key_scales, value_scales, starts, used


def reference(q, keys, values, ks, vs, starts, used, scale):
    """Row by row in float32 over the dequantized cache (a sample of rows)."""
    out = []
    groups = q.shape[1] // keys.shape[1]
    for r in range(0, q.shape[0], max(1, q.shape[0] // 16)):
        a, n = int(starts[r]), int(used[r])
        k, v = keys[a : a + n].float(), values[a : a + n].float()
        if ks is not None:
            k, v = dequantize_rows(k, ks[a : a + n]), dequantize_rows(v, vs[a : a + n])
        k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
        w = torch.einsum("hd,nhd->hn", q[r].float(), k) * scale
        out.append((r, torch.einsum("hn,nhd->hd", w.softmax(-1), v)))
    return out


def measure(
    rows, context, heads, kv_heads, dim, fp8, layers, configs, lengths="uniform", split_tokens=0
) -> list[dict]:
    keys, values, ks, vs, starts, used = pool(rows, context, kv_heads, dim, fp8, lengths)
    if lengths != "uniform":  # the engine's attention length bucket
        context = max(1024, 1 << (int(used.max()) - 1).bit_length())
    q = torch.randn(rows, heads, dim, device="cuda", dtype=torch.bfloat16)
    scale = dim**-0.5
    cached = int(used.sum())
    per_token = kv_heads * dim * 2 * (1 if fp8 else 2) + (kv_heads * 8 if fp8 else 0)
    gb = layers * cached * per_token / 1e9
    src = torch.empty(cached * per_token, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    copy_ms = timed(lambda: [dst.copy_(src) for _ in range(layers)], 5)
    expected = reference(q, keys, values, ks, vs, starts, used, scale)
    results = []
    saved = dict(da.TUNING)
    order = None
    if lengths == "job-longest":
        order = torch.from_numpy(da.longest_first(used.cpu().numpy())).to(used.device)
    args = (q, keys, values, starts, used, context, scale, ks, vs, order)
    own_splits = da.split_count
    if split_tokens:
        da.split_count = lambda r, h, n, p: max(
            own_splits(r, h, n, p), triton.next_power_of_2(triton.cdiv(n, split_tokens))
        )
    for tuning in configs:  # None: the kernel's own choice
        da.TUNING.update({key: tuning for key in da.TUNING} if tuning else {})
        entry = {"rows": rows, "fp8": fp8, "lengths": lengths, "split_tokens": split_tokens}
        entry.update(tuning or {"tuning": "default"})
        entry["mean_cached"], entry["bucket"] = round(float(used.float().mean()), 1), context
        try:
            out = da.decode_attention(*args)
            err = max(float((out[r].float() - e).abs().max() / e.abs().max()) for r, e in expected)
            ms = timed(lambda: [da.decode_attention(*args) for _ in range(layers)], 5)
            entry.update(ms=round(ms, 3), tb_per_s=round(gb / ms, 2), max_rel_err=f"{err:.2e}")
        except Exception as exc:  # a configuration that does not fit shared memory
            entry["error"] = str(exc).splitlines()[0][:100]
        finally:
            da.TUNING.update(saved)
            da.split_count = own_splits
        results.append(entry)
        print(json.dumps(entry), flush=True)
    results.append(
        {
            "rows": rows,
            "fp8": fp8,
            "kv_gb": round(gb, 2),
            "copy_tb_per_s": round(2 * gb / copy_ms, 2),
        }
    )
    print(json.dumps(results[-1]), flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="64,256,1024")
    parser.add_argument("--context", type=int, default=550)
    parser.add_argument("--heads", default="32,8,128", help="query heads, KV heads, head size")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--tiles", action="store_true", help="also other tiles, warps and stages")
    parser.add_argument("--cache", default="bf16,fp8", help="cache dtypes measured")
    parser.add_argument("--block-n", default="32,64,128", help="cached tokens a tile (--tiles)")
    parser.add_argument("--warps", default="2,4,8", help="(--tiles)")
    parser.add_argument("--stages", default="2,3", help="(--tiles)")
    parser.add_argument(
        "--lengths", default="uniform", help="uniform, job, job-sorted, job-longest"
    )
    parser.add_argument("--split-tokens", default="0", help="0: the kernel's own splits")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    heads, kv_heads, dim = (int(x) for x in args.heads.split(","))
    report = []

    def ints(text: str) -> list[int]:
        return [int(x) for x in text.split(",")]

    tiles = [
        dict(BLOCK_N=n, num_warps=w, num_stages=s)
        for n, w, s in itertools.product(ints(args.block_n), ints(args.warps), ints(args.stages))
    ]
    caches = [name == "fp8" for name in args.cache.split(",")]
    configs = [None] + (tiles if args.tiles else [])
    variants = itertools.product(
        ints(args.rows), caches, args.lengths.split(","), ints(args.split_tokens)
    )
    for rows, fp8, lengths, split_tokens in variants:
        shape = (heads, kv_heads, dim, fp8, args.layers, configs, lengths, split_tokens)
        report += measure(rows, args.context, *shape)
        torch.cuda.empty_cache()
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "tune_decode_attention.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

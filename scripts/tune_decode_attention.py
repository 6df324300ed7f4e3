"""The decode attention kernel alone, over a synthetic KV pool of a real model's heads: ms for
32 layers, the bandwidth it reaches against a plain copy of the same bytes, and its error
against the dequantized reference, with its own tiles and (--tiles) others.

    python scripts/tune_decode_attention.py [--rows 64,256,1024] [--context 550] [--tiles]
        [--cache bf16,fp8] [--block-n 32,64,128] [--warps 2,4,8] [--stages 2,3] --out $OUT

--tiles measures every combination of the three lists.

GPU only. Pool contents are random (fp8 with per-token-head scales, or bf16); each row's cache
is contiguous, as the engine's pool allocates it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from profile_decode import timed  # noqa: E402

from bulkinfer.engines import decode_attention as da  # noqa: E402
from bulkinfer.engines.fp8 import dequantize_rows  # noqa: E402
from bulkinfer.engines.kv import quantize_heads  # noqa: E402


def pool(rows: int, context: int, kv_heads: int, dim: int, fp8: bool):
    tokens = rows * context
    gen = torch.Generator(device="cuda").manual_seed(0)
    shape = (tokens, kv_heads, dim)
    keys = torch.randn(shape, device="cuda", generator=gen)
    values = torch.randn(shape, device="cuda", generator=gen)
    starts = torch.arange(rows, device="cuda", dtype=torch.int32) * context
    used = torch.randint(context // 2, context + 1, (rows,), device="cuda", generator=gen)
    used = used.to(torch.int32)
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


def measure(rows, context, heads, kv_heads, dim, fp8, layers, configs) -> list[dict]:
    keys, values, ks, vs, starts, used = pool(rows, context, kv_heads, dim, fp8)
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
    args = (q, keys, values, starts, used, context, scale, ks, vs)
    for tuning in configs:  # None: the kernel's own choice
        da.TUNING.update({key: tuning for key in da.TUNING} if tuning else {})
        entry = {"rows": rows, "fp8": fp8, **(tuning or {"tuning": "default"})}
        try:
            out = da.decode_attention(*args)
            err = max(float((out[r].float() - e).abs().max() / e.abs().max()) for r, e in expected)
            ms = timed(lambda: [da.decode_attention(*args) for _ in range(layers)], 5)
            entry.update(ms=round(ms, 3), tb_per_s=round(gb / ms, 2), max_rel_err=f"{err:.2e}")
        except Exception as exc:  # a configuration that does not fit shared memory
            entry["error"] = str(exc).splitlines()[0][:100]
        finally:
            da.TUNING.update(saved)
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
    for rows in ints(args.rows):
        for fp8 in caches:
            configs = [None] + (tiles if args.tiles else [])
            report += measure(rows, args.context, heads, kv_heads, dim, fp8, args.layers, configs)
            torch.cuda.empty_cache()
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "tune_decode_attention.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

"""The Triton decode-attention kernels against the reference attention, and the fp8 kernels
(the KV write, the down projection's SiLU-and-quantize) against the torch code, run on the CPU
by Triton's interpreter (TRITON_INTERPRET=1, set before Triton is imported: a subprocess).

The interpreter computes in numpy, so these check the kernels' indexing, masking, online
softmax and the combining of splits in float32 and float16, and an fp8 cache read by bfloat16
queries (whose products run in float16); the bfloat16 cache (which the interpreter cannot
represent) and the speed are checked on a GPU by scripts/tune_decode_attention.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]

CHECK = r"""
import json, sys
import torch
from bulkinfer.engines import decode_attention as da
from bulkinfer.engines.packed_attention import Packed, _reference

results = []
from bulkinfer.engines.kv import quantize_heads

for rows, heads, kv_heads, dim, max_len, dtype, fp8, *scaled in json.loads(sys.argv[1]):
    scaled = scaled[0] if scaled else {}
    dtype = getattr(torch, dtype)
    g = torch.Generator().manual_seed(rows * 31 + heads)
    used = torch.randint(1, max_len + 1, (rows,), generator=g)
    used[0], used[-1] = 1, max_len  # an idle slot's single token, and a full bucket
    starts = torch.zeros(rows + 1, dtype=torch.int64)
    starts[1:rows] = torch.cumsum(used[:-1] + 3, 0)  # regions with gaps between them
    starts[:rows] += 1
    tokens = int(starts[rows - 1] + used[-1] + 5)
    keys = torch.randn(tokens, kv_heads, dim, generator=g).to(dtype)
    values = (torch.randn(tokens, kv_heads, dim, generator=g) * scaled.get("values", 1)).to(dtype)
    q = (torch.randn(rows, heads, dim, generator=g) * scaled.get("queries", 1)).to(dtype)
    starts, used = starts.int(), used.int()
    scale = dim ** -0.5
    scales = [None, None]
    if fp8:  # an fp8 cache: the kernel dequantizes what the reference is given dequantized
        (keys, key_scales), (values, value_scales) = quantize_heads(keys), quantize_heads(values)
        scales = [key_scales, value_scales]
    order = None
    if scaled.get("ordered"):  # programs started longest row first: the same outputs
        order = torch.from_numpy(da.longest_first(used.numpy()))
    ours = da.decode_attention(q, keys, values, starts, used, max_len, scale, *scales, order)
    if fp8:
        keys, values = keys.float() * key_scales[..., None], values.float() * value_scales[..., None]
    packed = Packed(torch.arange(rows + 1, dtype=torch.int32), max_len, scale,
                    decode=True, region_start=starts, used=used)
    ref = _reference(q.float(), keys.float(), values.float(), packed)
    results.append({
        "splits": da.split_count(rows, kv_heads, max_len, 4),
        "error": (ours.float() - ref).abs().max().item(),
        "relative": ((ours.float() - ref).abs().max() / ref.abs().max()).item(),
        "dtype_kept": ours.dtype == dtype and ours.shape == q.shape,
    })
print(json.dumps(results))
"""

CASES = [
    # rows, heads, kv_heads, head_dim, max_len: grouped heads split over the cache (the
    # combining kernel), 7 heads a group (padded to the 16-row tile), one head a group (MHA),
    # 256 rows (the launch for many rows: over an fp8 cache: tiles of 64 tokens, two warps)
    (5, 8, 2, 64, 512),
    (3, 14, 2, 64, 300),
    (40, 4, 4, 128, 200),
    (256, 4, 2, 64, 150),
]


def interpreted(script: str, cases: list) -> list[dict]:
    """`script` run on `cases` by Triton's interpreter in a subprocess; its last line's JSON."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", script, json.dumps(cases)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "dtype, fp8, tolerance",
    [
        ("float32", False, 1e-5),
        ("float16", False, 4e-3),
        ("float32", True, 1e-5),
        ("bfloat16", True, 2e-2),  # a bfloat16 step at outputs of 2 to 4
    ],
    ids=["float32", "float16", "fp8-cache", "fp8-cache-bf16"],
)
def test_decode_kernels_equal_reference_attention(dtype, fp8, tolerance):
    """Also reading an fp8 cache (model.kv_cache_dtype: fp8) with its per-token, per-head
    scales, against the reference attention over the same values dequantized."""
    results = interpreted(CHECK, [[*case, dtype, fp8] for case in CASES])
    assert [r["splits"] for r in results] == [2, 1, 1, 1]  # both kernel paths ran
    for case, result in zip(CASES, results, strict=True):
        assert result["dtype_kept"], case
        assert result["error"] < tolerance, (case, result)


def test_rows_started_longest_first_give_the_same_attention():
    """BULKINFER_DECODE_ORDER=longest: each program reads the row the order names, split over
    the cache (the combining kernel) and not, over a bfloat16-queried fp8 cache too."""
    cases = [
        [5, 8, 2, 64, 512, "float32", False, {"ordered": 1}],
        [40, 4, 4, 128, 200, "float32", False, {"ordered": 1}],
        [40, 4, 4, 128, 200, "bfloat16", True, {"ordered": 1}],
    ]
    results = interpreted(CHECK, cases)
    assert [r["splits"] for r in results] == [2, 1, 1]
    for case, result, tolerance in zip(cases, results, [1e-5, 1e-5, 2e-2], strict=True):
        assert result["dtype_kept"], case
        assert result["error"] < tolerance, (case, result)


STORE = r"""
import json
import torch
from bulkinfer.engines import decode_attention as da
from bulkinfer.engines.fp8 import FP8
from bulkinfer.engines.kv import quantize_heads

g = torch.Generator().manual_seed(0)
n, kv_heads, dim, tokens = 6, 2, 64, 20
k = torch.randn(n, kv_heads, dim, generator=g) * torch.tensor([0.01, 30.0])[None, :, None]
v = torch.randn(n, kv_heads, dim, generator=g)
k[2, 1] = 0.0  # a zero vector keeps a finite scale
at = torch.tensor([3, 17, 5, 9, 11, 0])
pools = [torch.zeros(tokens, kv_heads, dim, dtype=FP8) for _ in range(2)]
scales = [torch.zeros(tokens, kv_heads) for _ in range(2)]
da.store_fp8(at, k, v, pools[0], pools[1], scales[0], scales[1])
out = {"untouched_zero": True, "scale_error": 0.0, "value_error": 0.0}
for x, pool, scale in zip((k, v), pools, scales):
    want, want_scale = quantize_heads(x)
    out["scale_error"] = max(out["scale_error"], ((scale[at] - want_scale) / want_scale).abs().max().item())
    # equal, except where rounding up carries into the exponent: the interpreter drops the
    # carry (it gives half the power of two; a GPU converts as torch does, scripts/check_fp8.py)
    got, ref = pool[at].float(), want.float()
    carried = (torch.frexp(ref)[0].abs() == 0.5) & (got == ref / 2)
    out["value_error"] += int(((got != ref) & ~carried).sum())
    others = torch.ones(tokens, dtype=torch.bool)
    others[at] = False
    out["untouched_zero"] &= bool((pool[others].float() == 0).all() and (scale[others] == 0).all())
# read back in the same launch: what the pool gives for those slots, in the inputs' dtype
# (float32 exactly; bfloat16 within its rounding: the interpreter truncates where a GPU
# rounds to nearest even, as torch does)
out["read_back_equal"] = True
for dtype, ulp in ((torch.float32, 0.0), (torch.bfloat16, 2.0**-7)):
    back = da.store_fp8(
        at, k.to(dtype), v.to(dtype), pools[0], pools[1], scales[0], scales[1], read_back=True
    )
    for got, pool, scale in zip(back, pools, scales):
        want = pool[at].float() * scale[at][..., None]
        close = (got.float() - want).abs() <= ulp * want.abs()
        out["read_back_equal"] &= got.dtype == dtype and bool(close.all())
print(json.dumps(out))
"""


def test_fp8_cache_store_kernel_quantizes_into_the_slots():
    """The fused fp8 KV write (one launch per layer on a GPU) computes kv.quantize_heads'
    scales, writes each token's vectors to its own slot and nothing else; asked to, it also
    gives them back as the pool keeps them (a prefill attends to those)."""
    result = interpreted(STORE, [])
    assert result["untouched_zero"] and result["read_back_equal"]
    assert result["scale_error"] < 1e-6
    assert result["value_error"] == 0


def test_an_fp8_cache_of_small_values_keeps_its_precision():
    """Values whose largest magnitude is ~1e-3 make attention weights times value scales fall
    below float16's normal range: the kernel lifts them (V_LIFT), or such a head's output was
    2% off where a few tokens take most of the weight (bfloat16 queries, an fp8 cache)."""
    scaled = {"values": 1e-3, "queries": 3}
    results = interpreted(CHECK, [[*case, "bfloat16", True, scaled] for case in CASES[:3]])
    for case, result in zip(CASES, results, strict=False):
        assert result["relative"] < 1e-2, (case, result)  # bfloat16 outputs round at 4e-3


SILU_MUL = r"""
import json
import torch
from bulkinfer.engines import fp8_kernels
from bulkinfer.engines.fp8 import quantize_rows

assert fp8_kernels.prepare(torch.device("cpu"))  # the interpreter runs it on the CPU
out = []
g = torch.Generator().manual_seed(0)
for dtype, tokens, n in (("float32", 5, 96), ("float16", 3, 1000), ("float32", 2, 14336), ("float32", 0, 64)):
    x = (torch.randn(tokens, 2 * n, generator=g) * 3).to(getattr(torch, dtype))
    x[:, 1] = 0.0  # a gate of zero: an activation of zero
    x8, scale = fp8_kernels.silu_mul_quantized(x)
    gate, up = x.chunk(2, dim=-1)
    want, want_scale = quantize_rows(torch.nn.functional.silu(gate) * up)
    got, ref = x8.float(), want.float()
    # the interpreter converts to fp8 in numpy: where rounding up carries into the exponent it
    # gives half the power of two, and under e4m3's normal range (2**-6) it truncates (one
    # step, 2**-9, low, up to 2**-6 itself); a GPU converts as torch does (scripts/check_fp8.py)
    carried = (torch.frexp(ref)[0].abs() == 0.5) & (got == ref / 2)
    truncated = (ref.abs() <= 2**-6) & ((got - ref).abs() <= 2**-9) & (got.abs() < ref.abs())
    out.append({
        "shapes": [list(x8.shape), list(scale.shape)] == [[tokens, n], [tokens, 1]],
        "dtypes": [x8.dtype == torch.float8_e4m3fn, scale.dtype == torch.float32],
        "values_off": int(((got != ref) & ~carried & ~truncated).sum()),
        "scale_error": float(((scale - want_scale) / want_scale).abs().max()) if tokens else 0.0,
    })
print(json.dumps(out))
"""


def test_the_fused_silu_and_quantize_kernel_gives_the_torch_code_s_fp8_rows():
    """The fp8 down projection's input in one pass (engines/fp8_kernels.py, on a GPU):
    quantize_rows(silu(gate) * up) for rows of 96 to 14,336 (Llama-3.1-8B's) and none."""
    for result in interpreted(SILU_MUL, []):
        assert result["shapes"] and all(result["dtypes"]), result
        assert result["values_off"] == 0, result
        assert result["scale_error"] < 1e-6, result

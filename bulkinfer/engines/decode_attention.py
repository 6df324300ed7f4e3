"""Decode attention as a Triton kernel: each KV head's keys and values read once per step, by a
program that holds all the query heads sharing them.

Why not FlashAttention's varlen kernel, which the engine uses for prefill and scoring: a decode
step has one query token a row, and FlashAttention computes in tiles of 128 query rows, so with
the grouped query heads folded in (4 of 128 on Llama-3.1-8B) it does ~30x the useful matrix
arithmetic. At 1,024 rows of 500 cached tokens on an H200 that made attention 26.6 ms of a 47.8
ms step, against 15.6 ms to read the 67 GB of keys and values once (scripts/profile_decode.py,
docs/perf.md). Here a program takes one row, one KV head and one split of the row's cached tokens;
its query tile is the group's heads padded to 16 (the smallest tile of the tensor-core
instruction), so the step is bound by reading the cache, as it should be. Splits are combined by
a second small kernel (their outputs weighted by their log-sum-exp); with enough rows to fill the
GPU a row is one split and the first kernel writes the result directly.

An fp8 cache (`model.kv_cache_dtype: fp8`) is read as stored: the products run on its values
converted to float16 (one instruction converts two fp8 values to it; bfloat16 takes several),
each token's key scale applied to its scores and its value scale to its weight (times V_LIFT,
and the output divided by it: a weight under float16's normal range, 6e-5, loses precision, and
a head whose values' largest magnitude is ~1e-3 came out 2% off without it). It reads half
the bytes of a bf16 cache but not at its rate: on an H200 ~3 TB/s against the bf16 cache's 4.3
(scripts/tune_decode_attention.py, docs/perf.md). What bounds it is not placed; not the tile
arithmetic, nor the compiler's byte-by-byte transposition of the fp8 values in shared memory
(values stored transposed read 13% slower in the job, docs/perf.md). Its writes go
through `store_fp8`, one kernel a layer that quantizes keys and values and puts them in their
slots. A row's KV heads are neighbouring programs, so the heads of a token, stored side by
side with their scales, are read together.

Runs where Triton and a CUDA device are present and the head size is a power of two (64 to 256);
anywhere else the engine keeps FlashAttention. With TRITON_INTERPRET=1 the same kernels run on
the CPU (the tests compare them with the reference attention there).
"""

from __future__ import annotations

import functools
import os

import numpy as np
import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # no Triton (CPU-only installs): the engine keeps FlashAttention
    triton = None

# BULKINFER_DECODE_ATTENTION=flash keeps FlashAttention for decode steps (to compare)
KERNEL_ENV = "BULKINFER_DECODE_ATTENTION"
# BULKINFER_DECODE_ORDER=longest starts the programs of the rows with most cached tokens first
# (the GPU starts programs in grid order; a job's rows are uneven, and a long row's programs
# started last finish alone): `longest_first`, measured against slot order on the GPU
ORDER_ENV = "BULKINFER_DECODE_ORDER"
# cached tokens per tile, warps and pipeline stages, by (fp8 cache, 256 rows or more): on an
# H200 an fp8 cache at 1,024 rows of ~410 tokens reads fastest in tiles of 64 tokens with two
# warps and three stages (9.7 against 12.1 ms for 32 layers with four warps and tiles of 128;
# the same at 256 rows); scripts/tune_decode_attention.py --tiles measures the choices
TUNING = {
    (False, False): dict(BLOCK_N=64, num_warps=4, num_stages=2),
    (False, True): dict(BLOCK_N=64, num_warps=4, num_stages=2),
    (True, False): dict(BLOCK_N=64, num_warps=4, num_stages=2),
    (True, True): dict(BLOCK_N=64, num_warps=2, num_stages=3),
}
MIN_SPLIT = 256  # cached tokens a split covers at least
V_LIFT = 256.0  # an fp8 cache: attention weights times value scales, lifted in float16
HEAD_DIMS = (64, 128, 256)


def available(head_dim: int) -> bool:
    """Whether the kernels can run on a CUDA device for this head size (Triton installed and
    not turned off)."""
    if triton is None or os.environ.get(KERNEL_ENV, "triton") == "flash":
        return False
    return head_dim in HEAD_DIMS


def usable(q: torch.Tensor) -> bool:
    """Whether these kernels can run this decode step's attention."""
    if triton is None or os.environ.get(KERNEL_ENV, "triton") == "flash":
        return False
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    return (q.is_cuda or interpreted) and q.shape[-1] in HEAD_DIMS


def decode_attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    starts: torch.Tensor,
    used: torch.Tensor,
    max_len: int,
    scale: float,
    key_scales: torch.Tensor | None = None,
    value_scales: torch.Tensor | None = None,
    order: torch.Tensor | None = None,
) -> torch.Tensor:
    """One query token a row: q [rows, heads, D]; keys/values the pool [tokens, kv_heads, D];
    row r attends to pool slots starts[r] .. starts[r] + used[r] (used[r] <= max_len).
    An fp8 pool comes with its scales ([tokens, kv_heads]): each tile is dequantized as it is
    read. `order` (int32 [rows], a permutation): the rows in the order their programs start.
    Returns [rows, heads, D] in q's dtype."""
    if q.stride(-1) != 1:
        q = q.contiguous()
    rows, heads, dim = q.shape
    kv_heads = keys.shape[1]
    groups = heads // kv_heads
    splits = split_count(rows, kv_heads, max_len, _processors(q.device))
    # the wide fp8 tiles (2 warps) were measured at head size 128; a 256-wide head's tile
    # converted to float16 is ~256 registers a thread in two warps: it keeps four (unmeasured)
    tuning = TUNING[key_scales is not None, rows >= 256 and dim <= 128]
    block_n = tuning["BLOCK_N"]
    split_len = triton.cdiv(triton.cdiv(max_len, splits), block_n) * block_n
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if splits == 1:
        partial, lse = out[:, :, None, :], out.new_empty((1,), dtype=torch.float32)
    else:
        partial = q.new_empty((rows, heads, splits, dim), dtype=torch.float32)
        lse = q.new_empty((rows, heads, splits), dtype=torch.float32)
    fp8 = key_scales is not None
    _split_kernel[(kv_heads, rows, splits)](
        q,
        keys,
        values,
        key_scales if fp8 else keys,
        value_scales if fp8 else values,
        starts,
        used,
        order if order is not None else used,
        partial,
        lse,
        q.stride(0),
        q.stride(1),
        keys.stride(0),
        keys.stride(1),
        values.stride(0),
        values.stride(1),
        key_scales.stride(0) if fp8 else 0,
        partial.stride(0),
        partial.stride(1),
        partial.stride(2),
        scale,
        split_len,
        heads,
        GROUPS=groups,
        BLOCK_H=max(16, triton.next_power_of_2(groups)),
        D=dim,
        WRITE_LSE=splits > 1,
        FP8=fp8,
        ORDERED=order is not None,
        V_LIFT=V_LIFT,
        **tuning,
    )
    if splits > 1:
        _combine_kernel[(rows, heads)](
            partial, lse, out, out.stride(0), out.stride(1), SPLITS=splits, D=dim
        )
    return out


def store_fp8(
    at: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    key_scales: torch.Tensor,
    value_scales: torch.Tensor,
    read_back: bool = False,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Keys and values [n, kv_heads, D] quantized (as `kv.quantize_heads` does: one scale per
    token and head, its largest magnitude at 448) and written to the fp8 pool's slots `at`, in
    one launch: the same in torch is ~10 small kernels a tensor, per layer and decode step.
    `read_back`: also return them as the pool keeps them, dequantized in their dtype (what
    `KVPool.read` of those slots gives), written by the same launch."""
    if k.stride(-1) != 1 or v.stride(-1) != 1:
        k, v = k.contiguous(), v.contiguous()
    n, kv_heads, dim = k.shape
    k_out = torch.empty((n, kv_heads, dim), dtype=k.dtype, device=k.device) if read_back else k
    v_out = torch.empty((n, kv_heads, dim), dtype=v.dtype, device=v.device) if read_back else v
    _store_kernel[(n, kv_heads)](
        at,
        k,
        v,
        keys,
        values,
        key_scales,
        value_scales,
        k_out,
        v_out,
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        keys.stride(0),
        keys.stride(1),
        key_scales.stride(0),
        D=dim,
        READ_BACK=read_back,
        num_warps=1,
    )
    return (k_out, v_out) if read_back else None


def longest_first_asked() -> bool:
    """Whether decode steps start the programs of their longest rows first
    (BULKINFER_DECODE_ORDER=longest; slot order otherwise)."""
    return os.environ.get(ORDER_ENV, "slots") == "longest"


def longest_first(used: np.ndarray) -> np.ndarray:
    """The rows' program order by their cached tokens, longest first (ties in slot order)."""
    return np.argsort(-np.asarray(used), kind="stable").astype(np.int32)


def split_count(rows: int, kv_heads: int, max_len: int, processors: int) -> int:
    """Splits of each row's cached tokens: enough programs for ~4 waves over the GPU's
    processors, no split under MIN_SPLIT tokens, a power of two (the combining kernel's tile)."""
    wanted = triton.cdiv(4 * processors, rows * kv_heads)
    most = max(1, max_len // MIN_SPLIT)
    return triton.next_power_of_2(max(1, min(wanted, most)))


@functools.cache
def _processors(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


if triton is not None:

    @triton.jit
    def _split_kernel(
        Q,
        K,
        V,
        KScale,
        VScale,
        Starts,
        Used,
        Order,
        Out,
        Lse,
        stride_qt,
        stride_qh,
        stride_kt,
        stride_kh,
        stride_vt,
        stride_vh,
        stride_st,
        stride_ot,
        stride_oh,
        stride_os,
        scale,
        split_len,
        all_heads,
        GROUPS: tl.constexpr,
        BLOCK_H: tl.constexpr,
        BLOCK_N: tl.constexpr,
        D: tl.constexpr,
        WRITE_LSE: tl.constexpr,
        FP8: tl.constexpr,
        V_LIFT: tl.constexpr,
        ORDERED: tl.constexpr,
    ):
        # a row's KV heads are neighbouring programs: they read its tokens' keys, values and
        # scales (contiguous across heads) together
        kv_head = tl.program_id(0)
        row = tl.program_id(1)
        if ORDERED:
            row = tl.load(Order + row)
        split = tl.program_id(2)
        start = tl.load(Starts + row).to(tl.int64)
        used = tl.load(Used + row)
        lo = split * split_len
        hi = tl.minimum(used, lo + split_len)

        offs_h = tl.arange(0, BLOCK_H)
        offs_d = tl.arange(0, D)
        offs_n = tl.arange(0, BLOCK_N)
        head_ok = offs_h < GROUPS
        heads = kv_head * GROUPS + offs_h
        q = tl.load(
            Q + row * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
            mask=head_ok[:, None],
            other=0.0,
        )
        if FP8 and q.dtype == tl.bfloat16:  # products in float16: one instruction converts
            # two fp8 values to it, several to bfloat16
            q = tl.minimum(tl.maximum(q.to(tl.float32), -65504.0), 65504.0).to(tl.float16)
        best = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
        total = tl.zeros([BLOCK_H], dtype=tl.float32)
        acc = tl.zeros([BLOCK_H, D], dtype=tl.float32)
        for n0 in range(lo, hi, BLOCK_N):
            n = n0 + offs_n
            token_ok = n < hi
            slot = (start + n)[:, None]
            k = tl.load(
                K + slot * stride_kt + kv_head * stride_kh + offs_d[None, :],
                mask=token_ok[:, None],
                other=0.0,
            )
            if FP8:  # the product with the stored fp8 values, times each token's scale
                k_scale = tl.load(
                    KScale + (start + n) * stride_st + kv_head, mask=token_ok, other=0.0
                )
                s = tl.dot(q, tl.trans(k.to(q.dtype))) * (k_scale[None, :] * scale)
            else:
                s = tl.dot(q, tl.trans(k)) * scale
            s = tl.where(token_ok[None, :], s, float("-inf"))
            new_best = tl.maximum(best, tl.max(s, 1))
            p = tl.exp(s - new_best[:, None])
            alpha = tl.exp(best - new_best)
            total = total * alpha + tl.sum(p, 1)
            v = tl.load(
                V + slot * stride_vt + kv_head * stride_vh + offs_d[None, :],
                mask=token_ok[:, None],
                other=0.0,
            )
            if FP8:  # each token's weight times its value scale, against the fp8 values
                v_scale = tl.load(
                    VScale + (start + n) * stride_st + kv_head, mask=token_ok, other=0.0
                )
                # lifted by V_LIFT: a float16 weight under 6e-5 loses precision (values of
                # a head whose largest magnitude is ~1e-3 lost 2%)
                w = p * (v_scale * V_LIFT)[None, :]
                pv = tl.dot(w.to(q.dtype), v.to(q.dtype))
            else:
                pv = tl.dot(p.to(v.dtype), v)
            acc = acc * alpha[:, None] + pv
            best = new_best

        nonempty = total > 0
        out = acc / tl.where(nonempty, total, 1.0)[:, None]
        if FP8:
            out = out / V_LIFT
        tl.store(
            Out
            + row * stride_ot
            + heads[:, None] * stride_oh
            + split * stride_os
            + offs_d[None, :],
            out,
            mask=head_ok[:, None],
        )
        if WRITE_LSE:
            lse = tl.where(nonempty, best + tl.log(tl.where(nonempty, total, 1.0)), float("-inf"))
            splits = tl.num_programs(2)
            tl.store(
                Lse + (row * all_heads + heads) * splits + split,
                lse,
                mask=head_ok,
            )

    @triton.jit
    def _combine_kernel(
        Partial, Lse, Out, stride_ot, stride_oh, SPLITS: tl.constexpr, D: tl.constexpr
    ):
        row = tl.program_id(0)
        head = tl.program_id(1)
        heads = tl.num_programs(1)
        offs_s = tl.arange(0, SPLITS)
        offs_d = tl.arange(0, D)
        base = (row * heads + head) * SPLITS
        lse = tl.load(Lse + base + offs_s)
        weight = tl.exp(lse - tl.max(lse, 0))
        parts = tl.load(Partial + (base + offs_s)[:, None] * D + offs_d[None, :])
        out = tl.sum(parts * weight[:, None], 0) / tl.sum(weight, 0)
        tl.store(Out + row * stride_ot + head * stride_oh + offs_d, out)

    @triton.jit
    def _store_kernel(
        At,
        K,
        V,
        KPool,
        VPool,
        KScale,
        VScale,
        KOut,
        VOut,
        stride_kt,
        stride_kh,
        stride_vt,
        stride_vh,
        stride_pt,
        stride_ph,
        stride_st,
        D: tl.constexpr,
        READ_BACK: tl.constexpr,
    ):
        token = tl.program_id(0)
        head = tl.program_id(1)
        heads = tl.num_programs(1)
        slot = tl.load(At + token).to(tl.int64)
        out = (token * heads + head) * D  # the read-back outputs: contiguous [n, heads, D]
        _quantize_store(
            K + token * stride_kt + head * stride_kh,
            KPool,
            KScale,
            KOut + out,
            slot,
            head,
            stride_pt,
            stride_ph,
            stride_st,
            D,
            READ_BACK,
        )
        _quantize_store(
            V + token * stride_vt + head * stride_vh,
            VPool,
            VScale,
            VOut + out,
            slot,
            head,
            stride_pt,
            stride_ph,
            stride_st,
            D,
            READ_BACK,
        )

    @triton.jit
    def _quantize_store(
        X,
        Pool,
        Scale,
        Out,
        slot,
        head,
        stride_pt,
        stride_ph,
        stride_st,
        D: tl.constexpr,
        READ_BACK: tl.constexpr,
    ):
        offs_d = tl.arange(0, D)
        x = tl.load(X + offs_d)
        x32 = x.to(tl.float32)
        scale = tl.maximum(tl.max(tl.abs(x32), 0), 1e-12) / 448.0
        q = tl.minimum(tl.maximum(x32 / scale, -448.0), 448.0).to(tl.float8e4nv)
        tl.store(Pool + slot * stride_pt + head * stride_ph + offs_d, q)
        tl.store(Scale + slot * stride_st + head, scale)
        if READ_BACK:  # as KVPool.read dequantizes the stored bytes
            tl.store(Out + offs_d, (q.to(tl.float32) * scale).to(x.dtype))

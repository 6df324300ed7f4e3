"""Attention over packed sequences.

A packed forward runs many sequences as one row of tokens with no padding: positions restart
per sequence and attention stays inside each one (`cu_seqlens`, as in FlashAttention's varlen
API). Decode steps read each row's keys and values from a shared pool (`KVPool`) where every row
owns one contiguous region, so rows of any length share one batch and a finished row's region
is handed to the next prompt. On a CUDA device in bf16/fp16 this is FlashAttention through
`torch.ops.aten._flash_attention_forward`, except decode steps, whose one query token a row
reads the pool through `decode_attention`'s Triton kernel where Triton is present; elsewhere a per-sequence SDPA loop computes the same
function (slow, for the CPU tests and float32 checks).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bulkinfer.engines import decode_attention
from bulkinfer.engines.kv import KVPool


@dataclass
class Packed:
    """What one packed forward is: prefill/score (cu_seqlens over the packed tokens) or a
    decode step (one token per row, attending to the row's region of the pool)."""

    cu_seqlens: torch.Tensor  # int32 [rows + 1]: offsets of the sequences in the packed row
    max_len: int
    scale: float
    pool: KVPool | None = None
    write_index: torch.Tensor | None = None  # int64 [tokens]: pool slot of each token's K/V
    decode: bool = False
    region_start: torch.Tensor | None = None  # int32 [rows + 1]: decode: first pool slot per row
    used: torch.Tensor | None = None  # int32 [rows]: decode: pool slots a row attends to


def attend(layer: int, q, k, v, packed: Packed) -> torch.Tensor:
    """One layer's attention over a packed pass: q [T, heads, D], k/v [T, kv_heads, D] in,
    [T, heads, D] out. With a pool, this pass's keys and values are stored in it first, and a
    decode step then attends to each row's region of the pool."""
    if packed.pool is not None:
        packed.pool.keys[layer].index_copy_(0, packed.write_index, k)
        packed.pool.values[layer].index_copy_(0, packed.write_index, v)
        if packed.decode:
            k, v = packed.pool.keys[layer], packed.pool.values[layer]
    run = _flash if _flash_ok(q) else _reference
    return run(q, k, v, packed)


def _flash_ok(q: torch.Tensor) -> bool:
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] % 8 == 0


def _flash(q, k, v, packed: Packed) -> torch.Tensor:
    if packed.decode and decode_attention.usable(q):
        return decode_attention.decode_attention(
            q, k, v, packed.region_start, packed.used, packed.max_len, packed.scale
        )
    if packed.decode:
        out = torch.ops.aten._flash_attention_forward(
            q,
            k,
            v,
            packed.cu_seqlens,
            packed.region_start,
            1,
            packed.max_len,
            0.0,
            False,
            False,
            scale=packed.scale,
            seqused_k=packed.used,
        )
    else:
        out = torch.ops.aten._flash_attention_forward(
            q,
            k,
            v,
            packed.cu_seqlens,
            packed.cu_seqlens,
            packed.max_len,
            packed.max_len,
            0.0,
            True,
            False,
            scale=packed.scale,
        )
    return out[0]


def _reference(q, k, v, packed: Packed) -> torch.Tensor:
    """The same function one sequence at a time with SDPA: [T, heads, D] in, [T, heads, D] out."""
    groups = q.shape[1] // k.shape[1]
    out = torch.empty_like(q)
    bounds = packed.cu_seqlens.tolist()
    if packed.decode:
        starts, used = packed.region_start.tolist(), packed.used.tolist()
    for i in range(len(bounds) - 1):
        a, b = bounds[i], bounds[i + 1]
        if packed.decode:
            ks = k[starts[i] : starts[i] + used[i]]
            vs = v[starts[i] : starts[i] + used[i]]
        else:
            ks, vs = k[a:b], v[a:b]
        qh, kh, vh = (t.transpose(0, 1)[None] for t in (q[a:b], ks, vs))
        if groups > 1:
            kh, vh = kh.repeat_interleave(groups, 1), vh.repeat_interleave(groups, 1)
        o = F.scaled_dot_product_attention(
            qh, kh, vh, is_causal=not packed.decode, scale=packed.scale
        )
        out[a:b] = o[0].transpose(0, 1)
    return out

"""Attention over packed sequences.

A packed forward runs many sequences as one row of tokens with no padding: positions restart
per sequence and attention stays inside each one (`cu_seqlens`, as in FlashAttention's varlen
API). Decode steps read each row's keys and values from a shared pool (`KVPool`) where every row
owns one contiguous region, so rows of any length share one batch and a finished row's region
is handed to the next prompt. On a CUDA device in bf16/fp16 this is FlashAttention through
`torch.ops.aten._flash_attention_forward`, except decode steps, whose one query token a row
reads the pool through `decode_attention`'s Triton kernel where Triton is present; elsewhere a per-sequence SDPA loop computes the same
function (slow, for the CPU tests and float32 checks). cuDNN's ragged attention
(`aten._cudnn_attention_forward` with cumulative lengths) was measured for prefill on torch 2.11:
it builds a graph at every call, ~65 ms whatever the size (docs/perf.md, 2026-12-07, sixth
session), so FlashAttention stays.
"""

from __future__ import annotations

import dataclasses
import warnings
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
    # a prefill of tokens that follow a prefix already in each row's region (shared prefixes):
    # its queries attend, causally, to the row's region (region_start, used; max_k the most)
    after_prefix: bool = False
    max_k: int = 0
    order: torch.Tensor | None = None  # int32 [rows]: decode: the rows' program order


def attend(layer: int, q, k, v, packed: Packed) -> torch.Tensor:
    """One layer's attention over a packed pass: q [T, heads, D], k/v [T, kv_heads, D] in,
    [T, heads, D] out. With a pool, this pass's keys and values are stored in it first, and a
    decode step then attends to each row's region of the pool."""
    pool = packed.pool
    if pool is not None and pool.fp8 and not (packed.decode or packed.after_prefix):
        # a prefill attends to its keys and values as the pool keeps them, as its later decode
        # steps and a row prefilled after a shared prefix read them: a row's tokens are then
        # the same whichever way it was prefilled, so whatever else was in flight (a resume)
        k, v = pool.store(layer, packed.write_index, k, v, kept=True)
    elif pool is not None:
        pool.store(layer, packed.write_index, k, v)
    if pool is not None and (packed.decode or packed.after_prefix):
        if not pool.fp8:
            k, v = pool.keys[layer], pool.values[layer]
        elif packed.decode and decode_attention.usable(q):
            return decode_attention.decode_attention(
                q,
                pool.keys[layer],
                pool.values[layer],
                packed.region_start,
                packed.used,
                packed.max_len,
                packed.scale,
                pool.key_scales[layer],
                pool.value_scales[layer],
                packed.order,
            )
        else:
            k, v, packed = _dequantized_regions(layer, q, packed)
    run = _flash if _flash_ok(q) and not _reference_only(packed) else _reference
    return run(q, k, v, packed)


def _dequantized_regions(layer: int, q, packed: Packed):
    """The rows' regions of an fp8 pool, one after another in q's dtype, and the pass with
    its rows' regions there (a prefill after a shared prefix; on the CPU, a decode step). Not
    for a captured decode step: it reads the regions' total size on the host."""
    used = packed.used.long()
    ends = torch.cumsum(used, 0)
    total = int(ends[-1]) if len(ends) else 0
    firsts = ends - used
    within = torch.arange(total, device=q.device) - torch.repeat_interleave(firsts, used)
    slots = torch.repeat_interleave(packed.region_start[:-1].long(), used) + within
    k, v = packed.pool.read(layer, slots, q.dtype)
    offsets = torch.cat([firsts, ends[-1:]]).to(torch.int32)
    return k, v, dataclasses.replace(packed, region_start=offsets, pool=None)


def _reference_only(packed: Packed) -> bool:
    """A prefill after a prefix needs FlashAttention's causal mask aligned to the end of each
    row's keys (FlashAttention 2.1 and later); checked once against the reference."""
    return packed.after_prefix and not _flash_aligns_causal_to_the_end()


_ALIGNED: list[bool] = []


def _flash_aligns_causal_to_the_end() -> bool:
    if not _ALIGNED:
        seeded = torch.Generator(device="cuda").manual_seed(0)  # the global seed is left alone
        q, k, v = (
            torch.randn(n, 2, 64, device="cuda", dtype=torch.bfloat16, generator=seeded)
            for n in (3, 8, 8)
        )
        probe = Packed(
            torch.tensor([0, 3], dtype=torch.int32, device="cuda"),
            3,
            0.125,
            after_prefix=True,
            region_start=torch.tensor([0, 8], dtype=torch.int32, device="cuda"),
            used=torch.tensor([8], dtype=torch.int32, device="cuda"),
            max_k=8,
        )
        got = _flash(q, k, v, probe).float()
        want = _reference(q.float(), k.float(), v.float(), probe)
        _ALIGNED.append(bool(torch.allclose(got, want, atol=3e-2)))
        if not _ALIGNED[0]:
            warnings.warn(
                "this FlashAttention does not align its causal mask to the end of the keys: "
                "rows after a shared prefix are prefilled with a slower attention",
                stacklevel=2,
            )
    return _ALIGNED[0]


def _flash_ok(q: torch.Tensor) -> bool:
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] % 8 == 0


def _flash(q, k, v, packed: Packed) -> torch.Tensor:
    if packed.decode and decode_attention.usable(q):
        return decode_attention.decode_attention(
            q,
            k,
            v,
            packed.region_start,
            packed.used,
            packed.max_len,
            packed.scale,
            order=packed.order,
        )
    if packed.decode or packed.after_prefix:
        out = torch.ops.aten._flash_attention_forward(
            q,
            k,
            v,
            packed.cu_seqlens,
            packed.region_start,
            1 if packed.decode else packed.max_len,
            packed.max_len if packed.decode else packed.max_k,
            0.0,
            packed.after_prefix,
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
    from_pool = packed.decode or packed.after_prefix
    if from_pool:
        starts, used = packed.region_start.tolist(), packed.used.tolist()
    for i in range(len(bounds) - 1):
        a, b = bounds[i], bounds[i + 1]
        mask = None
        if from_pool:
            ks = k[starts[i] : starts[i] + used[i]]
            vs = v[starts[i] : starts[i] + used[i]]
            if packed.after_prefix:  # query j sits at key position used - (b - a) + j
                sits = used[i] - (b - a) + torch.arange(b - a, device=q.device)
                mask = torch.arange(used[i], device=q.device)[None, :] <= sits[:, None]
        else:
            ks, vs = k[a:b], v[a:b]
        qh, kh, vh = (t.transpose(0, 1)[None] for t in (q[a:b], ks, vs))
        if groups > 1:
            kh, vh = kh.repeat_interleave(groups, 1), vh.repeat_interleave(groups, 1)
        o = F.scaled_dot_product_attention(
            qh, kh, vh, attn_mask=mask, is_causal=not from_pool, scale=packed.scale
        )
        out[a:b] = o[0].transpose(0, 1)
    return out

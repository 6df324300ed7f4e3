"""Where the fast engine's keys and values live: one preallocated pool, handed out as regions.

Each generating row reserves prompt + max_new slots when it starts and returns them when it
ends, so a row never has to grow (no copy, no page table) and any freed region can take the
next prompt that fits. The scheduler owns the `RegionAllocator` (which slots are whose); the
engine owns the `KVPool` tensors and the `DecodeState` its captured graphs read.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np
import torch

from bulkinfer.engines import decode_attention
from bulkinfer.engines.fp8 import FP8, dequantize_rows, quantize_rows


@dataclass
class KVPool:
    """Keys and values of every row in flight, per layer: [tokens, kv_heads, head_dim]. In fp8
    (`model.kv_cache_dtype: fp8`) each token's head vector is float8_e4m3 with a float32 scale
    ([tokens, kv_heads] per layer: its largest magnitude maps to 448), so the pool holds ~1.9x
    the tokens of a bf16 one and a decode step reads half the bytes."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    key_scales: list[torch.Tensor] | None = None  # fp8 only
    value_scales: list[torch.Tensor] | None = None

    @classmethod
    def allocate(
        cls, layers: int, tokens: int, kv_heads: int, head_dim: int, dtype, device, fp8=False
    ):
        shape = (tokens, kv_heads, head_dim)
        stored = FP8 if fp8 else dtype
        pool = cls(
            [torch.zeros(shape, dtype=stored, device=device) for _ in range(layers)],
            [torch.zeros(shape, dtype=stored, device=device) for _ in range(layers)],
        )
        if fp8:
            pool.key_scales = [
                torch.zeros(shape[:2], dtype=torch.float32, device=device) for _ in range(layers)
            ]
            pool.value_scales = [
                torch.zeros(shape[:2], dtype=torch.float32, device=device) for _ in range(layers)
            ]
        return pool

    @property
    def tokens(self) -> int:
        return self.keys[0].shape[0]

    @property
    def fp8(self) -> bool:
        return self.key_scales is not None

    def store(
        self, layer: int, at: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kept=False
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Write keys and values [n, kv_heads, D] to the slots `at` (quantized in fp8).
        `kept`: also return them as the pool keeps them, in their dtype (what `read` of those
        slots gives: dequantized in fp8, themselves otherwise)."""
        if not self.fp8:
            self.keys[layer].index_copy_(0, at, k)
            self.values[layer].index_copy_(0, at, v)
            return (k, v) if kept else None
        if k.is_cuda and decode_attention.triton is not None:  # one fused kernel
            return decode_attention.store_fp8(
                at,
                k,
                v,
                self.keys[layer],
                self.values[layer],
                self.key_scales[layer],
                self.value_scales[layer],
                read_back=kept,
            )
        back = []
        for tensors, scales, x in (
            (self.keys, self.key_scales, k),
            (self.values, self.value_scales, v),
        ):
            q, scale = quantize_heads(x)
            _bytes(tensors[layer]).index_copy_(0, at, _bytes(q))
            scales[layer].index_copy_(0, at, scale)
            if kept:
                back.append(dequantize_rows(q, scale).to(x.dtype))
        return tuple(back) if kept else None

    def read(self, layer: int, slots: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of `slots` in `dtype` (dequantized from fp8)."""
        k, v = self.keys[layer][slots], self.values[layer][slots]
        if self.fp8:
            k = dequantize_rows(k, self.key_scales[layer][slots]).to(dtype)
            v = dequantize_rows(v, self.value_scales[layer][slots]).to(dtype)
        return k, v

    def copy(self, source: torch.Tensor, target: torch.Tensor) -> None:
        """Every layer's slots `source` copied to the slots `target` (scales too)."""
        groups = [self.keys, self.values]
        if self.fp8:
            groups += [self.key_scales, self.value_scales]
        for tensors in groups:
            for layer in tensors:
                layer = _bytes(layer)
                layer.index_copy_(0, target, layer.index_select(0, source))


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """An fp8 tensor's bytes (index_copy_ has no float8 kernels), any other tensor itself."""
    return t.view(torch.uint8) if t.dtype == FP8 else t


def quantize_heads(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[n, heads, D] as float8_e4m3 and one float32 scale per (token, head)."""
    q, scale = quantize_rows(x)
    return q, scale[..., 0]


class RegionAllocator:
    """First-fit allocation of contiguous regions: free intervals [start, end) of a pool of
    `size` slots, kept sorted and coalesced. Pure Python on a few hundred intervals:
    microseconds per call."""

    def __init__(self, size: int, reserved: int = 0):
        self.size = size
        self.free: list[tuple[int, int]] = [(reserved, size)] if size > reserved else []

    def allocate(self, length: int) -> int | None:
        """Start of a free region of `length` slots, or None when none is that large."""
        for i, (start, end) in enumerate(self.free):
            if end - start >= length:
                if end - start == length:
                    del self.free[i]
                else:
                    self.free[i] = (start + length, end)
                return start
        return None

    def release(self, start: int, length: int) -> None:
        end = start + length
        i = bisect.bisect_left(self.free, (start, end))
        if i < len(self.free) and self.free[i][0] == end:
            end = self.free.pop(i)[1]
        if i > 0 and self.free[i - 1][1] == start:
            start = self.free.pop(i - 1)[0]
            i -= 1
        self.free.insert(i, (start, end))

    @property
    def largest(self) -> int:
        return max((end - start for start, end in self.free), default=0)


@dataclass(frozen=True)
class DecodeInputs:
    """What the scheduler tells the engine of the rows in flight, one entry per row: its last
    token, tokens so far (prompt + generated), its region's start and its sampling key."""

    last_tokens: list[int]
    lengths: list[int]
    starts: list[int]
    keys: list[int]
    generated: list[int]


@dataclass
class DecodeState:
    """Per-slot inputs of a decode step, on the device at fixed addresses (graphs read them)."""

    ids: torch.Tensor
    positions: torch.Tensor
    write: torch.Tensor
    starts: torch.Tensor
    used: torch.Tensor
    keys: torch.Tensor
    steps: torch.Tensor
    query_offsets: torch.Tensor
    order: torch.Tensor | None = None  # int32: the rows' attention program order, or None

    @classmethod
    def allocate(cls, slots: int, device) -> DecodeState:
        def zeros(dtype, n=slots):
            return torch.zeros(n, dtype=dtype, device=device)

        return cls(
            ids=zeros(torch.int64),
            positions=zeros(torch.int64),
            write=zeros(torch.int64),
            starts=zeros(torch.int32, slots + 1),
            used=torch.ones(slots, dtype=torch.int32, device=device),
            keys=zeros(torch.int64),
            steps=zeros(torch.int64),
            query_offsets=torch.arange(slots + 1, dtype=torch.int32, device=device),
            order=zeros(torch.int32) if decode_attention.longest_first_asked() else None,
        )

    def load(self, rows: DecodeInputs, size: int) -> None:
        """Slots 0..len(rows) take these rows' next inputs; the rest up to `size` idle on the
        pool's scratch slot 0."""
        host = np.zeros((7, size), dtype=np.int64)
        host[4, :] = 1  # idle slots attend to the one scratch slot
        n = len(rows.lengths)
        lengths = np.asarray(rows.lengths, dtype=np.int64)
        starts = np.asarray(rows.starts, dtype=np.int64)
        host[0, :n] = rows.last_tokens
        host[1, :n] = lengths - 1
        host[2, :n] = starts + lengths - 1
        host[3, :n] = starts
        host[4, :n] = lengths
        host[5, :n] = rows.keys
        host[6, :n] = rows.generated
        dev = torch.from_numpy(host).to(self.ids.device, non_blocking=False)
        self.ids[:size] = dev[0]
        self.positions[:size] = dev[1]
        self.write[:size] = dev[2]
        self.starts[:size] = dev[3].int()
        self.starts[size] = 0
        self.used[:size] = dev[4].int()
        self.keys[:size] = dev[5]
        self.steps[:size] = dev[6]
        if self.order is not None:  # lengths grow by one a step: the order holds for a chunk
            order = decode_attention.longest_first(host[4])
            self.order[:size] = torch.from_numpy(order).to(self.order.device)

    def advance(self, n: int, tokens: torch.Tensor) -> None:
        """The first n slots feed the tokens just chosen at the next position."""
        self.ids[:n] = tokens
        self.positions[:n] += 1
        self.write[:n] += 1
        self.used[:n] += 1
        self.steps[:n] += 1


def shared_prefix_groups(prompts: list[np.ndarray], share: int) -> list[tuple[list[int], int]]:
    """Groups of prompts (their indices) whose first `share` tokens are identical, two or more,
    and the tokens each group shares (every prompt keeping at least one of its own): what a
    batch of rows can compute once."""
    if share <= 0:
        return []
    by_head: dict[bytes, list[int]] = {}
    for i, prompt in enumerate(prompts):
        if len(prompt) > share:
            by_head.setdefault(np.asarray(prompt[:share]).tobytes(), []).append(i)
    groups = []
    for members in by_head.values():
        if len(members) > 1:
            shared = common_prefix([prompts[i] for i in members])
            if shared >= share:
                groups.append((members, shared))
    return groups


def common_prefix(prompts: list[np.ndarray]) -> int:
    """Tokens every prompt shares with the first, each keeping at least one of its own."""
    shared = min(len(p) for p in prompts) - 1
    first = prompts[0]
    for prompt in prompts[1:]:
        differ = np.flatnonzero(prompt[:shared] != first[:shared])
        if len(differ):
            shared = int(differ[0])
    return shared

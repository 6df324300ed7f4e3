"""The activations of the fp8 down projection, quantized in one pass (Triton, on a GPU).

With `model.quantization: fp8` the down projection's input is `silu(gate) * up`, quantized per
token (`fp8.quantize_rows`) before `torch._scaled_mm`. Compiled by inductor, that is a looped
row reduction that reads the [tokens, 2 x intermediate] gate/up product twice (once for the
row's largest magnitude, once to quantize): on an H200 it took 17 ms of a 16,384-token 8B
prefill forward's 213 (~2.2 TB/s), the largest piece of fp8's work that bf16 does not have
(docs/perf.md). Here one program holds a whole row in registers: it reads gate and up once,
computes the product as the model's dtype would round it, finds the row's scale and writes
the fp8 row and its scale.

A `torch.library.triton_op`, so the compiled layer functions trace through it, registered by
`prepare` where an fp8 decoder is built on a GPU. Rows up to MAX_WIDTH wide (every released
model's intermediate size so far); wider rows, the CPU and installs without Triton keep the
torch code. With TRITON_INTERPRET=1 the kernel runs on the CPU (the tests compare it with the
torch code there).
"""

from __future__ import annotations

import os

import torch

from bulkinfer.engines.fp8 import FP8
from bulkinfer.errors import first_line
from bulkinfer.observe.progress import log

MAX_WIDTH = 32768  # a row in registers: 32 values a thread in 32 warps
_registered = False  # prepare() registered the op: the compiled layer functions may call it


def prepare(device: torch.device) -> bool:
    """Register the kernel's op where it will run (a CUDA device, or Triton's interpreter):
    once, where an fp8 decoder is built, outside the compiled functions. Importing Triton and
    torch's `triton_op` imports inductor (~1 s), which a job on the CPU never needs. Returns
    whether the op is there."""
    global _registered
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if not _registered and (device.type == "cuda" or interpreted):
        try:
            _register()
        except ImportError:  # no Triton, or a torch without triton_op: the torch code runs
            return False
        except Exception as exc:  # noqa: BLE001 (a Triton or torch this was not written for)
            log(f"engine: fp8 activations quantized by the torch code ({first_line(exc)})")
            return False
        _registered = True
    return _registered


def fused(gate_up: torch.Tensor) -> bool:
    """Whether `silu_mul_quantized` runs this product's activations."""
    if not _registered:
        return False
    return gate_up.is_cuda and gate_up.dim() == 2 and gate_up.shape[-1] // 2 <= MAX_WIDTH


def silu_mul_quantized(gate_up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`fp8.quantize_rows(silu(gate) * up)` for gate_up [tokens, 2n] (gate then up): the fp8
    rows [tokens, n] and their float32 scales [tokens, 1] (after `prepare`)."""
    return torch.ops.bulkinfer.silu_mul_fp8(gate_up)


def _register() -> None:
    import triton
    import triton.language as tl
    from torch.library import triton_op, wrap_triton

    @triton.jit
    def silu_mul_fp8_kernel(X, Out, Scale, stride_x, stride_o, n, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        ok = offs < n
        gate = tl.load(X + row * stride_x + offs, mask=ok, other=0.0)
        up = tl.load(X + row * stride_x + n + offs, mask=ok, other=0.0)
        # as the model's dtype rounds it: silu in float32, then the product of two such values
        g = gate.to(tl.float32)
        activated = (g / (1.0 + tl.exp(-g))).to(gate.dtype)
        h = (activated.to(tl.float32) * up.to(tl.float32)).to(gate.dtype).to(tl.float32)
        scale = tl.maximum(tl.max(tl.abs(h), 0), 1e-12) / 448.0  # FP8_MAX
        q = tl.minimum(tl.maximum(h / scale, -448.0), 448.0)
        tl.store(Out + row * stride_o + offs, q.to(tl.float8e4nv), mask=ok)
        tl.store(Scale + row, scale)

    @triton_op("bulkinfer::silu_mul_fp8", mutates_args={})
    def silu_mul_fp8(gate_up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # the width is the model's, fixed: a compiled caller gets it as a constant (the
        # kernel's tile is sized by it); only the token count varies
        tokens, n = gate_up.shape[0], int(gate_up.shape[1]) // 2
        if gate_up.stride(-1) != 1:
            gate_up = gate_up.contiguous()
        out = torch.empty((tokens, n), dtype=FP8, device=gate_up.device)
        scale = torch.empty((tokens, 1), dtype=torch.float32, device=gate_up.device)
        block = triton.next_power_of_2(n)
        if tokens > 0:
            wrap_triton(silu_mul_fp8_kernel)[(tokens,)](
                gate_up,
                out,
                scale,
                gate_up.stride(0),
                out.stride(0),
                n,
                BLOCK=block,
                num_warps=max(4, min(32, block // 1024)),
            )
        return out, scale

"""fp8 weights for the fast engine (`model.quantization: fp8`).

Each linear weight of the decoder layers (q/k/v, o, gate/up, down) is kept as float8_e4m3 with
one float32 scale per output channel (the row's largest magnitude maps to 448, e4m3's largest
finite value); each matrix product quantizes its activations per token the same way, on the
fly, and multiplies the two in fp8: `torch._scaled_mm` with row-wise scales on a GPU that has
fp8 matrix units (compute capability 8.9 or later: Ada, Hopper), where it runs at about twice
the bf16 rate and reads half the bytes. Elsewhere (the CPU tests) the same quantized operands
are multiplied after dequantizing them in float32: the same rounding of weights and
activations, summed in another order. The embeddings, norms and LM head stay in the model's
dtype.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn
MIN_CAPABILITY = (8, 9)  # CUDA compute capability with fp8 matrix products


class Fp8Weight(NamedTuple):
    """A linear weight [out, in] as float8_e4m3 and its per-output-channel float32 scale: the
    weight is `weight.float() * scale[:, None]`."""

    weight: torch.Tensor
    scale: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        return self.weight.shape


def quantize_weight(weight: torch.Tensor, rows_at_once: int = 4096) -> Fp8Weight:
    """One scale per output row (its largest magnitude maps to FP8_MAX); a block of rows at a
    time, so quantizing a 70B layer's matrices needs little memory beyond the result."""
    out = torch.empty(weight.shape, dtype=FP8, device=weight.device)
    scale = torch.empty(weight.shape[0], dtype=torch.float32, device=weight.device)
    for start in range(0, weight.shape[0], rows_at_once):
        rows, s = quantize_rows(weight[start : start + rows_at_once])
        out[start : start + rows_at_once], scale[start : start + rows_at_once] = rows, s[:, 0]
    return Fp8Weight(out, scale)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., n] as float8_e4m3 with one float32 scale per vector of the last dimension
    ([..., 1]): activations per token, weights per output channel, keys and values per head."""
    h = x.float()
    scale = h.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / FP8_MAX
    return (h / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32 values of fp8 vectors [..., n] and their scales [...] (one a vector, as stored:
    a weight's per output channel, the KV cache's per token and head)."""
    return q.float() * scale[..., None]


def linear(x: torch.Tensor, weight, bias: torch.Tensor | None) -> torch.Tensor:
    """`F.linear` for a weight kept in the model's dtype or as an `Fp8Weight`."""
    if not isinstance(weight, Fp8Weight):
        return F.linear(x, weight, bias)
    shape = x.shape
    x8, x_scale = quantize_rows(x.reshape(-1, shape[-1]))
    out = quantized_linear(x8, x_scale, weight, bias, x.dtype)
    return out.reshape(*shape[:-1], weight.shape[0])


def quantized_linear(
    x8: torch.Tensor, x_scale: torch.Tensor, weight: Fp8Weight, bias, dtype: torch.dtype
) -> torch.Tensor:
    """The product of activations already quantized per token (fp8 [tokens, in] and float32
    [tokens, 1], as `quantize_rows` gives them) and an fp8 weight, in `dtype`."""
    if x8.is_cuda and fits_scaled_mm(weight.shape):  # row-wise scales want a bf16 result
        out = torch._scaled_mm(
            x8,
            weight.weight.t(),
            scale_a=x_scale,
            scale_b=weight.scale[None, :],
            out_dtype=torch.bfloat16,
        ).to(dtype)
    else:  # the same quantized operands, multiplied in float32 (the CPU; odd sizes)
        w = dequantize_rows(weight.weight, weight.scale)
        out = F.linear(x8.float() * x_scale, w).to(dtype)
    if bias is not None:
        out = out + bias
    return out


def fits_scaled_mm(shape) -> bool:
    """Whether `torch._scaled_mm` takes a weight of this [out, in] shape: both sides must be
    multiples of 16 (every released model's are; a tiny test model's may not be, and its
    products then run dequantized)."""
    return shape[0] % 16 == 0 and shape[1] % 16 == 0


def _scaled_mm_fails(device: torch.device) -> str | None:
    """Why a small row-wise scaled product fails on this GPU, or None (row-wise scales came to
    Ada GPUs in later torch releases than to Hopper). The probe waits for its own stream only:
    the weights' read-ahead may still be copying onto the device (a device-wide wait would sit
    out the rest of that copy)."""
    try:
        stream = torch.cuda.Stream(device)
        with torch.cuda.stream(stream):
            x8, x_scale = quantize_rows(torch.ones(16, 32, device=device))
            w = quantize_weight(torch.ones(16, 32, device=device))
            torch._scaled_mm(
                x8, w.weight.t(), scale_a=x_scale, scale_b=w.scale[None], out_dtype=torch.bfloat16
            )
        stream.synchronize()
    except (RuntimeError, NotImplementedError) as exc:
        return str(exc).strip().splitlines()[0][:200] or type(exc).__name__
    return None


def fp8_unsupported(device: torch.device, keys: str, config) -> str | None:
    """Why this device cannot run what `keys` (the spec keys asking for fp8) ask, or None (the
    CPU emulates fp8 products and reads an fp8 KV cache dequantized)."""
    if device.type != "cuda":
        return None
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        name = torch.cuda.get_device_name(device)
        return (
            f"{keys}: fp8 needs a GPU with fp8 units (compute capability 8.9 or later: Ada, "
            f"Hopper); {name} has {capability[0]}.{capability[1]}"
        )
    if "quantization" in keys:
        if not hasattr(torch, "_scaled_mm"):
            return f"{keys}: fp8 needs torch._scaled_mm (torch {torch.__version__})"
        failed = _scaled_mm_fails(device)
        if failed:
            return (
                f"{keys}: torch {torch.__version__} cannot multiply fp8 with row-wise scales "
                f"on {torch.cuda.get_device_name(device)} ({failed})"
            )
    if "kv_cache_dtype" in keys:
        from bulkinfer.configs import text_config
        from bulkinfer.engines import decode_attention

        text = text_config(config)
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        if not decode_attention.available(head_dim):
            return (
                f"{keys}: an fp8 KV cache is read by the Triton decode kernel, which needs "
                f"Triton and a head size of {', '.join(map(str, decode_attention.HEAD_DIMS))} "
                f"(this model's: {head_dim}; {decode_attention.KERNEL_ENV}=flash turns it off)"
            )
    return None


class Fp8Linear(torch.nn.Module):
    """A model's linear layer with its weight in fp8 (an `Fp8Weight`), so transformers' own
    forward (the reference path: choices, a fallback) runs on the same quantized weights as
    the fast engine's written-out forward."""

    def __init__(self, weight: Fp8Weight, bias: torch.Tensor | None):
        super().__init__()
        self.register_buffer("weight", weight.weight)
        self.register_buffer("weight_scale", weight.scale)
        self.register_buffer("bias", bias)
        self.in_features, self.out_features = weight.weight.shape[1], weight.weight.shape[0]

    @property
    def fp8(self) -> Fp8Weight:
        return Fp8Weight(self.weight, self.weight_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.fp8, self.bias)


def merge_fp8(*linears: Fp8Linear) -> tuple[Fp8Weight, torch.Tensor | None]:
    """One fp8 weight (and bias) for fp8 linears that read the same input, their buffers
    turned into views of it (as `decoder.merge_linears` does for weights in the model's
    dtype, so memory is not doubled)."""
    weight = torch.cat([m.weight.view(torch.uint8) for m in linears]).view(FP8)
    scale = torch.cat([m.weight_scale for m in linears])
    bias = None
    given = [m.bias for m in linears if m.bias is not None]
    if given:  # a linear without one adds zeros in the others' dtype (not its scale's float32)
        bias = torch.cat(
            [m.bias if m.bias is not None else given[0].new_zeros(m.out_features) for m in linears]
        )
    start = 0
    for m in linears:
        end = start + m.out_features
        m.weight, m.weight_scale = weight[start:end], scale[start:end]
        if m.bias is not None:
            m.bias = bias[start:end]
        start = end
    return Fp8Weight(weight, scale), bias

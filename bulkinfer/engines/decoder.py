"""The decoder stack of the fast engine, written out over a llama-family model's own weights.

Why not the model's own forward: transformers runs every RMSNorm, rotary embedding, activation
and residual add as several small kernels, about 50 a layer, and at decode sizes those cost
~3 ms a step whatever the batch (measured on an H100, docs/perf.md). Written out as gpt-fast
does, the work between the matrix products and attention is two functions a layer (before and
after attention) plus the final norm and the scoring head, and on a GPU torch.compile fuses
each into a few kernels. The functions take the token count as a dynamic size, so one
compilation serves every batch; attention stays outside them (the caller's `attend`), so the
compiled code never touches the KV pool. On the CPU they run eagerly and compute exactly what
transformers computes (the tests compare the two).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from bulkinfer.configs import text_config
from bulkinfer.engines import fp8, fp8_kernels
from bulkinfer.engines.compiling import Compiled
from bulkinfer.errors import first_line
from bulkinfer.observe.progress import log

Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class LayerWeights(NamedTuple):
    """One decoder layer's tensors; q/k/v and gate/up each as one matrix (see `merge_linears`).
    Biases and the per-head q/k norms may be absent."""

    input_norm: torch.Tensor
    qkv: torch.Tensor | fp8.Fp8Weight  # the four matrices: fp8 with model.quantization: fp8
    qkv_bias: torch.Tensor | None
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    o: torch.Tensor | fp8.Fp8Weight
    o_bias: torch.Tensor | None
    post_norm: torch.Tensor
    gate_up: torch.Tensor | fp8.Fp8Weight
    gate_up_bias: torch.Tensor | None
    down: torch.Tensor | fp8.Fp8Weight
    down_bias: torch.Tensor | None

    @classmethod
    def of(cls, layer) -> LayerWeights:
        attn, mlp = layer.self_attn, layer.mlp
        qkv, qkv_bias = _merged(attn.q_proj, attn.k_proj, attn.v_proj)
        gate_up, gate_up_bias = _merged(mlp.gate_proj, mlp.up_proj)
        q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
        return cls(
            layer.input_layernorm.weight,
            qkv,
            qkv_bias,
            q_norm.weight if q_norm is not None else None,
            k_norm.weight if k_norm is not None else None,
            _weight(attn.o_proj),
            attn.o_proj.bias,
            layer.post_attention_layernorm.weight,
            gate_up,
            gate_up_bias,
            _weight(mlp.down_proj),
            mlp.down_proj.bias,
        )


def _merged(*linears) -> tuple:
    """merge_linears, or fp8.merge_fp8 for the fp8 linears of model.quantization: fp8 (which
    engines/fp8_loading.py puts in place as it loads the weights)."""
    if isinstance(linears[0], fp8.Fp8Linear):
        return fp8.merge_fp8(*linears)
    return merge_linears(*linears)


def _weight(linear) -> torch.Tensor | fp8.Fp8Weight:
    return linear.fp8 if isinstance(linear, fp8.Fp8Linear) else linear.weight


def merge_linears(*linears: torch.nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One weight (and bias) for linears that read the same input, so they run as one matrix
    product: fewer, larger kernels, which is what a small decode batch is short of. The modules
    are given views into the merged tensor, so memory is not doubled and transformers' own
    forward (the reference path) still runs on them. Merging twice reuses the first merge."""
    merged = _merged_base(m.weight for m in linears)
    if merged is not None:
        return merged, _merged_base(m.bias for m in linears)
    weight = torch.cat([m.weight.detach() for m in linears])
    biases = [m.bias for m in linears]
    bias = None
    if any(b is not None for b in biases):
        bias = torch.cat(
            [
                b.detach() if b is not None else weight.new_zeros(m.out_features)
                for m, b in zip(linears, biases, strict=True)
            ]
        )
    start = 0
    for m in linears:
        end = start + m.out_features
        m.weight = torch.nn.Parameter(weight[start:end], requires_grad=False)
        if m.bias is not None:
            m.bias = torch.nn.Parameter(bias[start:end], requires_grad=False)
        start = end
    return weight, bias


def _merged_base(tensors) -> torch.Tensor | None:
    """One tensor over these when they lie back to back in one storage (as `merge_linears`
    leaves them), else None."""
    tensors = list(tensors)
    if any(t is None or not t.is_contiguous() for t in tensors):
        return None
    first = tensors[0]
    offset = first.storage_offset()
    for t in tensors:
        same = t.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
        if not same or t.storage_offset() != offset:
            return None
        offset += t.numel()
    rows = sum(t.shape[0] for t in tensors)
    return first.detach().as_strided((rows, *first.shape[1:]), first.stride())


@dataclass(frozen=True)
class DecoderShape:
    heads: int
    kv_heads: int
    head_dim: int
    eps: float
    activation: str


def decoder_blocker(model) -> str | None:
    """Why the written-out forward cannot run this model, or None: every layer must be the
    llama pattern (pre-norm attention with q/k/v/o projections, gated MLP, RMSNorm)."""
    base = model.base_model
    needed = ("embed_tokens", "layers", "norm", "rotary_emb")
    missing = [name for name in needed if not hasattr(base, name)]
    if missing:
        return f"the model has no {', '.join(missing)}"
    for layer in base.layers:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        parts = [
            (attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
            (mlp, ("gate_proj", "up_proj", "down_proj")),
            (layer, ("input_layernorm", "post_attention_layernorm")),
        ]
        if any(
            owner is None or not all(hasattr(owner, p) for p in names) for owner, names in parts
        ):
            return "a layer is not the llama pattern (q/k/v/o projections, gated MLP, two norms)"
        linears = [getattr(attn, p) for p in parts[0][1]] + [getattr(mlp, p) for p in parts[1][1]]
        if any(type(m) not in (torch.nn.Linear, fp8.Fp8Linear) for m in linears):
            return "a projection is not a plain torch Linear (a quantized layer?)"
    norms = [m for m in base.modules() if type(m).__name__.endswith("RMSNorm")]
    if not norms or any(not hasattr(m, "variance_epsilon") for m in norms):
        return "the model's norms are not RMSNorm"
    if len({m.variance_epsilon for m in norms}) != 1:
        return "the model's norms differ in epsilon"
    return None


class Decoder:
    """Hidden states of a packed row of tokens: embed, the layers, the final norm."""

    def __init__(self, model, backend=None):
        """`backend`: torch.compile's backend for the non-attention work ("inductor" fuses it
        into a few kernels a layer), or None to run it eagerly."""
        base = model.base_model
        config = text_config(model.config)
        attn = base.layers[0].self_attn
        self.embed = base.embed_tokens
        self.rotary = base.rotary_emb
        self.final_norm = base.norm.weight
        self.layers = [LayerWeights.of(layer) for layer in base.layers]
        self.scaling = float(attn.scaling)
        shape = DecoderShape(
            heads=config.num_attention_heads,
            kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
            head_dim=attn.head_dim,
            eps=float(base.norm.variance_epsilon),
            activation=config.hidden_act,
        )
        self.before_attention, self.after_attention, self.norm = layer_steps(shape)
        if any(isinstance(w.down, fp8.Fp8Weight) for w in self.layers):
            fp8_kernels.prepare(self.final_norm.device)  # before any compiled call
        self.head_logprobs = target_logprobs
        self.compiled = backend is not None
        self.fell_back = False  # a compilation failed and its function runs eagerly
        if backend is not None:
            self.before_attention = Compiled(self.before_attention, backend, self._unfused)
            self.after_attention = Compiled(self.after_attention, backend, self._unfused)
            self.norm = Compiled(self.norm, backend, self._unfused)
            self.head_logprobs = Compiled(target_logprobs, backend, self._unfused)

    def hidden(self, ids: torch.Tensor, positions: torch.Tensor, attend: Attend) -> torch.Tensor:
        """Final hidden states [tokens, dim]; `attend(layer, q, k, v)` is the attention of a
        packed pass ([tokens, heads, head_dim] in and out), which also stores keys and values."""
        x = self.embed(ids)
        cos, sin = self.rotary(x[None], positions[None])
        cos, sin = cos[0], sin[0]
        for i, weights in enumerate(self.layers):
            self._mark_tokens_dynamic(x, cos, sin)
            q, k, v = self.before_attention(x, cos, sin, weights)
            out = attend(i, q, k, v)
            self._mark_tokens_dynamic(x, out)
            x = self.after_attention(x, out, weights)
        self._mark_tokens_dynamic(x)
        return self.norm(x, self.final_norm)

    def target_logprobs(self, hidden, head: torch.Tensor, head_bias, targets) -> torch.Tensor:
        """log p(target) of each hidden state under the LM head (see `target_logprobs`)."""
        self._mark_tokens_dynamic(hidden, targets)
        return self.head_logprobs(hidden, head, head_bias, targets)

    def _unfused(self, exc: Exception) -> None:
        if not self.fell_back:
            self.fell_back = True
            log(f"engine: compiling the fused forward failed ({first_line(exc)}); runs unfused")

    def _mark_tokens_dynamic(self, *tensors: torch.Tensor) -> None:
        """The token count is the one size that varies: compile for any, not per batch."""
        if self.compiled:
            for t in tensors:
                torch._dynamo.maybe_mark_dynamic(t, 0)


def layer_steps(shape: DecoderShape):
    """The three functions of a layer's non-attention work, closed over the model's shape (so a
    compiled one serves every layer: the weights are arguments)."""
    from transformers.activations import ACT2FN

    act = ACT2FN[shape.activation]
    silu = shape.activation in ("silu", "swish")
    heads, kv_heads, head_dim, eps = shape.heads, shape.kv_heads, shape.head_dim, shape.eps

    q_size, kv_size = heads * head_dim, kv_heads * head_dim

    def before_attention(x, cos, sin, w: LayerWeights):
        h = rms_norm(x, w.input_norm, eps)
        tokens = x.shape[0]
        q, k, v = fp8.linear(h, w.qkv, w.qkv_bias).split([q_size, kv_size, kv_size], dim=-1)
        q = q.reshape(tokens, heads, head_dim)
        k = k.reshape(tokens, kv_heads, head_dim)
        v = v.reshape(tokens, kv_heads, head_dim)
        if w.q_norm is not None:
            q = rms_norm(q, w.q_norm, eps)
        if w.k_norm is not None:
            k = rms_norm(k, w.k_norm, eps)
        cos, sin = cos[:, None, :], sin[:, None, :]
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        return q, k, v.contiguous()

    def after_attention(x, attention, w: LayerWeights):
        x = x + fp8.linear(attention.reshape(x.shape[0], -1), w.o, w.o_bias)
        h = rms_norm(x, w.post_norm, eps)
        gate_up = fp8.linear(h, w.gate_up, w.gate_up_bias)
        if silu and isinstance(w.down, fp8.Fp8Weight) and fp8_kernels.fused(gate_up):
            # the down projection's fp8 input in one pass over gate and up (fp8_kernels.py)
            x8, scale = fp8_kernels.silu_mul_quantized(gate_up)
            return x + fp8.quantized_linear(x8, scale, w.down, w.down_bias, x.dtype)
        gate, up = gate_up.chunk(2, dim=-1)
        return x + fp8.linear(act(gate) * up, w.down, w.down_bias)

    def norm(x, weight):
        return rms_norm(x, weight, eps)

    return before_attention, after_attention, norm


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm, operation for operation (float32 inside, weight after)."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def target_logprobs(hidden, head: torch.Tensor, head_bias, targets: torch.Tensor):
    """log p(target) from hidden states and the LM head: the target's logit minus the float32
    logsumexp of its row, so no float32 [tokens x vocab] tensor is written (compiled, the
    upcast and the reduction are one pass over the logits)."""
    logits = F.linear(hidden, head, head_bias)
    chosen = logits.gather(-1, targets[:, None]).squeeze(-1).float()
    return chosen - torch.logsumexp(logits.float(), dim=-1)

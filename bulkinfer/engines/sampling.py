"""Next-token choice: greedy, or sampling whose randomness is keyed by (seed, row, step).

Sampling uses the Gumbel-max trick with noise from a counter-based hash instead of a stateful
generator, so a row draws the same tokens whether it runs alone, in any batch, on a resumed run
or in another shard: the result depends on the row, never on its neighbours.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from bulkinfer.engines.base import GREEDY_BELOW
from bulkinfer.engines.compiling import Compiled, compile_backend
from bulkinfer.errors import ModelError, first_line
from bulkinfer.observe.progress import log

_MASK64 = (1 << 64) - 1
NAN_TOKEN = -1  # what a row whose next-token scores are NaN gets back instead of a token


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # benchmarks: decode to max_new_tokens whatever the model says
    grammar: str | None = None  # llguidance grammar the output keeps to (engines/constraints.py)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def choice(self) -> tuple:
        """What the choice of a token depends on (rows equal in it can share one setting)."""
        return (0.0,) if self.greedy else (self.temperature, self.top_p, self.top_k)


def top_alternatives(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The `k` most likely next tokens of each row and their log-probs under the model's own
    distribution (before temperature or top-p), most likely first: (log-probs, token ids)."""
    return logits.log_softmax(-1).topk(k, dim=-1)


def row_key(seed: int, row: int, sample: int = 0) -> int:
    """A 63-bit key for one row's random stream (splitmix64 of seed, row and sample index)."""
    z = (
        seed * 0x9E3779B97F4A7C15 + row * 0xBF58476D1CE4E5B9 + sample * 0x94D049BB133111EB
    ) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1


def _signed(c: int) -> int:
    return c - (1 << 64) if c >= 1 << 63 else c


STEP_KEY = _signed(0x9E3779B97F4A7C15)  # keys advance by this per step (see keyed_uniform)
_SHIFTS = (30, 27, 31, 11)


@functools.cache
def hash_constants(device: torch.device) -> torch.Tensor:
    """The noise hash's 64-bit multipliers and shift masks, as a tensor. Compiled code reads them
    as inputs, not literals: inductor's CPU code generation mis-handles such int64 literals
    (wrong products, heap corruption; seen with torch 2.13). Made once per device: a copy to
    the GPU at every step would wait for the step before it."""
    masks = [(1 << (64 - k)) - 1 for k in _SHIFTS]
    values = [STEP_KEY, _signed(0xBF58476D1CE4E5B9), _signed(0x94D049BB133111EB), *masks]
    return torch.tensor(values, dtype=torch.int64, device=device)


def keyed_uniform(
    keys: torch.Tensor, step: int, vocab: int, constants: torch.Tensor | None = None
) -> torch.Tensor:
    """Uniform (0, 1) noise of shape [rows, vocab], a pure function of (key, step, column).
    Step s of a key draws what step 0 of key + s x constants[0] draws (int64 wraps)."""
    c = hash_constants(keys.device) if constants is None else constants
    step_term, c2, c3, m30, m27, m31, m11 = c.unbind()
    columns = torch.arange(vocab, device=keys.device, dtype=torch.int64)
    z = keys[:, None] + step_term * (step + 1) + columns[None, :] * c3
    z = (z ^ ((z >> 30) & m30)) * c2  # `>> k & mask`: a logical shift (torch's >> is arithmetic)
    z = (z ^ ((z >> 27) & m27)) * c3
    z = z ^ ((z >> 31) & m31)
    return (((z >> 11) & m11).double() + 0.5) / float(1 << 53)


@dataclass(frozen=True)
class RowSampling:
    """Sampling settings that differ per row (an OpenAI batch file sets them per request), as
    tensors of shape [rows]; a row with temperature 0 (under GREEDY_BELOW) is greedy."""

    temperature: torch.Tensor
    top_p: torch.Tensor
    top_k: torch.Tensor

    @classmethod
    def of(cls, params: list[SamplingParams], device: torch.device) -> RowSampling:
        return cls(
            torch.tensor([p.temperature for p in params], dtype=torch.float32, device=device),
            torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device),
            torch.tensor([p.top_k for p in params], dtype=torch.int64, device=device),
        )


def choose_next_tokens(
    logits: torch.Tensor, params: SamplingParams | RowSampling, keys: torch.Tensor, step: int
) -> torch.Tensor:
    """One token per row from float32 logits [rows, vocab]."""
    if isinstance(params, RowSampling):
        return _choose_per_row(logits, params, keys, step)
    if params.greedy:
        return logits.argmax(-1)
    scores = logits / params.temperature
    if params.top_k > 0 and params.top_k < scores.shape[-1]:
        kth = torch.topk(scores, params.top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        scores = _top_p_filter(scores, torch.full_like(scores[:, :1], params.top_p))
    return _gumbel_argmax(scores, keys, step)


def nan_rows(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Rows whose scores hold a NaN: argmax (greedy, and the sampler's over noisy scores)
    takes a NaN for the largest value, so the chosen token's score tells, one value a row,
    where weights or kernels gave non-numbers."""
    return logits.gather(-1, tokens[:, None])[:, 0].isnan()


def flag_nan(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """`tokens` with NAN_TOKEN for the rows whose scores hold a NaN."""
    return torch.where(nan_rows(logits, tokens), NAN_TOKEN, tokens)


def nan_error(row, made: int) -> ModelError:
    """The job stops rather than write a NaN row's output as an empty or garbage answer."""
    return ModelError(
        f"the model's next-token scores for row {row} are NaN (after {made} generated "
        "tokens): its weights or this engine's arithmetic give non-numbers; nothing was "
        "written for the rows in flight. Check the weights; compare with model.engine: "
        "reference, without model.quantization / model.kv_cache_dtype, or model.dtype: "
        "float32"
    )


def _choose_per_row(
    logits: torch.Tensor, params: RowSampling, keys: torch.Tensor, step: int
) -> torch.Tensor:
    """The same choice as with one SamplingParams per row, vectorised over the batch: each row's
    filters and noise depend on that row alone, so its tokens do not depend on its neighbours."""
    greedy = params.temperature < GREEDY_BELOW
    if bool(greedy.all()):
        return logits.argmax(-1)
    scores = logits / torch.where(greedy, 1.0, params.temperature)[:, None]
    vocab = scores.shape[-1]
    k = torch.where((params.top_k > 0) & (params.top_k < vocab), params.top_k, vocab)
    if bool((k < vocab).any()):
        best = scores.topk(int(k[k < vocab].max()), dim=-1).values
        kth = best.gather(-1, (k.clamp(max=best.shape[-1]) - 1)[:, None])
        scores = scores.masked_fill((scores < kth) & (k < vocab)[:, None], float("-inf"))
    if bool((params.top_p < 1.0).any()):
        scores = _top_p_filter(scores, params.top_p[:, None])
    sampled = _gumbel_argmax(scores, keys, step)
    return torch.where(greedy, logits.argmax(-1), sampled)


def _gumbel_argmax(scores: torch.Tensor, keys: torch.Tensor, step: int) -> torch.Tensor:
    """Gumbel-max over scores: argmax(scores + g) draws from softmax(scores). Step s of a key is
    step 0 of key + s x the step constant (see keyed_uniform), so one function of (scores, keys)
    serves every step and compiles once."""
    constants = hash_constants(scores.device)
    if step:
        keys = keys + constants[0] * step
    return _noise_argmax_for(scores.device)(scores, keys, constants)


def gumbel_argmax(scores: torch.Tensor, keys: torch.Tensor, constants: torch.Tensor):
    """argmax over the vocabulary of scores + Gumbel noise keyed by (key, column), in float64.
    Eagerly that is some twenty passes over [rows x vocab] int64 and float64 tensors; compiled
    on a GPU it is one."""
    uniform = keyed_uniform(keys, 0, scores.shape[-1], constants)
    return (scores.double() - torch.log(-torch.log(uniform))).argmax(-1)


_compiled_argmax: dict[str, Compiled] = {}


def _noise_argmax_for(device: torch.device):
    backend = compile_backend(device)
    if backend is None:
        return gumbel_argmax
    if backend not in _compiled_argmax:
        _compiled_argmax[backend] = Compiled(gumbel_argmax, backend, _sampler_unfused)
    compiled = _compiled_argmax[backend]

    def run(scores: torch.Tensor, keys: torch.Tensor, constants: torch.Tensor) -> torch.Tensor:
        torch._dynamo.maybe_mark_dynamic(scores, 0)  # the rows vary; compile once for any
        torch._dynamo.maybe_mark_dynamic(keys, 0)
        return compiled(scores, keys, constants)

    return run


def _sampler_unfused(exc: Exception) -> None:
    log(f"engine: compiling the sampler failed ({first_line(exc)}); sampling unfused")


# top-p looks for the nucleus among this many best tokens (a top-k, not a sort of the whole
# vocabulary); a row whose nucleus is wider than that is sorted whole
TOP_P_CANDIDATES = 1024


def _top_p_filter(scores: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability reaches top_p (at least one); `top_p`
    is [rows, 1], and a row at 1.0 keeps everything."""
    log_total = scores.logsumexp(-1, keepdim=True)
    best, order = scores.topk(min(TOP_P_CANDIDATES, scores.shape[-1]), dim=-1)
    kept, reached = _nucleus(best, log_total, top_p)
    keep = torch.zeros_like(scores, dtype=torch.bool).scatter(-1, order, kept)
    filtered = torch.where(keep | (top_p >= 1.0), scores, float("-inf"))
    wide = ((reached < top_p) & (top_p < 1.0)).squeeze(-1)
    if bool(wide.any()):
        rows = wide.nonzero().squeeze(-1)
        every, order = scores[rows].sort(dim=-1, descending=True)
        kept, _ = _nucleus(every, log_total[rows], top_p[rows])
        keep = torch.zeros_like(kept).scatter(-1, order, kept)
        filtered[rows] = scores[rows].masked_fill(~keep, float("-inf"))
    return filtered


def _nucleus(ranked: torch.Tensor, log_total: torch.Tensor, top_p: torch.Tensor):
    """Which of a row's best tokens (sorted, best first) are in its nucleus, and the probability
    they hold together: a token is kept while the tokens before it hold less than top_p."""
    probs = (ranked - log_total).exp()
    reached = probs.cumsum(-1)
    kept = (reached - probs) < top_p
    kept[:, 0] = True  # the best token always: a top_p below float32's least (1e-46) reads as 0
    return kept, reached[:, -1:]

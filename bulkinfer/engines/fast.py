"""The fast engine: padding-free scoring and continuous-batching decode on the model's weights.

Scoring packs a batch's sequences into one row of tokens (no padding, positions restarting per
sequence, attention kept inside each sequence) and takes log-probs through the chunked LM head.

Generation keeps up to `max_slots` rows in flight. Each row owns a region of a preallocated KV
pool sized to its prompt plus its new-token limit; a finished row's region and slot go to the
next prompt (continuous batching). New rows are prefilled packed; every decode step is one
replay of a CUDA graph captured per batch-size bucket, so no per-layer Python runs per step.
Tokens are chosen by `choose_next_tokens` keyed by (seed, row, step), like the reference
engine, so a row decodes the same tokens whatever else is in flight. The host looks at the
tokens every few steps (EOS, stop strings, limits) instead of after every step.

Models outside SUPPORTED_TYPES, or with attention or logit features the packed kernels do not
implement (sliding windows, soft-capping, scaled logits), run on the reference engine.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch

from bulkinfer.engines.compiling import compile_backend
from bulkinfer.engines.decoder import Decoder, decoder_blocker
from bulkinfer.engines.hf import (
    LOGIT_TRANSFORMS,
    Generation,
    HFEngine,
    StopStrings,
    per_row_totals,
    resolve_device,
    scored_positions,
)
from bulkinfer.engines.packed_attention import KVPool, Packed, attend
from bulkinfer.engines.regions import RegionAllocator
from bulkinfer.engines.sampling import (
    STEP_KEY,
    RowSampling,
    SamplingParams,
    choose_next_tokens,
)
from bulkinfer.progress import log

SUPPORTED_TYPES = ("llama", "qwen2", "qwen3", "mistral")
DECODE_BUCKETS = (8, 16, 32, 64, 128, 256, 384, 512, 768, 1024)
MIN_KV_BUCKET = 1024  # attention length buckets: powers of two from here
SYNC_EVERY = 8  # decode steps between looks at the tokens on the host
PREFILL_TOKENS = 16384  # tokens per prefill forward
SCORE_BATCH_ROWS = 8192  # rows per packed scoring batch with max_batch_size auto, on a GPU
GPU_POOL_SHARE = 0.85  # of the free memory after the per-step working memory


def fast_path_blocker(model) -> str | None:
    """Why this model cannot take the fast path, or None when it can."""
    config = (
        model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    )
    if config.model_type not in SUPPORTED_TYPES:
        return f"model type {config.model_type} is not one of {', '.join(SUPPORTED_TYPES)}"
    if any(getattr(config, k, None) for k in LOGIT_TRANSFORMS):
        return "the model scales or caps its logits"
    if getattr(config, "attn_logit_softcapping", None):
        return "the model soft-caps attention scores"
    if "sliding_attention" in (getattr(config, "layer_types", None) or ()):
        return "the model has sliding-window layers"
    if config.model_type == "mistral" and getattr(config, "sliding_window", None):
        return "the model has a sliding attention window"
    return decoder_blocker(model)


def load_engine(spec, tokenizer) -> HFEngine:
    """The engine `model.engine` asks for. auto: the fast engine on a CUDA GPU, unless the spec
    names an attention implementation (the user asked for that kernel); the fast engine itself
    runs a model it does not support on the reference path."""
    choice = spec.engine
    if choice == "auto":
        on_gpu = resolve_device(spec.device).type == "cuda"
        choice = "fast" if on_gpu and spec.attn_implementation is None else "reference"
    if choice == "reference":
        return HFEngine.load(spec, tokenizer)
    engine = FastEngine.load(spec, tokenizer)
    if engine.blocker is not None:
        log(f"engine: the reference path runs this model ({engine.blocker})")
    return engine


class FastEngine(HFEngine):
    def __init__(self, model, tokenizer, device: torch.device, max_slots: int | None = None):
        super().__init__(model, tokenizer, device)
        self.blocker = fast_path_blocker(model)
        config = (
            model.config.get_text_config()
            if hasattr(model.config, "get_text_config")
            else model.config
        )
        self.layers = config.num_hidden_layers
        self.kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        self.head_dim = (
            getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        )
        self.max_slots = max_slots or (DECODE_BUCKETS[-1] if device.type == "cuda" else 64)
        self.pool: KVPool | None = None
        self.state: DecodeState | None = None
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.logits: torch.Tensor | None = None
        self.counters: dict[str, float] = {}
        self.graph_memory = None
        # a graph needs the flash kernel (the float32 attention loop reads sizes on the host)
        self.use_graphs = device.type == "cuda" and model.dtype in (torch.float16, torch.bfloat16)
        self.decoder = Decoder(model, compile_backend(device)) if self.blocker is None else None

    @property
    def fast(self) -> bool:
        return self.blocker is None

    @property
    def kind(self) -> str:
        return "fast" if self.fast else "reference"

    @property
    def pads(self) -> bool:
        return not self.fast

    # ------------------------------------------------------------------ shared forward

    def _hidden(self, ids: torch.Tensor, positions: torch.Tensor, packed: Packed) -> torch.Tensor:
        """Last hidden states [tokens, dim] of a packed forward."""
        return self.decoder.hidden(ids, positions, lambda i, q, k, v: attend(i, q, k, v, packed))

    def _chunk_logprobs(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The fused scoring head: no float32 [tokens x vocab] tensor is written."""
        if self.decoder is None:
            return super()._chunk_logprobs(hidden, targets)
        head = self.model.get_output_embeddings()
        return self.decoder.target_logprobs(hidden, head.weight, head.bias, targets)

    # ------------------------------------------------------------------ scoring

    @torch.inference_mode()
    def loglikelihood(self, sequences: list[np.ndarray], score_from: list[int]):
        if not self.fast or not sequences:
            return super().loglikelihood(sequences, score_from)
        lengths = np.array([len(s) for s in sequences], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        ids = torch.from_numpy(np.concatenate(sequences).astype(np.int64)).to(self.device)
        positions = torch.from_numpy(_restarting_positions(lengths)).to(self.device)
        rows, at = scored_positions(lengths, score_from, offsets)
        row_idx = torch.from_numpy(rows).to(self.device)
        at_idx = torch.from_numpy(at).to(self.device)
        packed = Packed(_int32(offsets, self.device), int(lengths.max()), self.decoder.scaling)
        hidden = self._hidden(ids, positions, packed)
        token_logprobs = self._head_logprobs(hidden[at_idx], ids[at_idx + 1])
        return per_row_totals(row_idx, token_logprobs, len(sequences))

    # ------------------------------------------------------------------ generation

    @torch.inference_mode()
    def generate(
        self,
        prompts: list[np.ndarray],
        row_keys: list[int],
        params: SamplingParams | list[SamplingParams],
        max_new: list[int],
        logprobs: bool = False,
    ) -> list[Generation]:
        if not self.fast or not prompts:
            return super().generate(prompts, row_keys, params, max_new, logprobs)
        per_row = params if isinstance(params, list) else [params] * len(prompts)
        rows = [
            _Row(i, np.asarray(p, dtype=np.int64), int(limit), int(key), row_params)
            for i, (p, key, limit, row_params) in enumerate(
                zip(prompts, row_keys, max_new, per_row, strict=True)
            )
        ]
        self._ensure_pool(sum(r.need for r in rows))
        ContinuousBatch(self, rows, params, logprobs).run()
        return [Generation(r.tokens, r.reason, r.logprobs if logprobs else None) for r in rows]

    def _ensure_pool(self, tokens_needed: int) -> None:
        """The KV pool: on a GPU as large as free memory allows, allocated once (the captured
        graphs point into it); on the CPU just what this call needs."""
        if self.device.type == "cuda":
            if self.pool is None:
                self._allocate(self._gpu_pool_tokens())
            return
        if self.pool is None or self.pool.tokens < tokens_needed + 1:
            self._allocate(tokens_needed + 1)

    def _allocate(self, tokens: int) -> None:
        dtype = self.model.dtype
        self.pool = KVPool.allocate(
            self.layers, tokens, self.kv_heads, self.head_dim, dtype, self.device
        )
        self.state = DecodeState.allocate(self.max_slots, self.device)
        vocab = self.model.get_output_embeddings().weight.shape[0]
        self.logits = torch.empty((self.max_slots, vocab), dtype=torch.float32, device=self.device)
        self.drop_graphs()

    def drop_graphs(self) -> None:
        """Forget the captured decode steps (and their memory pool: a pool whose graphs are all
        gone cannot take a new capture)."""
        self.graphs.clear()
        self.graph_memory = None

    def generate_token_budget(self) -> int:
        """`max_tokens: auto` for generation: a batch is a unit of checkpointing here, not of
        memory (rows wait for a slot), so it may hold several pools' worth of rows; the
        reference engine's budget where this engine would not decode."""
        from bulkinfer.engines.memory import auto_token_budget

        if not self.fast or self.device.type != "cuda":
            return auto_token_budget(self.model.config, self.device, self.model.dtype, True)
        tokens = self.pool.tokens if self.pool is not None else self._gpu_pool_tokens()
        return 4 * tokens

    def batch_rows(self, generate: bool) -> int | None:
        """`max_batch_size: auto` on a GPU (None elsewhere: the default). Generation: enough rows
        to keep every decode slot busy until the batch's last ones drain. Scoring: packed rows
        carry no padding, so the token budget alone sizes a batch; at 256 rows, 32,000 prompts
        of ~300 tokens made 127 batches of a 1M-token budget instead of 23, each with its own
        host work (0.5B shape on an H200: 0.2 s more outside the model, same model time)."""
        if not self.fast or self.device.type != "cuda":
            return None
        return 4 * self.max_slots if generate else SCORE_BATCH_ROWS

    def _gpu_pool_tokens(self) -> int:
        free, _ = torch.cuda.mem_get_info(self.device)
        vocab = self.model.get_output_embeddings().weight.shape[0]
        hidden = self.model.config.get_text_config().hidden_size
        from bulkinfer.engines.memory import bytes_per_token

        working = (
            self.max_slots * vocab * 16  # step logits (bf16 + float32) and sampling temporaries
            + PREFILL_TOKENS * bytes_per_token(self.model.config, self.model.dtype, False)
            + PREFILL_TOKENS * hidden * 4
            + (1 << 30)
        )
        per_token = 2 * self.layers * self.kv_heads * self.head_dim * self.model.dtype.itemsize
        return max(4096, int((free - working) * GPU_POOL_SHARE) // per_token)

    def _decode_logits(self, size: int, kv_bucket: int) -> torch.Tensor:
        """Float32 logits [size, vocab] of one decode step for the first `size` slots, written
        to a buffer at a fixed address; no row attends to more than kv_bucket tokens."""
        s, pool = self.state, self.pool
        packed = Packed(
            s.query_offsets[: size + 1],
            kv_bucket,
            self.decoder.scaling,
            pool,
            s.write[:size],
            decode=True,
            region_start=s.starts[: size + 1],
            used=s.used[:size],
        )
        hidden = self._hidden(s.ids[:size], s.positions[:size], packed)
        out = self.logits[:size]
        out.copy_(self.model.get_output_embeddings()(hidden))
        return out

    def decode_step(self, size: int, longest: int) -> torch.Tensor:
        """One decode step: a CUDA graph replay on a GPU, one graph per (slots, attention
        length) bucket, captured on first use. The attention length is bucketed because
        FlashAttention sizes its split-KV work from it: the pool's size there costs ~0.1 ms per
        layer per step (measured on an H100)."""
        kv_bucket = min(self.pool.tokens, max(MIN_KV_BUCKET, 1 << (longest - 1).bit_length()))
        if not self.use_graphs:
            return self._decode_logits(size, kv_bucket)
        key = (size, kv_bucket)
        if key not in self.graphs:
            self.graphs[key] = self._capture(size, kv_bucket)
        self.graphs[key].replay()
        return self.logits[:size]

    def _capture(self, size: int, kv_bucket: int) -> torch.cuda.CUDAGraph:
        started = time.perf_counter()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up: kernels chosen and workspaces made before capture
                self._decode_logits(size, kv_bucket)
        torch.cuda.current_stream().wait_stream(stream)
        if self.graph_memory is None:
            self.graph_memory = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.graph_memory):
            self._decode_logits(size, kv_bucket)
        _count(self.counters, graph_captures=1, capture_seconds=time.perf_counter() - started)
        return graph


@dataclass
class _Row:
    index: int
    prompt: np.ndarray
    limit: int
    key: int
    params: SamplingParams | None = None
    start: int = -1
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    reason: str = "length"

    @property
    def need(self) -> int:
        """Pool slots: the prompt, every new token, and room for the steps a row may run past
        its end before the host next looks (their tokens are dropped)."""
        return len(self.prompt) + self.limit + SYNC_EVERY


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
        )

    def load(self, rows: list[_Row], size: int) -> None:
        """Slots 0..len(rows) take these rows' next inputs; the rest up to `size` idle on the
        pool's scratch slot 0."""
        host = np.zeros((7, size), dtype=np.int64)
        host[4, :] = 1  # idle slots attend to the one scratch slot
        for i, r in enumerate(rows):
            done = len(r.tokens)
            p = len(r.prompt)
            host[:, i] = (
                r.tokens[-1],
                p + done - 1,
                r.start + p + done - 1,
                r.start,
                p + done,
                r.key,
                done,
            )
        dev = torch.from_numpy(host).to(self.ids.device, non_blocking=False)
        self.ids[:size] = dev[0]
        self.positions[:size] = dev[1]
        self.write[:size] = dev[2]
        self.starts[:size] = dev[3].int()
        self.starts[size] = 0
        self.used[:size] = dev[4].int()
        self.keys[:size] = dev[5]
        self.steps[:size] = dev[6]

    def advance(self, n: int, tokens: torch.Tensor) -> None:
        """The first n slots feed the tokens just chosen at the next position."""
        self.ids[:n] = tokens
        self.positions[:n] += 1
        self.write[:n] += 1
        self.used[:n] += 1
        self.steps[:n] += 1


class ContinuousBatch:
    """One generate call: rows enter as slots and pool regions free up, leave when done."""

    def __init__(
        self,
        engine: FastEngine,
        rows: list[_Row],
        params: SamplingParams | list[SamplingParams],
        logprobs: bool,
    ):
        self.engine = engine
        self.shared = None if isinstance(params, list) else params
        self.logprobs = logprobs
        # longest limit first: the rows that need the most steps start first, so the end of
        # the call is not a few long rows decoding alone (equal limits keep the given order)
        self.queue = deque(sorted(rows, key=lambda r: -r.limit))
        self.active: list[_Row] = []
        self.allocator = RegionAllocator(engine.pool.tokens, reserved=1)
        ignore_eos = rows[0].params.ignore_eos
        self.eos = set() if ignore_eos else set(engine.eos_ids)
        stops = [r.params.stop for r in rows]
        self.stops = StopStrings(stops, engine.tokenizer) if any(stops) else None
        self.device = engine.device

    def run(self) -> None:
        while self.queue or self.active:
            if self._should_admit():
                self._admit()
            if self.active:
                self._decode_chunk()

    def _should_admit(self) -> bool:
        if not self.queue:
            return False
        free = self.engine.max_slots - len(self.active)
        return not self.active or free >= min(len(self.queue), max(1, self.engine.max_slots // 8))

    def _admit(self) -> None:
        """Move queued rows into free slots and pool regions, then prefill them packed."""
        entering = []
        while self.queue and len(self.active) + len(entering) < self.engine.max_slots:
            row = self.queue[0]
            start = self.allocator.allocate(row.need)
            if start is None:
                if not self.active and not entering:
                    raise RuntimeError(
                        f"a prompt of {len(row.prompt)} tokens plus {row.limit} new tokens does "
                        f"not fit the KV pool of {self.allocator.size:,} tokens"
                    )
                break
            row.start = start
            entering.append(self.queue.popleft())
        group: list[_Row] = []
        for row in entering:
            if group and sum(len(r.prompt) for r in group) + len(row.prompt) > PREFILL_TOKENS:
                self._prefill(group)
                group = []
            group.append(row)
        if group:
            self._prefill(group)

    def _prefill(self, rows: list[_Row]) -> None:
        engine = self.engine
        started = time.perf_counter()
        lengths = np.array([len(r.prompt) for r in rows], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        ids = torch.from_numpy(np.concatenate([r.prompt for r in rows])).to(self.device)
        positions = _restarting_positions(lengths)
        write = np.concatenate([r.start + np.arange(len(r.prompt)) for r in rows])
        packed = Packed(
            _int32(offsets, self.device),
            int(lengths.max()),
            engine.decoder.scaling,
            engine.pool,
            torch.from_numpy(write).to(self.device),
        )
        hidden = engine._hidden(ids, torch.from_numpy(positions).to(self.device), packed)
        last = torch.from_numpy(offsets[1:] - 1).to(self.device)
        logits = engine.model.get_output_embeddings()(hidden[last]).float()
        keys = torch.tensor([r.key for r in rows], dtype=torch.int64, device=self.device)
        tokens = choose_next_tokens(logits, self._chooser(rows), keys, 0)
        first = tokens.tolist()
        first_logprobs = _logprobs_of(logits, tokens).tolist() if self.logprobs else None
        _count(engine.counters, prefill_seconds=time.perf_counter() - started)
        _count(engine.counters, prefill_tokens=int(lengths.sum()), prefill_calls=1)
        for i, (row, token) in enumerate(zip(rows, first, strict=True)):
            if not self._accept(row, token, first_logprobs[i] if self.logprobs else None):
                self.active.append(row)

    def _decode_chunk(self) -> None:
        """Up to SYNC_EVERY decode steps without looking at the tokens, then account for them."""
        engine, rows = self.engine, self.active
        n = len(rows)
        size = next(b for b in (*DECODE_BUCKETS, engine.max_slots) if b >= n)
        size = min(size, engine.max_slots)
        steps = min(SYNC_EVERY, max(r.limit - len(r.tokens) for r in rows))
        longest = max(len(r.prompt) + len(r.tokens) for r in rows) + steps
        state = engine.state
        state.load(rows, size)
        chosen = torch.empty((n, steps), dtype=torch.int64, device=self.device)
        chosen_logprobs = torch.zeros((n, steps), dtype=torch.float32, device=self.device)
        chooser = self._chooser(rows)
        started = time.perf_counter()
        for j in range(steps):
            logits = engine.decode_step(size, longest)[:n]
            # keyed_uniform's noise for step s of a key is step 0's for key + s x its constant:
            # each row draws at its own step with the very function the reference engine uses
            keys = state.keys[:n] + state.steps[:n] * STEP_KEY
            tokens = choose_next_tokens(logits, chooser, keys, 0)
            chosen[:, j] = tokens
            if self.logprobs:
                chosen_logprobs[:, j] = _logprobs_of(logits, tokens)
            state.advance(n, tokens)
        chosen = chosen.tolist()
        chosen_logprobs = chosen_logprobs.tolist()
        _count(engine.counters, decode_seconds=time.perf_counter() - started, decode_steps=steps)
        _count(engine.counters, decode_row_steps=n * steps, decode_slot_steps=size * steps)
        still = []
        for row, new, lps in zip(rows, chosen, chosen_logprobs, strict=True):
            if not any(self._accept(row, t, lp) for t, lp in zip(new, lps, strict=True)):
                still.append(row)
        self.active = still

    def _chooser(self, rows: list[_Row]) -> SamplingParams | RowSampling:
        if self.shared is not None:
            return self.shared
        return RowSampling.of([r.params for r in rows], self.device)

    def _accept(self, row: _Row, token: int, logprob: float | None) -> bool:
        """Take one new token for a row (reference-engine rules); True when the row is done,
        whose region then goes back to the pool."""
        if token in self.eos:
            row.reason = "stop"
        else:
            row.tokens.append(token)
            if logprob is not None:
                row.logprobs.append(logprob)
            if self.stops is not None and self.stops.hit(row.tokens, row.params.stop):
                row.reason = "stop"
            elif len(row.tokens) < row.limit:
                return False
        self.allocator.release(row.start, row.need)
        return True


def _logprobs_of(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(token) under the model's own distribution, as the reference engine reports it."""
    return logits.log_softmax(-1).gather(-1, tokens[:, None]).squeeze(-1)


def _count(counters: dict[str, float], **amounts: float) -> None:
    for name, amount in amounts.items():
        counters[name] = counters.get(name, 0) + amount


def _restarting_positions(lengths: np.ndarray) -> np.ndarray:
    offsets = np.repeat(np.cumsum(lengths) - lengths, lengths)
    return np.arange(int(lengths.sum()), dtype=np.int64) - offsets


def _int32(values: np.ndarray, device) -> torch.Tensor:
    return torch.from_numpy(np.asarray(values, dtype=np.int32)).to(device)

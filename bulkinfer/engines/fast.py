"""The fast engine's model steps: packed scoring, packed prefill, decode steps from a KV pool.

Scoring packs a batch's sequences into one row of tokens (no padding, positions restarting per
sequence, attention kept inside each sequence) and takes log-probs through the chunked LM head.
Prefill runs new rows packed the same way, writing their keys and values into the regions the
scheduler gave them; every decode step is one replay of a CUDA graph captured per batch-size
bucket, so no per-layer Python runs per step. Tokens are chosen by `choose_next_tokens` keyed by
(seed, row, step), like the reference engine, so a row decodes the same tokens whatever else is
in flight. Which rows run when is the scheduler's business (`engines.scheduler`); whether this
engine runs a model at all is decided once, in `engines.select`.
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch

from bulkinfer.configs import text_config
from bulkinfer.engines.base import EngineLimits, GenerateRequests, whole_groups
from bulkinfer.engines.compiling import compile_backend
from bulkinfer.engines.constraints import consume_all, mask_logits
from bulkinfer.engines.decoder import Decoder
from bulkinfer.engines.hf import Generation, HFEngine, per_row_totals, scored_positions
from bulkinfer.engines.kv import DecodeInputs, DecodeState, KVPool, shared_prefix_groups
from bulkinfer.engines.memory import kv_pool_tokens
from bulkinfer.engines.packed_attention import Packed, attend
from bulkinfer.engines.sampling import (
    STEP_KEY,
    RowSampling,
    SamplingParams,
    choose_next_tokens,
    flag_nan,
    top_alternatives,
)

DECODE_BUCKETS = (8, 16, 32, 64, 128, 256, 384, 512, 768, 1024, 1280, 1536, 1792, 2048)
GPU_SLOTS = 1024  # rows decoded together on a GPU
# BULKINFER_DECODE_SLOTS=N decodes N rows together on a GPU (at most DECODE_BUCKETS[-1]), to
# measure against GPU_SLOTS
SLOTS_ENV = "BULKINFER_DECODE_SLOTS"
CPU_SLOTS = 64  # rows decoded together on the CPU
# rows' tokens scored in one scratch pool of a shared prefix (4.3 GB of keys and values on the
# 8B shape); a group of rows larger than that computes its prefix once per part
SHARED_SCORE_TOKENS = 32_768
MIN_KV_BUCKET = 1024  # attention length buckets: powers of two from here
INDEX_LIMIT = 1 << 31  # elements a tensor may hold before inductor needs 64-bit indexing

Chooser = SamplingParams | RowSampling


class FastEngine(HFEngine):
    """Padding-free scoring and decode steps on the model's own weights; scoring choices and
    anything not written out here are the reference engine's (this class extends it)."""

    def __init__(self, model, tokenizer, limits: EngineLimits):
        super().__init__(model, tokenizer, limits)
        config = text_config(model.config)
        self.layers = config.num_hidden_layers
        self.kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        self.head_dim = (
            getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        )
        self.slots: int = limits.slots or CPU_SLOTS
        self.forward_tokens = forward_token_limit(config)  # of one packed scoring forward
        self.decoder = Decoder(model, compile_backend(self.device))
        self.kv_fp8 = limits.kv_cache_dtype == "fp8"  # the decode pool in fp8 (kv.KVPool)
        # a graph needs the flash kernel (the float32 attention loop reads sizes on the host)
        self.use_graphs = self.device.type == "cuda" and model.dtype in (
            torch.float16,
            torch.bfloat16,
        )
        # self.counters (HFEngine): prefill/decode seconds, steps, tokens, graph captures, shared
        # prefix tokens, read by the stats and the bench
        self._pool: KVPool | None = None
        self._state: DecodeState | None = None
        self._logits: torch.Tensor | None = None
        self._graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self._graph_memory = None

    # ------------------------------------------------------------------ scoring

    @torch.inference_mode()
    def loglikelihood(
        self, sequences: list[np.ndarray], score_from: list[int], share_prefix: int = 0
    ):
        """One packed forward per piece of whole sequences of at most `forward_tokens` tokens.
        A batch of the auto budget (up to ~1M tokens) in one forward passes 2^31 elements in
        its MLP activations, and inductor then compiles the fused functions again for 64-bit
        indexing (1.7-2.3 s on the 8B shape); pieces just under that run the matrix products
        as fast (H200, 8B shape: 625 TFLOP/s at 65k tokens, 618 at 524k). Rows sharing their
        first `share_prefix` tokens or more have the prefix computed once (`_shared_scores`)."""
        out = []
        for a, b in forward_pieces([len(s) for s in sequences], self.forward_tokens):
            out += self._piece_loglikelihood(sequences[a:b], score_from[a:b], share_prefix)
        return out

    def _piece_loglikelihood(self, sequences, score_from, share_prefix: int):
        results: list = [None] * len(sequences)
        for members, shared in shared_prefix_groups(sequences, share_prefix):
            for part in _within_tokens(members, sequences, SHARED_SCORE_TOKENS):
                if len(part) < 2:
                    continue
                scores = self._shared_scores(
                    [sequences[i] for i in part], [score_from[i] for i in part], shared
                )
                for i, score in zip(part, scores, strict=True):
                    results[i] = score
        rest = [i for i, r in enumerate(results) if r is None]
        scores = self._packed_loglikelihood(
            [sequences[i] for i in rest], [score_from[i] for i in rest]
        )
        for i, score in zip(rest, scores, strict=True):
            results[i] = score
        return results

    def _shared_scores(self, sequences, score_from, shared: int):
        """Scores of rows whose first `shared` tokens are identical: the prefix runs once (its
        keys and values copied to each row's region of a scratch pool), then the rows' own
        tokens packed, attending to their region; the same sums as computing rows whole."""
        lengths = np.array([len(s) for s in sequences], dtype=np.int64)
        regions = np.concatenate([[0], np.cumsum(lengths)])
        pool = KVPool.allocate(
            self.layers,
            int(lengths.sum()),
            self.kv_heads,
            self.head_dim,
            self.model.dtype,
            self.device,
        )
        prefix_hidden = self._prefix_into(pool, sequences[0][:shared], 0, regions[1:-1].tolist())
        past = [shared] * len(sequences)
        own_hidden, own_offsets = self._after_past(pool, sequences, regions[:-1].tolist(), past)
        hidden = torch.cat([prefix_hidden, own_hidden])
        rows, at = scored_positions(lengths, score_from)  # `at` predicts token at + 1 of its row
        # positions before the prefix's last predict the prefix's own tokens: the same hidden
        # state and target in every row, so the LM head runs on them once (`_prefix_tails`)
        rest = at >= shared - 1
        rows, at = rows[rest], at[rest]
        # the prefix's last position: its one pass; after it: the row's own tokens, which
        # follow the prefix's `shared` hidden states in `hidden`
        source = np.where(at < shared, at, own_offsets[rows] + at)
        full = np.concatenate(sequences).astype(np.int64)
        targets = torch.from_numpy(full[regions[rows] + at + 1]).to(self.device)
        token_logprobs = self._head_logprobs(
            hidden[torch.from_numpy(source).to(self.device)], targets
        )
        _count(self.counters, shared_prefix_tokens=shared * (len(sequences) - 1))
        totals = per_row_totals(
            torch.from_numpy(rows).to(self.device), token_logprobs, len(lengths)
        )
        starts = np.maximum(np.asarray(score_from, dtype=np.int64), 1) - 1
        tails = self._prefix_tails(prefix_hidden, sequences[0][:shared], int(starts.min()))
        return [
            (total + tails[start], count + shared - 1 - start)
            if start < shared - 1
            else (total, count)
            for (total, count), start in zip(totals, starts.tolist(), strict=True)
        ]

    def _prefix_tails(self, prefix_hidden, prefix: np.ndarray, first: int) -> dict[int, float]:
        """For each position j from `first` on, the log-probs the prefix's own tokens after j
        have, summed in float64 (every row sharing the prefix scores them alike)."""
        last = len(prefix) - 1  # the last prefix position predicts a row's own first token
        if first >= last:
            return {}
        targets = torch.from_numpy(prefix[first + 1 :].astype(np.int64)).to(self.device)
        logprobs = self._head_logprobs(prefix_hidden[first:last], targets).double()
        tails = torch.flip(torch.cumsum(torch.flip(logprobs, [0]), 0), [0]).tolist()
        return {first + k: value for k, value in enumerate(tails)}

    def _packed_loglikelihood(self, sequences: list[np.ndarray], score_from: list[int]):
        if not sequences:
            return []
        lengths = np.array([len(s) for s in sequences], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        ids = torch.from_numpy(np.concatenate(sequences).astype(np.int64)).to(self.device)
        positions = torch.from_numpy(restarting_positions(lengths)).to(self.device)
        rows, at = scored_positions(lengths, score_from, offsets)
        row_idx = torch.from_numpy(rows).to(self.device)
        at_idx = torch.from_numpy(at).to(self.device)
        packed = Packed(_int32(offsets, self.device), int(lengths.max()), self.decoder.scaling)
        hidden = self._hidden(ids, positions, packed)
        token_logprobs = self._head_logprobs(hidden[at_idx], ids[at_idx + 1])
        return per_row_totals(row_idx, token_logprobs, len(sequences))

    def _hidden(self, ids: torch.Tensor, positions: torch.Tensor, packed: Packed) -> torch.Tensor:
        """Last hidden states [tokens, dim] of a packed forward."""
        return self.decoder.hidden(ids, positions, lambda i, q, k, v: attend(i, q, k, v, packed))

    @torch.inference_mode()
    def embed(self, sequences: list[np.ndarray], pooling: str, normalize: bool) -> np.ndarray:
        """One vector per sequence from packed forwards (no padding, nothing written to the KV
        pool): the final hidden states pooled as the reference engine pools them."""
        out = []
        for a, b in forward_pieces([len(s) for s in sequences], self.forward_tokens):
            lengths = np.array([len(s) for s in sequences[a:b]], dtype=np.int64)
            offsets = np.concatenate([[0], np.cumsum(lengths)])
            ids = torch.from_numpy(np.concatenate(sequences[a:b]).astype(np.int64))
            positions = torch.from_numpy(restarting_positions(lengths)).to(self.device)
            packed = Packed(_int32(offsets, self.device), int(lengths.max()), self.decoder.scaling)
            hidden = self._hidden(ids.to(self.device), positions, packed).float()
            out.append(pool_packed(hidden, offsets, pooling, normalize))
        return np.concatenate(out)

    def _chunk_logprobs(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The fused scoring head: no float32 [tokens x vocab] tensor is written."""
        head = self.model.get_output_embeddings()
        return self.decoder.target_logprobs(hidden, head.weight, head.bias, targets)

    # ------------------------------------------------------------------ generation

    @torch.inference_mode()
    def generate(
        self,
        prompts: list[np.ndarray],
        row_keys: list[int],
        params: SamplingParams | list[SamplingParams],
        max_new: list[int],
        logprobs: bool = False,
        top_logprobs: int = 0,
    ) -> list[Generation]:
        """One group through the scheduler (see `generate_stream`)."""
        if not prompts:
            return []
        per_row = params if isinstance(params, list) else [params] * len(prompts)
        requests = GenerateRequests(
            list(prompts), list(row_keys), per_row, list(max_new), logprobs, None, top_logprobs
        )
        return next(whole_groups(self, [(0, requests)]))[1]

    def generate_stream(self, groups):
        """Continuous batching over every group: the scheduler admits rows into slots and
        pool regions, draws the next groups while earlier ones decode, asks this engine for
        prefill and decode steps, and reports finished rows every few steps."""
        from bulkinfer.engines.scheduler import stream

        return stream(self, groups)

    @torch.inference_mode()
    def reserve(self, tokens_needed: int) -> int:
        """The KV pool's size in tokens, allocating it first: on a GPU the size the limits give
        (free memory before loading, minus the weights), once (captured graphs point into it);
        on the CPU just what this call needs."""
        if self.limits.kv_tokens is not None:
            if self._pool is None:
                # the limits guessed the weights' size from the files (a GGUF file is smaller
                # than its weights once loaded): never more than what is free now
                free = torch.cuda.mem_get_info(self.device)[0]
                fits = kv_pool_tokens(
                    self.model.config, self.model.dtype.itemsize, self.slots, free, self.kv_fp8
                )
                self._allocate(min(self.limits.kv_tokens, fits))
        elif self._pool is None or self._pool.tokens < tokens_needed + 1:
            self._allocate(tokens_needed + 1)
        return self._pool.tokens

    def release_pool(self) -> None:
        """Give the KV pool's memory back (the next generate call allocates it again)."""
        self._pool = self._state = self._logits = None
        self.drop_graphs()

    def _allocate(self, tokens: int) -> None:
        dtype = self.model.dtype
        self._pool = KVPool.allocate(
            self.layers, tokens, self.kv_heads, self.head_dim, dtype, self.device, self.kv_fp8
        )
        self._state = DecodeState.allocate(self.slots, self.device)
        vocab = self.model.get_output_embeddings().weight.shape[0]
        self._logits = torch.empty((self.slots, vocab), dtype=torch.float32, device=self.device)
        self.drop_graphs()

    def drop_graphs(self) -> None:
        """Forget the captured decode steps (and their memory pool: a pool whose graphs are all
        gone cannot take a new capture)."""
        self._graphs.clear()
        self._graph_memory = None

    @torch.inference_mode()
    def prefill(
        self,
        prompts: list[np.ndarray],
        starts: list[int],
        keys: list[int],
        chooser: Chooser,
        logprobs: bool,
        matchers: list | None = None,
        top: int = 0,
        past: list[int] | None = None,
    ) -> tuple[list[int], list[float] | None, tuple | None]:
        """Run new rows packed, their keys and values written from each row's region start;
        returns each row's first token, its log-prob when asked, and with `top` its `top` most
        likely alternatives (ids and log-probs, one list per row). `matchers`: each row's
        grammar matcher or None (engines/constraints.py), masking its first token and then
        consuming it. `past`: tokens of each prompt whose keys and values are in its region
        already (a shared prefix, `fill_prefix`): only the rest runs, attending to them."""
        started = time.perf_counter()
        hidden, offsets = self._after_past(self._pool, prompts, starts, past or [0] * len(prompts))
        last = torch.from_numpy(offsets[1:] - 1).to(self.device)
        logits = self.model.get_output_embeddings()(hidden[last]).float()
        if matchers:
            mask_logits(logits, matchers, self.tokenizer, self.end_token)
        key_tensor = torch.tensor(keys, dtype=torch.int64, device=self.device)
        tokens = choose_next_tokens(logits, chooser, key_tensor, 0)
        first = flag_nan(logits, tokens).tolist()
        if matchers:
            consume_all(matchers, first)
        first_logprobs = _logprobs_of(logits, tokens).tolist() if logprobs else None
        first_top = None
        if top:
            values, ids = top_alternatives(logits, top)
            first_top = ids.tolist(), values.tolist()
        _count(self.counters, prefill_seconds=time.perf_counter() - started)
        _count(self.counters, prefill_tokens=int(offsets[-1]), prefill_calls=1)
        return first, first_logprobs, first_top

    @torch.inference_mode()
    def fill_prefix(self, tokens: np.ndarray, start: int, copies: list[int]) -> None:
        """Compute a shared prefix's keys and values once, into the region at `start`, and
        copy them to the regions at `copies` (rows that share it; a copy costs the bytes of
        its keys and values, microseconds, where computing them again costs a prefill)."""
        started = time.perf_counter()
        self._prefix_into(self._pool, tokens, start, copies)
        _count(self.counters, prefill_seconds=time.perf_counter() - started)
        _count(
            self.counters,
            prefill_tokens=len(tokens),
            shared_prefix_tokens=len(tokens) * len(copies),
        )

    @torch.inference_mode()
    def copy_prefix(self, length: int, source: int, copies: list[int]) -> None:
        """Copy the first `length` tokens' keys and values of the region at `source` (a row in
        flight whose prompt starts with them) to the regions at `copies`."""
        started = time.perf_counter()
        self._copy_regions(self._pool, source, length, copies)
        _count(self.counters, prefill_seconds=time.perf_counter() - started)
        _count(self.counters, shared_prefix_tokens=length * len(copies))

    def _after_past(self, pool: KVPool, prompts, starts: list[int], past: list[int]):
        """Hidden states of each prompt's tokens after its first `past` (whose keys and values
        are in its region of `pool` from `starts` already, a shared prefix), packed, their keys
        and values written after them; and the offsets of the rows in the packed pass."""
        rest = [p[n:] for p, n in zip(prompts, past, strict=True)]
        lengths = np.array([len(p) for p in rest], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        ids = torch.from_numpy(np.concatenate(rest).astype(np.int64)).to(self.device)
        done = np.repeat(np.asarray(past, dtype=np.int64), lengths)
        positions = torch.from_numpy(restarting_positions(lengths) + done).to(self.device)
        write = np.concatenate(
            [s + n + np.arange(len(p)) for p, s, n in zip(rest, starts, past, strict=True)]
        )
        packed = Packed(
            _int32(offsets, self.device),
            int(lengths.max()),
            self.decoder.scaling,
            pool,
            torch.from_numpy(write).to(self.device),
        )
        if any(past):  # the rest attends to the whole region: the prefix, then itself
            packed.after_prefix = True
            packed.region_start = _int32([*starts, 0], self.device)
            packed.used = _int32([len(p) for p in prompts], self.device)
            packed.max_k = max(len(p) for p in prompts)
        return self._hidden(ids, positions, packed), offsets

    def _prefix_into(self, pool: KVPool, tokens, start: int, copies: list[int]) -> torch.Tensor:
        """Run `tokens` alone, their keys and values written from `start` of `pool` and copied
        to the regions at `copies`; returns their hidden states."""
        n = len(tokens)
        at = torch.arange(start, start + n, device=self.device)
        packed = Packed(_int32([0, n], self.device), n, self.decoder.scaling, pool, at)
        ids = torch.from_numpy(np.asarray(tokens, dtype=np.int64)).to(self.device)
        hidden = self._hidden(ids, torch.arange(n, device=self.device), packed)
        self._copy_regions(pool, start, n, copies)
        return hidden

    def _copy_regions(self, pool: KVPool, start: int, n: int, copies: list[int]) -> None:
        """Every layer's keys and values of pool slots [start, start + n) copied to the same
        `n` slots from each of `copies`."""
        if not copies:
            return
        source = torch.arange(start, start + n, device=self.device).repeat(len(copies))
        target = torch.from_numpy(
            np.concatenate([c + np.arange(n) for c in copies]).astype(np.int64)
        ).to(self.device)
        pool.copy(source, target)

    @torch.inference_mode()
    def decode(
        self,
        rows: DecodeInputs,
        steps: int,
        chooser: Chooser,
        logprobs: bool,
        matchers: list | None = None,
        top: int = 0,
    ) -> tuple[list[list[int]], list[list[float]], tuple | None]:
        """`steps` decode steps of these rows without looking at the tokens on the host; returns
        each row's new tokens, their log-probs (zeros unless asked) and with `top` each step's
        `top` most likely alternatives (ids and log-probs, [row][step][k]). With `matchers`
        (rows' grammar matchers, engines/constraints.py) each step's logits are masked (on the
        host while the step runs) and its tokens read back for the matchers to consume, which
        the next step's masks need: the one sync a constrained step takes."""
        n = len(rows.lengths)
        size = decode_bucket(n, self.slots)
        longest = max(rows.lengths) + steps
        self.load_slots(rows, size)
        state = self._state
        chosen = torch.empty((n, steps), dtype=torch.int64, device=self.device)
        chosen_logprobs = torch.zeros((n, steps), dtype=torch.float32, device=self.device)
        if top:
            top_values = torch.zeros((n, steps, top), dtype=torch.float32, device=self.device)
            top_ids = torch.zeros((n, steps, top), dtype=torch.int64, device=self.device)
        started = time.perf_counter()
        for j in range(steps):
            logits = self.decode_step(size, longest)[:n]
            if matchers:
                mask_logits(logits, matchers, self.tokenizer, self.end_token)
            # keyed_uniform's noise for step s of a key is step 0's for key + s x its constant:
            # each row draws at its own step with the very function the reference engine uses
            keys = state.keys[:n] + state.steps[:n] * STEP_KEY
            tokens = choose_next_tokens(logits, chooser, keys, 0)
            chosen[:, j] = flag_nan(logits, tokens)  # the state takes the token itself
            if logprobs:
                chosen_logprobs[:, j] = _logprobs_of(logits, tokens)
            if top:
                top_values[:, j], top_ids[:, j] = top_alternatives(logits, top)
            state.advance(n, tokens)
            if matchers:
                consume_all(matchers, tokens.tolist())
        alternatives = (top_ids.tolist(), top_values.tolist()) if top else None
        out = chosen.tolist(), chosen_logprobs.tolist(), alternatives
        _count(self.counters, decode_seconds=time.perf_counter() - started, decode_steps=steps)
        _count(self.counters, decode_row_steps=n * steps, decode_slot_steps=size * steps)
        return out

    def load_slots(self, rows: DecodeInputs, size: int) -> None:
        """The first slots take these rows' next inputs; the rest up to `size` idle."""
        self._state.load(rows, size)

    def decode_step(self, size: int, longest: int) -> torch.Tensor:
        """Float32 logits [size, vocab] of one decode step of the loaded slots: a CUDA graph
        replay on a GPU, one graph per (slots, attention length) bucket, captured on first use.
        The attention length is bucketed because FlashAttention sizes its split-KV work from
        it: the pool's size there costs ~0.1 ms per layer per step (measured on an H100)."""
        kv_bucket = min(self._pool.tokens, max(MIN_KV_BUCKET, 1 << (longest - 1).bit_length()))
        if not self.use_graphs:
            return self._decode_logits(size, kv_bucket)
        key = (size, kv_bucket)
        if key not in self._graphs:
            self._graphs[key] = self._capture(size, kv_bucket)
        self._graphs[key].replay()
        return self._logits[:size]

    def _decode_logits(self, size: int, kv_bucket: int) -> torch.Tensor:
        """Logits of one decode step for the first `size` slots, written to a buffer at a fixed
        address; no row attends to more than kv_bucket tokens."""
        s = self._state
        packed = Packed(
            s.query_offsets[: size + 1],
            kv_bucket,
            self.decoder.scaling,
            self._pool,
            s.write[:size],
            decode=True,
            region_start=s.starts[: size + 1],
            used=s.used[:size],
            order=None if s.order is None else s.order[:size],
        )
        hidden = self._hidden(s.ids[:size], s.positions[:size], packed)
        out = self._logits[:size]
        out.copy_(self.model.get_output_embeddings()(hidden))
        return out

    def _capture(self, size: int, kv_bucket: int) -> torch.cuda.CUDAGraph:
        started = time.perf_counter()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up: kernels chosen and workspaces made before capture
                self._decode_logits(size, kv_bucket)
        torch.cuda.current_stream().wait_stream(stream)
        if self._graph_memory is None:
            self._graph_memory = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._graph_memory):
            self._decode_logits(size, kv_bucket)
        _count(self.counters, graph_captures=1, capture_seconds=time.perf_counter() - started)
        return graph


def gpu_slots() -> int:
    """Rows a decode step on a GPU holds at most: GPU_SLOTS, or BULKINFER_DECODE_SLOTS."""
    asked = os.environ.get(SLOTS_ENV, "")
    if not asked.isdigit() or not 8 <= int(asked) <= DECODE_BUCKETS[-1]:
        return GPU_SLOTS
    return int(asked)


def decode_bucket(rows: int, slots: int) -> int:
    """The slots a decode step of `rows` rows computes: the smallest bucket that holds them (one
    captured graph per bucket), at most the engine's `slots`."""
    return min(next(b for b in (*DECODE_BUCKETS, slots) if b >= rows), slots)


def forward_token_limit(config) -> int:
    """The most tokens a packed forward takes while its widest activation (the MLP's merged
    gate and up projection, or q/k/v) stays under 2^31 elements, in multiples of 4,096: 73,728
    on Llama-3.1-8B, 217,088 on Qwen2.5-0.5B. Fewer, larger forwards matter on small models,
    whose per-forward cost is a larger share (0.5B: 51.7% of peak at 65k-token forwards)."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    widest = max(
        2 * (getattr(config, "intermediate_size", None) or 4 * config.hidden_size),
        (heads + 2 * kv_heads) * head_dim,
        config.hidden_size,
    )
    return max(4096, (INDEX_LIMIT - 1) // widest // 4096 * 4096)


def forward_pieces(lengths: list[int], limit: int) -> list[tuple[int, int]]:
    """[a, b) ranges of consecutive sequences of at most `limit` tokens together (a longer
    sequence is a piece of its own)."""
    pieces, start, total = [], 0, 0
    for i, n in enumerate(lengths):
        if i > start and total + n > limit:
            pieces.append((start, i))
            start, total = i, 0
        total += n
    if start < len(lengths):
        pieces.append((start, len(lengths)))
    return pieces


def _within_tokens(members: list[int], sequences, budget: int) -> list[list[int]]:
    """`members` in consecutive parts whose sequences hold at most `budget` tokens together."""
    parts, part, held = [], [], 0
    for i in members:
        if part and held + len(sequences[i]) > budget:
            parts.append(part)
            part, held = [], 0
        part.append(i)
        held += len(sequences[i])
    return parts + ([part] if part else [])


def restarting_positions(lengths: np.ndarray) -> np.ndarray:
    """Positions of a packed row: 0.. again at the start of each sequence."""
    offsets = np.repeat(np.cumsum(lengths) - lengths, lengths)
    return np.arange(int(lengths.sum()), dtype=np.int64) - offsets


def pool_packed(hidden: torch.Tensor, offsets: np.ndarray, pooling: str, normalize: bool):
    """Float32 numpy [rows, dim] from packed hidden states [tokens, dim] whose rows start at
    `offsets`: mean over each row's tokens, its first token (cls) or its last."""
    starts = torch.from_numpy(offsets[:-1]).to(hidden.device)
    ends = torch.from_numpy(offsets[1:]).to(hidden.device)
    if pooling == "mean":
        rows = torch.repeat_interleave(
            torch.arange(len(starts), device=hidden.device), ends - starts
        )
        sums = torch.zeros((len(starts), hidden.shape[1]), device=hidden.device)
        pooled = sums.index_add_(0, rows, hidden) / (ends - starts)[:, None].float()
    elif pooling == "cls":
        pooled = hidden[starts]
    else:
        pooled = hidden[ends - 1]
    if normalize:
        pooled = torch.nn.functional.normalize(pooled, p=2, dim=-1)
    return pooled.cpu().numpy()


def _logprobs_of(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(token) under the model's own distribution, as the reference engine reports it."""
    return logits.log_softmax(-1).gather(-1, tokens[:, None]).squeeze(-1)


def _count(counters: dict[str, float], **amounts: float) -> None:
    for name, amount in amounts.items():
        counters[name] = counters.get(name, 0) + amount


def _int32(values: np.ndarray, device) -> torch.Tensor:
    return torch.from_numpy(np.asarray(values, dtype=np.int32)).to(device)

"""The reference engine: a Hugging Face model run with plain PyTorch on one device.

Two operations, the narrow interface every engine offers (as in lm-evaluation-harness):
`loglikelihood` for scoring and `generate` for decoding. The decode loop is written out
(prefill, then one token per step) so that sampling is keyed per row and reproducible whatever
batch a row lands in, which is what makes a resumed run equal an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from bulkinfer.configs import length_scaled_rope, recurrent_state, text_config
from bulkinfer.engines.base import GRAMMAR_FAILED, EngineLimits, LoadOptions, StreamUpdate
from bulkinfer.engines.constraints import (
    consume_all,
    end_token,
    failed,
    mask_logits,
    matcher,
)
from bulkinfer.engines.sampling import (
    RowSampling,
    SamplingParams,
    choose_next_tokens,
    nan_error,
    nan_rows,
    top_alternatives,
)
from bulkinfer.engines.stops import StopStrings
from bulkinfer.engines.to_device import move_model
from bulkinfer.errors import ModelError, SpecError, counted, did_you_mean, model_error
from bulkinfer.observe.progress import no_library_bars

# Models whose logits are not just lm_head(hidden): chunked scoring must not skip that step.
# Config keys naming a logit, an LM head or an output multiplier count too (falcon_h1's
# lm_head_multiplier, recurrent_gemma's logits_soft_cap), and a probe forward catches the rest.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier")
LOGIT_CHUNK_TOKENS = 2048
REPORT_EVERY = 8  # decode steps between reports of finished rows and tokens made


@dataclass(frozen=True)
class Generation:
    tokens: list[int]
    finish_reason: str
    # log p(token) of each generated token under the model (before temperature or top-p), when
    # asked for; None otherwise.
    logprobs: list[float] | None = None
    # per generated token, the most likely tokens and their log-probs (top_logprobs > 0)
    top_ids: list[list[int]] | None = None
    top_logprobs: list[list[float]] | None = None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(
            f"model.device is '{name}' but no CUDA GPU is visible; set model.device: auto or cpu"
        )
    if name.startswith("cuda:") and int(name[5:]) >= torch.cuda.device_count():
        raise ModelError(
            f"model.device is '{name}' but {counted(torch.cuda.device_count(), 'CUDA GPU')} "
            f"{'is' if torch.cuda.device_count() == 1 else 'are'} visible (numbered from 0)"
        )
    if name == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ModelError("model.device is 'mps' but this torch has no usable Apple GPU (MPS)")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({counted(torch.get_num_threads(), 'thread')})"


@contextlib.contextmanager
def _load_report_held():
    """transformers' LOAD REPORT (a table of the checkpoint's missing and unused weights, logged
    as a warning) held back while weights load: what matters of it bulkinfer says in one line
    (`refuse_missing`: a head the checkpoint lacks); unused weights (an LM head an embed job
    leaves out) are no problem. Yields the records held, for a load that fails to show."""
    held: list[logging.LogRecord] = []

    def hold(record: logging.LogRecord) -> bool:
        if "LOAD REPORT" in str(record.msg):
            held.append(record)
            return False
        return True

    # the logger transformers passes to its report (modeling_utils'), or the report's own
    loggers = [logging.getLogger(f"transformers.{name}") for name in REPORT_LOGGERS]
    for logger in loggers:
        logger.addFilter(hold)
    try:
        yield held
    finally:
        for logger in loggers:
            logger.removeFilter(hold)


REPORT_LOGGERS = ("modeling_utils", "utils.loading_report")


def refuse_unknown_attention(name: str | None) -> None:
    """A model.attn_implementation transformers does not know, said before any weights load (a
    kernel named from the Hugging Face hub, `org/name`, is transformers' to check)."""
    if name is None or "/" in name or name.startswith("paged|"):
        return
    try:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        known = ["eager", *ALL_ATTENTION_FUNCTIONS.valid_keys()]
    except (ImportError, AttributeError):  # another transformers: its loader says
        return
    if name not in known:
        raise SpecError(
            f"model.attn_implementation: {name!r} is not one this transformers knows "
            f"({', '.join(known)}){did_you_mean(name, known)}"
        )


def load_weights(
    auto_class, options: LoadOptions, beside_copy=None
) -> tuple[torch.nn.Module, set[str]]:
    """Load the weights in `options.folder` as `auto_class` (an Auto* class of transformers) on
    its device, in eval mode; also returns the names of weights the checkpoint lacked, which
    transformers would have initialised at random. `beside_copy`: see `move_model`."""
    device = resolve_device(options.device)
    try:
        with no_library_bars(), _load_report_held() as report:
            model, info = auto_class.from_pretrained(
                options.folder,
                dtype=resolve_dtype(options.dtype, device),
                trust_remote_code=options.trust_remote_code,
                use_safetensors=None if options.allow_pickle else True,
                # None lets transformers pick: SDPA where the architecture supports it.
                attn_implementation=options.attn_implementation,
                output_loading_info=True,
            )
    except Exception as exc:  # any loader failure here is a model the user must fix
        for record in report:  # the details transformers' error refers to ("the above report")
            logging.getLogger(record.name).handle(record)
        raise model_error(f"cannot load the weights of {options.label}", exc) from None
    move_model(model, device, beside_copy).eval()
    return model, set(info.get("missing_keys") or ())


class HFEngine:
    """A causal LM on one device, with padding handled and batch results in batch order."""

    def __init__(self, model, tokenizer, limits: EngineLimits):
        self.limits = limits
        self.model = model
        self.tokenizer = tokenizer
        self.device = model.device
        self.pad_id = _pad_id(tokenizer, model)
        self.eos_ids = _eos_ids(tokenizer, model)
        self.end_token = end_token(tokenizer, self.eos_ids)  # what a complete grammar allows
        self.counters: dict[str, float] = {}  # what the engine did (the fast engine counts)
        config = text_config(model.config)
        self._trunk = trunk(model)
        # transformers renamed `past_key_values` to `cache`; speak whichever this version takes.
        params = inspect.signature(model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self._dynamic_rotary = [m for m in model.modules() if hasattr(m, "original_max_seq_len")]
        self._long_rope_from = longrope_switch(config)
        self._recurrent = recurrent_state(config) is not None

    @functools.cached_property
    def _chunked_logits(self) -> bool:
        """Whether scores may come from the output embeddings applied to the trunk's hidden
        states a chunk of tokens at a time (head_gives_logits), probed when first asked: a job
        that never scores through transformers' forward (the fast engine's generation and
        scoring) runs no probe (two eager forwards: ~0.6 s of an 8B fp8 load on an H100)."""
        config = text_config(self.model.config)
        with torch.inference_mode():
            return not logit_transform_keys(config) and head_gives_logits(self.model)

    @torch.inference_mode()
    def loglikelihood(
        self, sequences: list[np.ndarray], score_from: list[int], share_prefix: int = 0
    ) -> list[tuple[float, int]]:
        """Sum of log p(token | earlier tokens) over tokens score_from.. of each sequence
        (every row computed whole here, whatever `share_prefix` says)."""
        self._fresh_rotary()
        lengths = [len(s) for s in sequences]
        input_ids = self._right_padded(sequences, self._unseen_fill())
        rows, positions = scored_positions(lengths, score_from)
        row_idx = torch.from_numpy(rows).to(self.device)
        pos_idx = torch.from_numpy(positions).to(self.device)
        targets = input_ids[row_idx, pos_idx + 1]
        token_logprobs = self._target_logprobs(input_ids, row_idx, pos_idx, targets)
        return per_row_totals(row_idx, token_logprobs, len(sequences))

    @torch.inference_mode()
    def loglikelihood_choices(
        self, contexts: list[np.ndarray], choices: list[list[np.ndarray]]
    ) -> list[list[tuple[float, int]]]:
        """Per context, the (sum of log-probs, token count) of each of its choices given it.

        The context runs once: all but its last token are prefilled into a KV cache, which is
        then repeated for each choice; each choice runs as (last context token + choice), so the
        first choice token is predicted from the full context like the rest. Where rows run
        alone (a rotary scaling by a call's length), so does each choice, whole."""
        if self.limits.rows_alone:
            return [
                [self.loglikelihood([np.concatenate([c, o])], [len(c)])[0] for o in options]
                for c, options in zip(contexts, choices, strict=True)
            ]
        if self._recurrent:  # its cache is no KV cache to repeat: each choice runs whole
            pairs = [(c, o) for c, options in zip(contexts, choices, strict=True) for o in options]
            whole = [np.concatenate([c, o]) for c, o in pairs]
            totals = iter(self.loglikelihood(whole, [len(c) for c, _ in pairs]))
            return [[next(totals) for _ in options] for options in choices]
        owners = [b for b, options in enumerate(choices) for _ in options]
        flat = [np.asarray(c) for options in choices for c in options]
        prefixes = [np.asarray(c[:-1]) for c in contexts]
        cache, prefix_mask = self._shared_prefix_cache(prefixes, owners)
        tails = [np.concatenate([contexts[b][-1:], c]) for b, c in zip(owners, flat, strict=True)]
        input_ids = self._right_padded(tails)
        tail_mask = torch.zeros_like(input_ids)
        for i, t in enumerate(tails):
            tail_mask[i, : len(t)] = 1
        start = torch.tensor([len(prefixes[b]) for b in owners], device=self.device)
        positions = start[:, None] + torch.arange(input_ids.shape[1], device=self.device)[None, :]
        row_idx = torch.from_numpy(np.repeat(np.arange(len(flat)), [len(c) for c in flat]))
        pos_idx = torch.from_numpy(np.concatenate([np.arange(len(c)) for c in flat]))
        row_idx, pos_idx = row_idx.to(self.device), pos_idx.to(self.device)
        targets = input_ids[row_idx, pos_idx + 1]
        inputs = {
            "input_ids": input_ids,
            "attention_mask": torch.cat([prefix_mask, tail_mask], dim=1),
            "position_ids": positions,
            "use_cache": True,
            self._cache_kwarg: cache,
        }
        if self._chunked_logits:
            hidden = self._trunk(**inputs).last_hidden_state
            token_logprobs = self._head_logprobs(hidden[row_idx, pos_idx], targets)
        else:
            logits = self.model(**inputs).logits[row_idx, pos_idx].float()
            token_logprobs = logits.log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)
        results: list[list[tuple[float, int]]] = [[] for _ in contexts]
        totals = per_row_totals(row_idx, token_logprobs, len(flat))
        for b, (total, count) in zip(owners, totals, strict=True):
            results[b].append((total, count))
        return results

    def _shared_prefix_cache(self, prefixes: list[np.ndarray], owners: list[int]):
        """Prefill the prefixes once (left-padded), then give each choice its owner's copy of
        the KV cache; returns the cache and its attention mask, one row per choice."""
        cache = full_cache()
        if not max(len(p) for p in prefixes):
            return cache, torch.zeros((len(owners), 0), dtype=torch.long, device=self.device)
        prefix_ids, prefix_mask = self._left_padded(prefixes)
        self._trunk(
            input_ids=prefix_ids,
            attention_mask=prefix_mask,
            position_ids=(prefix_mask.cumsum(-1) - 1).clamp(min=0),
            use_cache=True,
            **{self._cache_kwarg: cache},
        )
        select = torch.tensor(owners, device=self.device)
        cache.batch_select_indices(select)
        return cache, prefix_mask[select]

    def _head_logprobs(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Log-probs of the targets from final hidden states, a chunk of tokens at a time."""
        out = [
            self._chunk_logprobs(
                hidden[start : start + LOGIT_CHUNK_TOKENS],
                targets[start : start + LOGIT_CHUNK_TOKENS],
            )
            for start in range(0, len(hidden), LOGIT_CHUNK_TOKENS)
        ]
        return torch.cat(out) if out else torch.zeros(0, device=self.device)

    def _chunk_logprobs(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self.model.get_output_embeddings()(hidden).float()
        return logits.log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)

    def _target_logprobs(self, input_ids, row_idx, pos_idx, targets) -> torch.Tensor:
        """Log-probs of the targets, never holding float32 logits for more than a chunk of tokens."""
        if self._chunked_logits:
            hidden = self._trunk(input_ids=input_ids, use_cache=False).last_hidden_state
            return self._head_logprobs(hidden[row_idx, pos_idx], targets)
        logits = self.model(input_ids=input_ids, use_cache=False).logits[row_idx, pos_idx].float()
        return logits.log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)

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
        """Decode every prompt until EOS, a stop string or its own max_new tokens.

        `params` is one SamplingParams for the batch or one per row (temperature, top-p, top-k
        and stop strings then differ per row); `logprobs` adds each generated token's log-prob,
        `top_logprobs` its most likely alternatives."""
        done: dict[int, Generation] = {}
        decoding = self._decode(prompts, row_keys, params, max_new, logprobs, top_logprobs)
        for finished, _ in decoding:
            done.update(finished)
        return [done[i] for i in range(len(prompts))]

    @torch.inference_mode()  # a generator: the caller's inference mode does not reach it
    def _decode(self, prompts, row_keys, params, max_new, logprobs, top=0):
        """The decode loop of `generate`, reporting every REPORT_EVERY steps and at its end the
        rows finished meanwhile (by index) and the tokens made."""
        per_row = params if isinstance(params, list) else [params] * len(prompts)
        chooser = RowSampling.of(per_row, self.device) if isinstance(params, list) else params
        keys = torch.tensor(row_keys, dtype=torch.int64, device=self.device)
        rows = _DecodingRows(self, per_row, max_new, logprobs or top > 0, top)
        input_ids, mask = self._left_padded(prompts)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        self._fresh_rotary()
        cache = full_cache()
        logits = self._step(input_ids, mask, positions, cache)
        matchers = [matcher(self.tokenizer, p.grammar, self.end_token) for p in per_row]
        constrained = any(m is not None for m in matchers)
        for step in range(max(max_new)):
            if constrained:
                mask_logits(logits, matchers, self.tokenizer, self.end_token)
            tokens = rows.take(step, logits, choose_next_tokens(logits, chooser, keys, step))
            if constrained:  # a finished row's matcher takes no pad tokens (it would warn)
                done = rows.finished.tolist()
                matchers = [None if d else m for m, d in zip(matchers, done, strict=True)]
                consume_all(matchers, tokens.tolist())
                rows.fail([i for i, m in enumerate(matchers) if failed(m)])
            if rows.all_finished():
                break
            if (step + 1) % REPORT_EVERY == 0:
                yield rows.report()
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            # a finished row steps on with pad tokens whose outputs are dropped: its position
            # stays put, so it never runs past a learned position table (GPT-2's n_positions)
            # while the batch's longer rows go on
            positions = positions[:, -1:] + (~rows.finished[:, None]).long()
            switch = self._long_rope_from  # see longrope_switch
            if switch is not None and positions.max() == switch:
                ids = torch.cat([input_ids, rows.generated[:, : step + 1]], dim=1)
                cache = full_cache()
                whole = (mask.cumsum(-1) - 1).clamp(min=0)
                logits = self._step(ids, mask, whole, cache)
                continue
            logits = self._step(tokens[:, None], mask, positions, cache)
        yield rows.report()

    def generate_stream(self, groups) -> Iterator[StreamUpdate]:
        """Group after group, each run in calls of its `piece` sequences: the reference engine
        pads each call to its longest row, so it keeps no rows in flight between calls. Rows
        are reported every REPORT_EVERY steps as they finish."""
        for tag, requests in groups:
            if not len(requests):
                yield StreamUpdate(tag, {})
            offset = 0
            for piece in requests.pieces():
                updates = self._decode(
                    piece.prompts,
                    piece.keys,
                    piece.shared_params(),
                    piece.limits,
                    piece.logprobs,
                    piece.top_logprobs,
                )
                started = sum(len(p) for p in piece.prompts)  # reported with the first tokens
                for finished, tokens in updates:
                    done = {offset + i: g for i, g in finished.items()}
                    yield StreamUpdate(tag, done, tokens, started)
                    started = 0
                offset += len(piece)

    @torch.inference_mode()
    def embed(self, sequences: list[np.ndarray], pooling: str, normalize: bool) -> np.ndarray:
        """One vector per sequence from the model's final hidden states (after its last norm,
        what the LM head reads), right-padded in one forward."""
        from bulkinfer.engines.encoder import pool_padded, right_padded

        input_ids, mask = right_padded(sequences, self.pad_id, self.device)
        hidden = self._trunk(input_ids=input_ids, attention_mask=mask)
        return pool_padded(hidden.last_hidden_state, mask, pooling, normalize)

    def _fresh_rotary(self) -> None:
        """Dynamic rotary scaling as a freshly loaded model has it: transformers keeps the
        frequencies of the longest call so far, so a later, shorter row past the model's
        positions would run with another row's scaling."""
        for module in self._dynamic_rotary:
            for name in [k for k in vars(module) if k.endswith("max_seq_len_cached")]:
                prefix = name.removesuffix("max_seq_len_cached")
                original = getattr(module, f"{prefix}original_inv_freq", None)
                if original is None or getattr(module, name) == module.original_max_seq_len:
                    continue
                module.register_buffer(
                    f"{prefix}inv_freq", original.to(self.device).clone(), persistent=False
                )
                setattr(module, name, module.original_max_seq_len)

    def _step(self, input_ids, mask, positions, cache) -> torch.Tensor:
        out = self.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            **{self._cache_kwarg: cache},
            logits_to_keep=1,
        )
        return out.logits[:, -1].float()

    def _unseen_fill(self) -> int:
        """A token id for right padding no real position attends to (causal attention looks
        back only): any id but the config's pad token, whose presence at the end of a row
        makes transformers warn of a missing attention mask (GPT-2's forward does)."""
        return 1 if getattr(self.model.config, "pad_token_id", None) == 0 else 0

    def _right_padded(self, sequences: list[np.ndarray], fill: int | None = None) -> torch.Tensor:
        longest = max(len(s) for s in sequences)
        out = np.full((len(sequences), longest), self.pad_id if fill is None else fill, np.int64)
        for i, s in enumerate(sequences):
            out[i, : len(s)] = s
        return torch.from_numpy(out).to(self.device)

    def _left_padded(self, sequences: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        longest = max(len(s) for s in sequences)
        ids = np.full((len(sequences), longest), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(sequences), longest), dtype=np.int64)
        for i, s in enumerate(sequences):
            ids[i, longest - len(s) :] = s
            mask[i, longest - len(s) :] = 1
        return torch.from_numpy(ids).to(self.device), torch.from_numpy(mask).to(self.device)


class _DecodingRows:
    """The reference decode loop's per-row bookkeeping: tokens so far, counts, which rows
    finished (EOS, a stop string, their limit) and why."""

    def __init__(
        self, engine: HFEngine, per_row: list[SamplingParams], max_new, logprobs: bool, top: int
    ):
        batch, device = len(per_row), engine.device
        self.pad_id = engine.pad_id
        self.logprobs = logprobs
        self.top = top
        self.limits = torch.tensor(max_new, device=device)
        eos_ids = [] if per_row[0].ignore_eos else sorted(engine.eos_ids)
        self.eos = torch.tensor(eos_ids or [-1], device=device)
        self.generated = torch.full(
            (batch, max(max_new)), self.pad_id, dtype=torch.long, device=device
        )
        self.token_logprobs = torch.zeros(self.generated.shape, dtype=torch.float32, device=device)
        if top:
            shape = (*self.generated.shape, top)
            self.top_values = torch.zeros(shape, dtype=torch.float32, device=device)
            self.top_ids = torch.zeros(shape, dtype=torch.long, device=device)
        self.counts = torch.zeros(batch, dtype=torch.long, device=device)
        self.finished = torch.zeros(batch, dtype=torch.bool, device=device)
        self.stopped = torch.zeros_like(self.finished)
        self.nan = torch.zeros_like(self.finished)  # rows whose scores held a NaN
        self.failed = torch.zeros_like(self.finished)  # rows whose grammar matcher failed
        stops = [p.stop for p in per_row]
        self.stop_checker = StopStrings(stops, engine.tokenizer) if any(stops) else None
        self.steps = 0
        self.reported = torch.zeros_like(self.finished)
        self.tokens_reported = 0

    def take(self, step: int, logits: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        """Record step `step`'s chosen tokens (pad where a row has finished); returns them."""
        active = ~self.finished
        self.nan |= active & nan_rows(logits, chosen)
        next_tokens = torch.where(active, chosen, self.pad_id)
        if self.logprobs:
            picked = logits.log_softmax(-1).gather(-1, next_tokens[:, None]).squeeze(-1)
            self.token_logprobs[:, step] = picked
        if self.top:
            self.top_values[:, step], self.top_ids[:, step] = top_alternatives(logits, self.top)
        is_eos = torch.isin(next_tokens, self.eos) & active
        self.generated[:, step] = next_tokens
        self.counts += (active & ~is_eos).long()
        self.stopped |= is_eos
        self.finished |= is_eos | (self.limits <= step + 1)
        self.steps = step + 1
        if self.stop_checker is not None:
            hit = self.stop_checker.check(self.generated[:, : self.steps], self.counts, active)
            self.stopped |= hit
            self.finished |= hit
        return next_tokens

    def fail(self, index: list[int]) -> None:
        """End the rows whose grammar matcher failed (GRAMMAR_FAILED): their next tokens would
        not be kept to the format."""
        if index:
            self.failed[index] = True
            self.finished[index] = True

    def all_finished(self) -> bool:
        if self.nan.any():
            raise nan_error(int(self.nan.nonzero()[0, 0]), self.steps - 1)
        return bool(self.finished.all())

    def report(self) -> tuple[dict[int, Generation], int]:
        """The rows finished since the last report (every row once the loop has ended) and the
        tokens made since then."""
        ended = self.steps >= self.generated.shape[1] or self.all_finished()
        new = ~self.reported if ended else self.finished & ~self.reported
        index = new.nonzero().flatten().tolist()
        self.reported |= new
        made = int(self.counts.sum())
        made, self.tokens_reported = made - self.tokens_reported, made
        if not index:
            return {}, made
        rows = self.generated[index, : self.steps].tolist()
        lps = self.token_logprobs[index, : self.steps].tolist() if self.logprobs else None
        counts, stopped = self.counts[index].tolist(), self.stopped[index].tolist()
        failures = self.failed[index].tolist()
        top_ids = top_values = None
        if self.top:
            top_ids = self.top_ids[index, : self.steps].tolist()
            top_values = self.top_values[index, : self.steps].tolist()
        return {
            i: Generation(
                rows[k][: counts[k]],
                GRAMMAR_FAILED if failures[k] else "stop" if stopped[k] else "length",
                lps[k][: counts[k]] if self.logprobs else None,
                top_ids[k][: counts[k]] if self.top else None,
                top_values[k][: counts[k]] if self.top else None,
            )
            for k, i in enumerate(index)
        }, made


def scored_positions(lengths, score_from, offsets=None) -> tuple[np.ndarray, np.ndarray]:
    """(sequence, position) of every position whose next token is scored: tokens score_from..
    of each sequence, predicted from the position before; `offsets` shifts positions into a
    packed row."""
    rows, positions = [], []
    for b, (n, start) in enumerate(zip(lengths, score_from, strict=True)):
        pos = np.arange(max(start, 1) - 1, n - 1)
        if offsets is not None:
            pos = pos + offsets[b]
        rows.append(np.full(len(pos), b))
        positions.append(pos)
    return np.concatenate(rows), np.concatenate(positions)


def per_row_totals(
    row_idx: torch.Tensor, token_logprobs: torch.Tensor, n_rows: int
) -> list[tuple[float, int]]:
    """(sum of log-probs in float64, token count) of each row from its tokens' log-probs."""
    sums = torch.zeros(n_rows, dtype=torch.float64, device=token_logprobs.device)
    sums.index_add_(0, row_idx, token_logprobs.double())
    counts = torch.bincount(row_idx, minlength=n_rows)
    return list(zip(sums.tolist(), counts.tolist(), strict=True))


def trunk(model) -> torch.nn.Module:
    """The model's body under its LM head (what gives the last hidden states): transformers'
    base_model, or, where that is the model itself (Llama 4's text model names a prefix it has
    no module for), its `model`."""
    base = model.base_model
    inner = getattr(model, "model", None)
    if base is model and isinstance(inner, torch.nn.Module):
        return inner
    return base


def logit_transform_keys(config) -> list[str]:
    """The config's keys that change logits after the LM head (LOGIT_TRANSFORMS, or any number
    whose key names a logit, the LM head or an output multiplier)."""
    found = [k for k in LOGIT_TRANSFORMS if getattr(config, k, None)]
    for key, value in getattr(config, "__dict__", {}).items():
        if isinstance(value, bool) or not isinstance(value, int | float) or not value:
            continue
        name = key.lower()
        if "to_keep" in name:  # num_logits_to_keep: how many positions, not their values
            continue
        if "logit" in name or "lm_head" in name or name.startswith("output_mult"):
            found.append(key)
    return found


@torch.inference_mode()
def head_gives_logits(model) -> bool:
    """Whether the model's logits are its output embeddings applied to its base model's last
    hidden states (what chunked scoring computes), as one short forward of each shows; a
    model with its own head (ModernBERT's decoder: a dense layer and a norm before it) or
    whose forward cannot be probed is scored through its own forward."""
    try:
        vocab = model.get_output_embeddings().weight.shape[0]
        ids = (torch.arange(8, device=model.device) * 7919 % vocab)[None]
        whole = model(input_ids=ids, use_cache=False).logits.float()
        hidden = trunk(model)(input_ids=ids, use_cache=False).last_hidden_state
        head = model.get_output_embeddings()(hidden).float()
    except torch.OutOfMemoryError:  # asked by a batch: it splits and asks again
        raise
    except Exception:  # noqa: BLE001 (the model's own forward is the safe way)
        return False
    if whole.shape != head.shape:
        return False
    scale = max(1.0, float(whole.abs().max()))
    return bool(torch.allclose(whole, head, rtol=1e-3, atol=1e-3 * scale))


def longrope_switch(config) -> int | None:
    """The position from which a longrope model's rotary frequencies are its long ones, or None
    for other models. transformers picks them by a call's last position, so keys cached
    before a decode step reaches it were rotated by the short ones; as Phi-3's own generation
    does, the decode loop then computes the whole sequence again, and goes on as a forward of
    the whole text would."""
    if length_scaled_rope(config) != "longrope":
        return None
    for key in ("rope_parameters", "rope_scaling"):
        params = getattr(config, key, None)
        if isinstance(params, dict) and params.get("original_max_position_embeddings"):
            return int(params["original_max_position_embeddings"])
    found = getattr(config, "original_max_position_embeddings", None)
    return int(found) if found else None


def full_cache():
    """A KV cache that keeps every token: the model's own masks apply any attention window.
    transformers' cache for a config (`DynamicCache(config=...)`) drops keys past a
    `sliding_window` the config names even where the architecture's attention has none (a
    llama config with one): decoding then saw only the last window, and its tokens differed
    from the model's own forward."""
    from transformers import DynamicCache

    return DynamicCache()


def _pad_id(tokenizer, model) -> int:
    """The id padding is filled with (`pad_id_in_table`)."""
    generation = getattr(model, "generation_config", None)
    return pad_id_in_table(
        model,
        (tokenizer.pad_token_id, getattr(generation, "pad_token_id", None), tokenizer.eos_token_id),
    )


def pad_id_in_table(model, candidates) -> int:
    """The first of `candidates` that the embedding table has, else 0: a conversion that ships
    pad_token_id -1, or a tokenizer given a [PAD] past the table, made every padded batch
    fail, then run a row at a time."""
    try:
        rows = model.get_input_embeddings().num_embeddings
    except (AttributeError, NotImplementedError):  # remote code without the accessor
        rows = 2**62
    return next((c for c in candidates if _is_id(c) and c < rows), 0)


def _is_id(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _eos_ids(tokenizer, model) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if _is_id(source):
            ids.add(source)
        elif isinstance(source, list | tuple):
            ids.update(x for x in source if _is_id(x))  # ([2, null] in a hand-edited file)
    return ids

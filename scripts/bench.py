"""Throughput of bulkinfer against plain transformers, on the same prompts, in one process.

Random-weight models of real shapes (Qwen2.5-0.5B / 1.5B, Llama-3.1-8B) built from their public
configs, a word-level tokenizer whose every word is one token (so prompt lengths are exact), and
synthetic prompts with log-normal lengths. Measured per shape:

  score     plain model(...) in file order, batch 8  vs  bulkinfer's reference engine (sorted,
            padded token budget) and its fast engine (sorted, packed without padding)
  generate  model.generate in file order, batch 64, and generate_batch (default config)
            vs  bulkinfer's fast engine (continuous batching, CUDA-graph decode); the reference
            engine too with --reference-generate
  sharegpt  bulkinfer's fast engine alone on the Llama-3.1-8B shape, each row to its own drawn
            length
  runner    `bulkinfer run` end to end (--runner): throughput and the model's share of wall time
            from summary.json, on 16x the rows above by default; --runner-fp8 adds each job
            with fp8 weights (and KV cache), beside its bf16 row (scripts/bench_jobs.py runs
            the 8B ShareGPT-like and score jobs with any settings, fp8 among them)
  sampler   the per-step cost of each way of choosing tokens (--sampler-costs)

On a GPU:  python scripts/bench.py --runner --sampler-costs --out $OUT
           (about 10 minutes on an H200 with cold compile caches; split by --shapes,
           --sharegpt-shape "" and --runner-only where a call is limited)
On a CPU:  python scripts/bench.py --tiny   (a tiny model, a few prompts: checks it still runs)
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bulkinfer.engines import sampling  # noqa: E402
from bulkinfer.engines.fast import FastEngine  # noqa: E402
from bulkinfer.engines.hf import HFEngine, device_name  # noqa: E402
from bulkinfer.engines.memory import kv_bytes_per_token, memory_token_budget  # noqa: E402
from bulkinfer.engines.sampling import SamplingParams, row_key  # noqa: E402
from bulkinfer.engines.select import engine_around  # noqa: E402
from bulkinfer.io.readers import InputChunk  # noqa: E402
from bulkinfer.planner import TokenBudget, padding_fraction, plan_batches  # noqa: E402
from bulkinfer.prepare import prepare_rows, render_options  # noqa: E402
from bulkinfer.spec import TaskSpec  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # tiny_model

PEAK_BF16_FLOPS = 790e12  # H100/H200 dense bf16, as measured on the lent machines
PEAK_BYTES_PER_S = 3.0e12  # H100 device-to-device copy, as measured

SHAPES = {
    "qwen2.5-0.5b": dict(
        model_type="qwen2",
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        vocab_size=151936,
        max_position_embeddings=32768,
        rope_theta=1e6,
        tie_word_embeddings=True,
    ),
    "qwen2.5-1.5b": dict(
        model_type="qwen2",
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        vocab_size=151936,
        max_position_embeddings=32768,
        rope_theta=1e6,
        tie_word_embeddings=True,
    ),
    "llama-3.1-8b": dict(
        model_type="llama",
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=131072,
        rope_theta=5e5,
        tie_word_embeddings=False,
    ),
    "llama-3.1-70b": dict(  # fp8 only on one 141 GB GPU (140 GB of weights in bf16)
        model_type="llama",
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=131072,
        rope_theta=5e5,
        tie_word_embeddings=False,
    ),
    "tiny": dict(
        model_type="qwen2",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1000,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
    ),
}


def word_tokenizer(vocab: int):
    """Word-level tokenizer: 'w17 w3' is exactly the tokens [17, 3]; id 0 is end-of-sequence."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<eos>": 0, **{f"w{i}": i for i in range(1, vocab)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")


def build_model(shape: str, device: torch.device, dtype: torch.dtype):
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = dict(SHAPES[shape])
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    config.eos_token_id = config.pad_token_id = 0
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def lognormal_lengths(
    n: int, median: float, sigma: float, low: int, high: int, seed: int
) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(math.log(median), sigma, n), low, high).astype(np.int64)


def prompts_of(lengths: np.ndarray, vocab: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(1, vocab, int(n)).tolist() for n in lengths]


def as_text(ids: list[int]) -> str:
    return " ".join(f"w{i}" for i in ids)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_memory_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")


def reset_peak(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


# ---------------------------------------------------------------- baselines: plain transformers


@torch.inference_mode()
def baseline_score(model, prompts: list[list[int]], batch: int, device) -> dict:
    """File order, fixed batch, full logits, float32 log-softmax: the notebook loop."""
    sums, real, padded = [], 0, 0
    synchronize(device)
    start = time.perf_counter()
    try:
        for i in range(0, len(prompts), batch):
            rows = prompts[i : i + batch]
            longest = max(len(r) for r in rows)
            ids = torch.zeros(len(rows), longest, dtype=torch.long, device=device)
            mask = torch.zeros_like(ids)
            for j, r in enumerate(rows):
                ids[j, : len(r)] = torch.tensor(r)
                mask[j, : len(r)] = 1
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            lp = logits.log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1) * mask[:, 1:]
            sums.extend(lp.sum(-1).double().tolist())
            real += sum(len(r) for r in rows)
            padded += len(rows) * longest
    except torch.OutOfMemoryError:
        return {"error": f"out of memory at batch {batch}"}
    synchronize(device)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "tokens": real, "padding": 1 - real / padded, "sums": sums}


@torch.inference_mode()
def baseline_generate(model, prompts: list[list[int]], batch: int, new_tokens: int, device) -> dict:
    """model.generate in file order, fixed batch, left padding, every row to new_tokens."""
    outputs = []
    synchronize(device)
    start = time.perf_counter()
    try:
        for i in range(0, len(prompts), batch):
            rows = prompts[i : i + batch]
            longest = max(len(r) for r in rows)
            ids = torch.zeros(len(rows), longest, dtype=torch.long, device=device)
            mask = torch.zeros_like(ids)
            for j, r in enumerate(rows):
                ids[j, longest - len(r) :] = torch.tensor(r)
                mask[j, longest - len(r) :] = 1
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=0,
            )
            outputs.extend(out[:, longest:].tolist())
    except torch.OutOfMemoryError:
        return {"error": f"out of memory at batch {batch}"}
    synchronize(device)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "new_tokens": len(prompts) * new_tokens, "tokens": outputs}


def baseline_generate_batch(model, prompts: list[list[int]], new_tokens: int, device) -> dict:
    """transformers' continuous-batching generate_batch with its default configuration."""
    from transformers import GenerationConfig

    if not hasattr(model, "generate_batch"):
        return {"error": "generate_batch is not in this transformers"}
    config = GenerationConfig(
        max_new_tokens=new_tokens, do_sample=False, eos_token_id=-1, pad_token_id=0
    )
    synchronize(device)
    start = time.perf_counter()
    try:
        results = model.generate_batch(inputs=prompts, generation_config=config, progress_bar=False)
    except Exception as exc:  # a baseline that fails is reported, not fatal to the benchmark
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"}
    synchronize(device)
    seconds = time.perf_counter() - start
    produced = sum(len(r.generated_tokens) for r in results.values())
    if produced == 0:
        return {"error": "generate_batch produced no tokens (its log says why)"}
    return {"seconds": seconds, "new_tokens": produced}


# ---------------------------------------------------------------- bulkinfer


def bulk_prepare(tokenizer, prompts: list[list[int]], task: TaskSpec):
    chunk = InputChunk(
        "bench", 0, [as_text(p) for p in prompts], None, None, _no_columns(len(prompts)), None
    )
    options = render_options(task, tokenizer, None, has_completion=False)
    start = time.perf_counter()
    prepared = prepare_rows([chunk], tokenizer, options)
    return prepared, time.perf_counter() - start


def _no_columns(n: int):
    import pyarrow as pa

    return pa.table({"_": pa.nulls(n)}).drop(["_"])


@torch.inference_mode()
def bulk_score(engine: HFEngine, prepared, budget: TokenBudget, packed: bool) -> dict:
    batches = plan_batches(prepared.runnable_rows(), prepared.lengths, budget)
    sums = np.zeros(prepared.num_rows)
    synchronize(engine.device)
    start = time.perf_counter()
    for batch in batches:
        rows = batch.rows
        results = engine.loglikelihood([prepared.tokens(int(r)) for r in rows], [1] * len(rows))
        sums[rows] = [s for s, _ in results]
    synchronize(engine.device)
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "tokens": int(prepared.lengths.sum()),
        "padding": 0.0 if packed else padding_fraction(batches),
        "batches": len(batches),
        "sums": sums.tolist(),
    }


@torch.inference_mode()
def decode_step_costs(fast: FastEngine, context: int, device) -> list[dict]:
    """Milliseconds per decode step for each slot bucket, every row attending to `context`
    cached tokens: CUDA-graph replay of the fused (compiled) and the unfused (eager) forward,
    and the fused one without a graph at the largest bucket (what graphs save)."""
    from bulkinfer.engines.decoder import Decoder
    from bulkinfer.engines.fast import DECODE_BUCKETS
    from bulkinfer.engines.kv import DecodeInputs

    pool_tokens = fast.reserve(fast.slots * (context + 1))
    sizes = [b for b in DECODE_BUCKETS if b <= fast.slots and b * (context + 1) < pool_tokens]
    fused = fast.decoder
    variants = [("fused", fused, True), ("unfused", Decoder(fast.model, None), True)]
    out = []
    for size in sizes:
        rows = DecodeInputs(
            last_tokens=[1] * size,
            lengths=[context + 1] * size,
            starts=[1 + i * (context + 1) for i in range(size)],
            keys=[0] * size,
            generated=[1] * size,
        )
        fast.load_slots(rows, size)
        extra = [("fused", fused, False)] if size == sizes[-1] else []
        for name, decoder, graphs in variants + extra:
            fast.decoder, fast.use_graphs = decoder, graphs and device.type == "cuda"
            fast.drop_graphs()
            fast.decode_step(size, context + 1)
            synchronize(device)
            start = time.perf_counter()
            for _ in range(10):
                fast.decode_step(size, context + 1)
            synchronize(device)
            ms = (time.perf_counter() - start) / 10 * 1e3
            out.append(
                {
                    "slots": size,
                    "forward": name,
                    "graph": fast.use_graphs,
                    "ms": ms,
                    "tok_s": size / ms * 1e3,
                }
            )
    fast.decoder, fast.use_graphs = fused, device.type == "cuda"
    fast.drop_graphs()
    return out


def zipf_logits(rows: int, vocab: int, device, seed: int = 0) -> torch.Tensor:
    """Logits shaped like a trained model's: log-probabilities falling as rank^-a (a per row in
    [1.1, 1.6]) over a shuffled vocabulary. At temperature 0.8 the top-p 0.95 nucleus is tens to
    a few hundred tokens, as for real models; random-weight models are nearly flat instead."""
    gen = torch.Generator().manual_seed(seed)
    slopes = 1.1 + 0.5 * torch.rand(rows, 1, generator=gen)
    ranks = torch.arange(1, vocab + 1, dtype=torch.float32).log()
    logits = -slopes * ranks[None, :]
    order = torch.rand(rows, vocab, generator=gen).argsort(-1)
    return logits.gather(-1, order).to(device)


@torch.inference_mode()
def sampler_costs(vocab: int, device, rows: int = 512, steps: int = 20) -> dict:
    """Milliseconds per step of choosing tokens for `rows` rows, each way of choosing timed on
    the same logits; and whether the compiled draw picks the eager draw's tokens."""
    logits = zipf_logits(rows, vocab, device)
    keys = torch.arange(rows, dtype=torch.int64, device=device) * 7919 + 1
    constants = sampling.hash_constants(device)

    def per_step(choose) -> float:
        choose(0)
        synchronize(device)
        start = time.perf_counter()
        for step in range(steps):
            choose(step)
        synchronize(device)
        return (time.perf_counter() - start) / steps * 1e3

    greedy = SamplingParams(1)
    warm = SamplingParams(1, temperature=0.8)
    nucleus = SamplingParams(1, temperature=0.8, top_p=0.95)
    out = {"rows": rows, "vocab": vocab}
    out["greedy_ms"] = per_step(lambda i: sampling.choose_next_tokens(logits, greedy, keys, i))
    out["t0.8_ms"] = per_step(lambda i: sampling.choose_next_tokens(logits, warm, keys, i))
    out["t0.8_eager_ms"] = per_step(
        lambda i: sampling.gumbel_argmax(logits / 0.8, keys + i * constants[0], constants)
    )
    out["t0.8_top_p_ms"] = per_step(lambda i: sampling.choose_next_tokens(logits, nucleus, keys, i))
    candidates = sampling.TOP_P_CANDIDATES
    sampling.TOP_P_CANDIDATES = vocab  # every row sorted whole, as before the candidates
    try:
        out["t0.8_top_p_full_sort_ms"] = per_step(
            lambda i: sampling.choose_next_tokens(logits, nucleus, keys, i)
        )
    finally:
        sampling.TOP_P_CANDIDATES = candidates
    draw = sampling._noise_argmax_for(device)
    same = total = 0
    for step in range(steps):
        k = keys + step * constants[0]
        ours = draw(logits / 0.8, k, constants)
        eager = sampling.gumbel_argmax(logits / 0.8, k, constants)
        same += int((ours == eager).sum())
        total += rows
    out["compiled_equals_eager"] = f"{same}/{total}"
    return out


def release_pool(fast: FastEngine) -> None:
    """Give the KV pool's memory back (the next generate call allocates it again)."""
    fast.release_pool()
    reset_peak(fast.device)


@torch.inference_mode()
def warm_up(fast: FastEngine) -> float:
    """Seconds of the first calls, which compile the fused forward (once per process; a job
    pays it once, so the timed sections start after it)."""
    rng = np.random.default_rng(0)
    seqs = [rng.integers(1, 100, int(n)) for n in (5, 40, 300)]
    synchronize(fast.device)
    start = time.perf_counter()
    fast.loglikelihood(seqs, [1] * 3)  # decode steps run the same compiled functions
    # the sampler's fused draw compiles on its first use; a job pays that once too
    fast.generate(seqs, [1, 2, 3], SamplingParams(2, temperature=0.8, ignore_eos=True), [2] * 3)
    synchronize(fast.device)
    return time.perf_counter() - start


@torch.inference_mode()
def bulk_generate(
    engine: HFEngine,
    prepared,
    budget: TokenBudget,
    new_tokens: np.ndarray,
    temperature: float = 0.0,
    top_p: float = 1.0,
) -> dict:
    batches = plan_batches(prepared.runnable_rows(), prepared.lengths, budget)
    params = SamplingParams(
        int(new_tokens.max()), temperature=temperature, top_p=top_p, ignore_eos=True
    )
    outputs: dict[int, list[int]] = {}
    produced = 0
    getattr(engine, "counters", {}).clear()
    synchronize(engine.device)
    start = time.perf_counter()
    for batch in batches:
        rows = [int(r) for r in batch.rows]
        gens = engine.generate(
            [prepared.tokens(r) for r in rows],
            [row_key(0, r) for r in rows],
            params,
            [int(new_tokens[r]) for r in rows],
        )
        for r, g in zip(rows, gens, strict=True):
            outputs[r] = g.tokens
            produced += len(g.tokens)
    synchronize(engine.device)
    seconds = time.perf_counter() - start
    mean_batch = np.mean([len(b.rows) for b in batches])
    return {
        "seconds": seconds,
        "new_tokens": produced,
        # the fast engine prefills packed and decodes one token per row: no padding
        "padding": padding_fraction(batches) if engine.limits.pads else 0.0,
        "batches": len(batches),
        "mean_batch": float(mean_batch),
        "tokens": [outputs[r] for r in range(prepared.num_rows)],
    }


# ---------------------------------------------------------------- the benchmark


def score_section(shape, model, tokenizer, engine, fast, args, device) -> list[dict]:
    n = args.score_prompts
    lengths = lognormal_lengths(n, args.median, 0.9, 8, args.max_len, seed=1)
    prompts = prompts_of(lengths, model.config.vocab_size, seed=2)
    params = model.num_parameters()
    rows = []
    # the warm-up's KV pool would leave the plain loop no room (it ran out of memory at batch 8
    # behind it on an 8B model): every baseline measures with the pool given back
    release_pool(fast)
    base = baseline_score(model, prompts, 8, device)
    rows.append(_score_row(shape, "plain model(), file order, batch 8", base, params, device))
    reset_peak(device)
    prepared, tok_seconds = bulk_prepare(tokenizer, prompts, TaskSpec(type="score"))
    budget = TokenBudget(args.max_tokens or _auto(model, device, generate=False), 4096, 0, 0.1)
    for name, eng, packed in (("reference", engine, False), ("fast", fast, True)):
        reset_peak(device)
        # packed batches carry no padding, so the padding cap has nothing to cut
        plan_budget = TokenBudget(budget.max_tokens, 4096, 0, 1.0) if packed else budget
        first = None
        if packed:
            # a batch past 2^31 elements in a fused kernel recompiles it with 64-bit indexing
            # (once per process, ~1.5 s on a cold compile cache, seen on an H200): untimed pass
            first = bulk_score(eng, prepared, plan_budget, packed)["seconds"]
        ours = bulk_score(eng, prepared, plan_budget, packed)
        label = "packed, no padding" if packed else "sorted, padded"
        row = _score_row(
            shape, f"bulkinfer {name}, {label}, {budget.max_tokens:,}", ours, params, device
        )
        row["tokenize_seconds"] = tok_seconds
        if first is not None:
            row["first_pass_seconds"] = first
        if "sums" in base:
            a, b = np.asarray(base["sums"]), np.asarray(ours["sums"])
            rel = np.abs(a - b) / np.maximum(np.abs(a), 1e-9)
            row["max_rel_diff_vs_plain"] = float(np.max(rel))
            row["x_plain"] = row["tokens_per_s"] / rows[0]["tokens_per_s"]
        rows.append(row)
    return rows


def _score_row(shape, name, result, params, device) -> dict:
    if "error" in result:
        return {"shape": shape, "work": "score", "path": name, "error": result["error"]}
    tps = result["tokens"] / result["seconds"]
    return {
        "shape": shape,
        "work": "score",
        "path": name,
        "tokens_per_s": tps,
        "padding": result["padding"],
        "peak_fraction": 2 * params * tps / PEAK_BF16_FLOPS,
        "peak_gib": peak_memory_gib(device),
        "seconds": result["seconds"],
    }


def generate_section(shape, model, tokenizer, engine, fast, args, device) -> list[dict]:
    n, new = args.generate_prompts, args.new_tokens
    lengths = lognormal_lengths(n, args.median, 0.9, 8, args.max_len, seed=3)
    prompts = prompts_of(lengths, model.config.vocab_size, seed=4)
    few = args.baseline_prompts or n  # the slow baselines may run on the first rows only
    rows = []
    release_pool(fast)  # the baselines measure with the fast engine's KV pool given back
    base = baseline_generate(model, prompts[:few], 64, new, device)
    label = "model.generate, file order, batch 64" + (f", first {few}" if few < n else "")
    rows.append(_gen_row(shape, label, base, model, lengths[:few], 64, device))
    if not args.skip_generate_batch:
        reset_peak(device)
        cb = baseline_generate_batch(model, prompts[:few], new, device)
        label = "generate_batch, default config" + (f", first {few}" if few < n else "")
        rows.append(_gen_row(shape, label, cb, model, lengths[:few], 64, device))
        # generate_batch's manager may keep threads and memory: measured after the others
    prepared, _ = bulk_prepare(tokenizer, prompts, TaskSpec(type="generate", max_new_tokens=new))
    limits = np.full(n, new)
    paths = [("fast", fast, TokenBudget(1 << 40, 1 << 20, new, 1.0))]
    if args.reference_generate:
        budget = TokenBudget(args.max_tokens or _auto(model, device, generate=True), 256, new, 0.1)
        paths.insert(0, ("reference", engine, budget))
    for name, eng, budget in paths:
        reset_peak(device)
        ours = bulk_generate(eng, prepared, budget, limits)
        batch = min(ours["mean_batch"], eng.limits.slots or ours["mean_batch"])
        label = "continuous batching" if name == "fast" else "sorted, batch <= 256"
        row = _gen_row(shape, f"bulkinfer {name}, {label}", ours, model, lengths, batch, device)
        _compare_generations(row, rows, base, ours, few, new)
        row["teacher_forced"] = teacher_forced_agreement(model, prompts, ours["tokens"])
        row["engine_counters"] = dict(getattr(eng, "counters", {}))
        print(shape, name, "teacher-forced:", row["teacher_forced"], row["engine_counters"])
        rows.append(row)
    # sampling draws keyed noise over the whole vocabulary and top-p looks for the nucleus:
    # work over [slots x vocab] each step that greedy decoding never pays. The random weights'
    # flat logits put most of the vocabulary in a top-p nucleus, the worst case (every row
    # sorted whole); trained models' nuclei sit among the candidates (see sampler_costs)
    for temperature, top_p in ((0.8, 1.0), (0.8, 0.95)):
        reset_peak(device)
        sampled = bulk_generate(fast, prepared, paths[-1][2], limits, temperature, top_p)
        label = f"bulkinfer fast, sampled, T {temperature}" + (
            f", top-p {top_p} (flat logits)" if top_p < 1 else ""
        )
        row = _gen_row(shape, label, sampled, model, lengths, fast.slots, device)
        _compare_generations(row, rows, {}, sampled, few, new)  # ratios only: not greedy
        row["engine_counters"] = dict(fast.counters)
        rows.append(row)
    return rows


@torch.inference_mode()
def teacher_forced_agreement(model, prompts, generations, rows: int = 64, k: int = 32) -> dict:
    """Replay each generated row through plain model() and check that every one of its first k
    greedy tokens is the argmax there. Exact equality with model.generate breaks at the first
    near-tie that bf16 rounding flips (random weights give flat logits, so ties are common);
    this check stays meaningful: a wrong cache or position would pick non-argmax tokens."""
    equal, total, gaps = 0, 0, []
    for prompt, gen in list(zip(prompts, generations, strict=False))[:rows]:
        gen = gen[:k]
        if not gen:
            continue
        ids = torch.tensor([list(prompt) + list(gen)], device=model.device)
        logits = model(input_ids=ids).logits[0, len(prompt) - 1 : len(prompt) - 1 + len(gen)]
        logits = logits.float()
        chosen = logits.gather(-1, torch.tensor(gen, device=ids.device)[:, None]).squeeze(-1)
        best = logits.max(-1).values
        equal += int((chosen == best).sum())
        total += len(gen)
        gaps.append(float((best - chosen).max()))
    spread = float(logits.std())
    return {
        "argmax_share": equal / max(total, 1),
        "largest_gap": max(gaps, default=0.0),
        "logit_std": spread,
    }


def _compare_generations(row, baselines, base, ours, few, new) -> None:
    """Greedy agreement with model.generate on the rows both ran, and speed ratios."""
    if "tokens" in base:
        k = min(32, new)
        pairs = zip(base["tokens"], ours["tokens"][:few], strict=True)
        row["first_32_equal_vs_generate"] = sum(a[:k] == b[:k] for a, b in pairs) / few
    for b in baselines:
        if "tokens_per_s" in b and b["path"].startswith("model.generate"):
            row["x_plain"] = row["tokens_per_s"] / b["tokens_per_s"]
        if "tokens_per_s" in b and b["path"].startswith("generate_batch"):
            row["x_generate_batch"] = row["tokens_per_s"] / b["tokens_per_s"]


def sharegpt_section(shape, model, tokenizer, fast, args, device) -> list[dict]:
    n = args.sharegpt_prompts
    prompt_lengths = lognormal_lengths(n, 180, 1.0, 4, 1500, seed=5)
    answer_lengths = lognormal_lengths(n, 150, 0.9, 20, 1500, seed=6)
    prompts = prompts_of(prompt_lengths, model.config.vocab_size, seed=7)
    reset_peak(device)
    prepared, _ = bulk_prepare(tokenizer, prompts, TaskSpec(type="generate", max_new_tokens=1500))
    budget = TokenBudget(1 << 40, 1 << 20, int(answer_lengths.max()), 1.0)
    ours = bulk_generate(fast, prepared, budget, answer_lengths)
    batch = min(ours["mean_batch"], fast.slots)
    name = "bulkinfer fast, ShareGPT-like lengths"
    row = _gen_row(shape, name, ours, model, prompt_lengths, batch, device)
    row["published_sglang_x"] = row["tokens_per_s"] / 16200
    row["teacher_forced"] = teacher_forced_agreement(model, prompts, ours["tokens"], rows=16)
    row["engine_counters"] = dict(fast.counters)
    print(shape, "teacher-forced:", row["teacher_forced"], row["engine_counters"], flush=True)
    return [row]


def runner_section(shape, model, args, device) -> list[dict]:
    """`bulkinfer run` end to end on the same kind of prompts (model saved to disk and loaded
    back, JSONL in, Parquet out): what summary.json says about throughput and the model's share
    of wall time."""
    import tempfile

    from bulkinfer.job.runner import run_job
    from bulkinfer.spec import load_spec

    out = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        model.save_pretrained(folder)
        # transformers maps a qwen2 folder to its own tokenizer class, which would re-split the
        # word tokenizer's text; the byte-level BPE of the tiny test models survives that
        from tiny_model import train_tokenizer

        train_tokenizer().save_pretrained(folder)
        words = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "and", "then"]
        # with --runner-fp8 each job runs again with fp8 weights (and an fp8 KV cache when
        # generating), in the same call as its bf16 row
        variants = [None, "fp8"] if args.runner_fp8 else [None]
        for (work, n, new), variant in (
            (job, variant)
            for job in (
                ("score", args.score_prompts * args.runner_scale, 0),
                ("generate", args.generate_prompts * args.runner_scale, args.new_tokens),
            )
            for variant in variants
        ):
            lengths = lognormal_lengths(n, args.median, 0.9, 8, args.max_len, seed=11)
            prompts = prompts_of(lengths, model.config.vocab_size, seed=12)
            data = Path(tmp) / f"{work}.jsonl"
            texts = [" ".join(words[i % len(words)] for i in p) for p in prompts]
            data.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
            task = {"type": work, "chat_template": "never"}
            if new:
                task["max_new_tokens"] = new  # EOS (id 0) is 1 in 152k per step here
            model_keys = {"path": str(folder), "device": device.type}
            if variant == "fp8":
                model_keys.update(engine="fast", quantization="fp8")
                if new:
                    model_keys["kv_cache_dtype"] = "fp8"
            spec = load_spec(
                None,
                data={
                    "model": model_keys,
                    "input": {"path": str(data)},
                    "output": {"path": str(Path(tmp) / f"out_{work}_{variant or 'bf16'}")},
                    "task": task,
                },
            )
            reset_peak(device)
            start = time.perf_counter()
            run_job(spec)
            seconds = time.perf_counter() - start
            summary_file = Path(tmp) / f"out_{work}_{variant or 'bf16'}" / "summary.json"
            summary = json.loads(summary_file.read_text())
            tokens = summary["output_tokens"] if new else summary["input_tokens"]
            out.append(
                {
                    "shape": shape,
                    "work": work,
                    "path": f"bulkinfer run ({summary.get('engine')}"
                    + (", fp8 weights" + (" and KV" if new else "") if variant else "")
                    + "), CLI end to end",
                    "tokens_per_s": tokens / seconds,
                    "padding": summary["padding_fraction"],
                    "peak_gib": peak_memory_gib(device),
                    "model_share_of_wall": summary["model_share_of_wall"],
                    "summary": summary,
                }
            )
            print(shape, work, variant or "", "summary:", json.dumps(summary), flush=True)
    return out


def _gen_row(shape, name, result, model, prompt_lengths, batch, device) -> dict:
    if "error" in result:
        return {"shape": shape, "work": "generate", "path": name, "error": result["error"]}
    tps = result["new_tokens"] / result["seconds"]
    weights = model.num_parameters() * 2
    kv = kv_bytes_per_token(model.config, 2)  # bf16
    context = float(np.mean(prompt_lengths)) + 64
    roofline = batch / ((weights + batch * context * kv) / PEAK_BYTES_PER_S)
    return {
        "shape": shape,
        "work": "generate",
        "path": name,
        "tokens_per_s": tps,
        "padding": result.get("padding", float("nan")),
        "roofline_fraction": tps / roofline,
        "peak_gib": peak_memory_gib(device),
        "seconds": result["seconds"],
    }


def _auto(model, device, generate: bool) -> int:
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
    return memory_token_budget(model.config, model.dtype.itemsize, free, generate)


def setup_row(shape: str, fast: FastEngine) -> dict:
    seconds = warm_up(fast)
    compiled = fast.decoder is not None and fast.decoder.compiled
    print(f"{shape}: first calls (compiling: {compiled}) took {seconds:.1f} s", flush=True)
    return {"shape": shape, "work": "setup", "first_call_seconds": seconds, "compiled": compiled}


@torch.inference_mode()
def greedy_agreement(shape: str, args, device, dtype: torch.dtype, rows=64, k=32) -> dict:
    """Greedy tokens of the fast engine against model.generate (batch 64), both in `dtype`: the
    share of rows whose first k tokens are all equal, the share of tokens before each row's
    first difference, and the largest relative score difference against plain model().

    In float32 (TF32 off) rounding cannot flip near-ties. In bf16 it does, and the random
    weights' logits are near-flat (the top token leads the next by ~0.2 of their spread), so the
    same comparison is made between model.generate at batch 16 and at batch 64: how often
    transformers disagrees with itself when only the batch (and so the kernels' sizes and
    padding) changes is the floor against which the fast engine's figure is read."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model = build_model(shape, device, dtype)
    tokenizer = word_tokenizer(model.config.vocab_size)
    fast = engine_around(model, tokenizer, "fast")
    lengths = lognormal_lengths(rows, args.median, 0.9, 8, min(args.max_len, 1024), seed=13)
    prompts = prompts_of(lengths, model.config.vocab_size, seed=14)
    spread = logit_spread(model, prompts[:8], device)
    plain = baseline_generate(model, prompts, rows, k, device)["tokens"]
    ours = fast.generate(
        [np.asarray(p) for p in prompts],
        list(range(rows)),
        SamplingParams(k, ignore_eos=True),
        [k] * rows,
    )
    out = {"shape": shape, "work": f"{str(dtype).removeprefix('torch.')}_check", **spread}
    out.update(rows=rows, first_tokens=k, **_agreement(plain, [g.tokens for g in ours], k))
    if dtype != torch.float32:
        small_batches = baseline_generate(model, prompts, 16, k, device)["tokens"]
        out["plain_batch_16_vs_64"] = _agreement(plain, small_batches, k)
    base = baseline_score(model, prompts, 8, device)["sums"]
    scored = fast.loglikelihood([np.asarray(p) for p in prompts], [1] * rows)
    rel = max(abs(a - b) / max(abs(a), 1e-9) for a, (b, _) in zip(base, scored, strict=True))
    out["score_max_rel_diff"] = rel
    torch.backends.cuda.matmul.allow_tf32 = True
    del model, fast
    reset_peak(device)
    return out


def _agreement(ours: list[list[int]], theirs: list[list[int]], k: int) -> dict:
    pairs = [(a[:k], b[:k]) for a, b in zip(ours, theirs, strict=True)]
    before = [
        next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), k) for a, b in pairs
    ]
    return {
        "rows_all_equal": sum(a == b for a, b in pairs) / len(pairs),
        "tokens_before_first_difference": float(np.mean(before)) / k,
    }


def logit_spread(model, prompts: list[list[int]], device) -> dict:
    """The next-token logits' standard deviation and the lead of the top token over the second,
    averaged over a few prompts' last positions."""
    stds, leads = [], []
    for p in prompts:
        logits = model(torch.tensor([p], device=device)).logits[0, -1].float()
        top = logits.topk(2).values
        stds.append(float(logits.std()))
        leads.append(float(top[0] - top[1]))
    return {"logit_std": float(np.mean(stds)), "top1_lead": float(np.mean(leads))}


def print_table(rows: list[dict]) -> None:
    """tok/s, padding, fraction of peak FLOP/s (score) or of the decode roofline (generate),
    peak GPU memory, ratios to plain model()/model.generate and to generate_batch, and the
    agreement with the plain path (score: max relative difference; generate: share of the first
    32 greedy tokens of 64 rows that are plain model()'s argmax, teacher-forced)."""
    header = (
        f"{'shape':<14}{'work':<10}{'path':<56}{'tok/s':>10}{'pad':>7}{'peak%':>7}{'GiB':>7}"
        f"{'x plain':>9}{'x gen_b':>9}{'agree':>10}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        if r["work"] in ("step_costs", "sampler_costs", "setup") or r["work"].endswith("_check"):
            continue
        if "error" in r:
            print(f"{r['shape']:<14}{r['work']:<10}{r['path']:<56}  {r['error']}")
            continue
        frac = r.get("peak_fraction", r.get("roofline_fraction", float("nan")))
        ratios = "".join(
            f"{r[k]:>9.2f}" if k in r else " " * 9 for k in ("x_plain", "x_generate_batch")
        )
        agree = ""
        if "max_rel_diff_vs_plain" in r:
            agree = f"{r['max_rel_diff_vs_plain']:.1e}"
        elif "model_share_of_wall" in r:
            agree = f"gpu {r['model_share_of_wall']:.0%}"
        elif "teacher_forced" in r:
            agree = f"tf {r['teacher_forced']['argmax_share']:.1%}"
        print(
            f"{r['shape']:<14}{r['work']:<10}{r['path']:<56}{r['tokens_per_s']:>10,.0f}"
            f"{r['padding']:>7.1%}{frac:>7.1%}{r['peak_gib']:>7.1f}{ratios}{agree:>10}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="CPU check: tiny model, few prompts")
    parser.add_argument("--shapes", default="qwen2.5-0.5b,qwen2.5-1.5b")
    parser.add_argument("--sharegpt-shape", default="llama-3.1-8b")
    parser.add_argument("--score-prompts", type=int, default=2000)
    parser.add_argument("--generate-prompts", type=int, default=512)
    parser.add_argument("--sharegpt-prompts", type=int, default=1000)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--median", type=float, default=150)
    parser.add_argument("--max-len", type=int, default=2048)
    parser.add_argument("--max-tokens", type=int, default=0, help="token budget (0: auto)")
    parser.add_argument("--skip-generate-batch", action="store_true")
    parser.add_argument(
        "--baseline-prompts", type=int, default=0, help="rows for the generate baselines (0: all)"
    )
    parser.add_argument("--reference-generate", action="store_true", help="also time HFEngine")
    parser.add_argument("--step-costs", action="store_true", help="time decode steps per bucket")
    parser.add_argument(
        "--sampler-costs", action="store_true", help="time choosing tokens, each way, per step"
    )
    parser.add_argument("--runner", action="store_true", help="also `bulkinfer run` end to end")
    parser.add_argument(
        "--runner-scale",
        type=int,
        default=16,
        help="x rows for --runner: a job of the benchmark's 2,000 prompts is ~1 s of GPU work, "
        "shorter than loading the weights; 16x is a job of half a minute",
    )
    parser.add_argument("--runner-only", action="store_true", help="no sections but --runner")
    parser.add_argument(
        "--runner-fp8",
        action="store_true",
        help="--runner also with model.quantization: fp8 (and kv_cache_dtype: fp8 generating)",
    )
    parser.add_argument("--skip-generate", action="store_true", help="score sections only")
    parser.add_argument(
        "--float32-check",
        default="qwen2.5-0.5b",
        help="shapes whose fast-engine greedy tokens are compared with model.generate in float32",
    )
    parser.add_argument(
        "--bf16-check",
        default="qwen2.5-0.5b",
        help="shapes compared likewise in bf16, beside model.generate against itself",
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.tiny:
        args.shapes, args.sharegpt_shape = "tiny", ""
        args.score_prompts, args.generate_prompts, args.new_tokens = 48, 16, 8
        args.median, args.max_len, args.max_tokens = 24, 200, 4096
        args.skip_generate_batch, args.reference_generate, args.step_costs = True, True, True
        args.sampler_costs = True
        args.runner, args.runner_scale, args.float32_check = True, 1, "tiny"
        args.bf16_check = "tiny"
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    print(f"device: {device_name(device)}, torch {torch.__version__}", flush=True)
    rows: list[dict] = []
    try:
        run_sections(args, device, dtype, rows)
    finally:  # what ran is kept even when a later section fails
        print()
        print_table(rows)
        save(args.out, device, rows)


def run_sections(args, device, dtype, rows: list[dict]) -> None:
    for shape in [s for s in args.shapes.split(",") if s]:
        model = build_model(shape, device, dtype)
        tokenizer = word_tokenizer(model.config.vocab_size)
        engine = engine_around(model, tokenizer, "reference")
        fast = engine_around(model, tokenizer, "fast")
        rows.append(setup_row(shape, fast))
        if not args.runner_only:
            rows += score_section(shape, model, tokenizer, engine, fast, args, device)
        if not args.skip_generate and not args.runner_only:
            rows += generate_section(shape, model, tokenizer, engine, fast, args, device)
        if args.runner or args.runner_only:
            release_pool(fast)  # the job loads its own engine, which sizes its own pool
            rows += runner_section(shape, model, args, device)
        if args.sampler_costs:
            costs = sampler_costs(model.config.vocab_size, device, rows=16 if args.tiny else 512)
            print(f"{shape} sampler costs:", costs, flush=True)
            rows.append({"shape": shape, "work": "sampler_costs", "costs": costs})
        if args.step_costs:
            costs = decode_step_costs(fast, 16 if args.tiny else 300, device)
            print(f"{shape} decode step costs:", costs, flush=True)
            rows.append({"shape": shape, "work": "step_costs", "costs": costs})
        print_table(rows)
        save(args.out, device, rows)
        del model, engine, fast
        reset_peak(device)
    for shape in [s for s in args.float32_check.split(",") if s]:
        rows.append(greedy_agreement(shape, args, device, torch.float32))
        print(rows[-1], flush=True)
    for shape in [s for s in args.bf16_check.split(",") if s]:
        rows.append(greedy_agreement(shape, args, device, torch.bfloat16))
        print(rows[-1], flush=True)
        save(args.out, device, rows)
    if args.sharegpt_shape:
        start = time.perf_counter()
        model = build_model(args.sharegpt_shape, device, dtype)
        print(f"built {args.sharegpt_shape} in {time.perf_counter() - start:.1f} s", flush=True)
        tokenizer = word_tokenizer(model.config.vocab_size)
        fast = engine_around(model, tokenizer, "fast")
        rows.append(setup_row(args.sharegpt_shape, fast))
        if args.step_costs:
            costs = decode_step_costs(fast, 500, device)
            print(
                f"{args.sharegpt_shape} decode step costs at 500 cached tokens:", costs, flush=True
            )
            rows.append({"shape": args.sharegpt_shape, "work": "step_costs", "costs": costs})
        rows += sharegpt_section(args.sharegpt_shape, model, tokenizer, fast, args, device)


def save(out: Path | None, device, rows: list[dict]) -> None:
    if out:
        out.mkdir(parents=True, exist_ok=True)
        data = {"device": device_name(device), "torch": torch.__version__, "rows": rows}
        (out / "bench.json").write_text(json.dumps(data, indent=2))


if __name__ == "__main__":
    main()

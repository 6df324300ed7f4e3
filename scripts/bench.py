"""Throughput of bulkinfer against plain transformers, on the same prompts, in one process.

Random-weight models of real shapes (Qwen2.5-0.5B / 1.5B, Llama-3.1-8B) built from their public
configs, a word-level tokenizer whose every word is one token (so prompt lengths are exact), and
synthetic prompts with log-normal lengths. Measured per shape:

  score     plain model(...) in file order, batch 8  vs  bulkinfer (sorted, token budget)
  generate  model.generate in file order, batch 64, and generate_batch (default config)
            vs  bulkinfer (sorted, token budget)
  sharegpt  bulkinfer alone on the Llama-3.1-8B shape, each row to its own drawn length

On a GPU:  python scripts/bench.py --out $OUT
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

from bulkinfer.engines.hf import HFEngine, device_name  # noqa: E402
from bulkinfer.engines.memory import auto_token_budget, bytes_per_token  # noqa: E402
from bulkinfer.engines.sampling import SamplingParams, row_key  # noqa: E402
from bulkinfer.io.readers import InputChunk  # noqa: E402
from bulkinfer.plan import TokenBudget, padding_fraction, plan_batches  # noqa: E402
from bulkinfer.prepare import prepare_rows, render_options  # noqa: E402
from bulkinfer.spec import TaskSpec  # noqa: E402

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
def bulk_score(engine: HFEngine, prepared, budget: TokenBudget) -> dict:
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
        "padding": padding_fraction(batches),
        "batches": len(batches),
        "sums": sums.tolist(),
    }


@torch.inference_mode()
def bulk_generate(engine: HFEngine, prepared, budget: TokenBudget, new_tokens: np.ndarray) -> dict:
    batches = plan_batches(prepared.runnable_rows(), prepared.lengths, budget)
    params = SamplingParams(max_new_tokens=int(new_tokens.max()), ignore_eos=True)
    outputs: dict[int, list[int]] = {}
    produced = 0
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
        "padding": padding_fraction(batches),
        "batches": len(batches),
        "mean_batch": float(mean_batch),
        "tokens": [outputs[r] for r in range(prepared.num_rows)],
    }


# ---------------------------------------------------------------- the benchmark


def score_section(shape, model, tokenizer, engine, args, device) -> list[dict]:
    n = args.score_prompts
    lengths = lognormal_lengths(n, args.median, 0.9, 8, args.max_len, seed=1)
    prompts = prompts_of(lengths, model.config.vocab_size, seed=2)
    params = model.num_parameters()
    rows = []
    reset_peak(device)
    base = baseline_score(model, prompts, 8, device)
    rows.append(_score_row(shape, "plain model(), file order, batch 8", base, params, device))
    reset_peak(device)
    prepared, tok_seconds = bulk_prepare(tokenizer, prompts, TaskSpec(type="score"))
    budget = TokenBudget(args.max_tokens or _auto(model, device, generate=False), 4096, 0, 0.1)
    ours = bulk_score(engine, prepared, budget)
    row = _score_row(
        shape, f"bulkinfer, sorted, budget {budget.max_tokens:,}", ours, params, device
    )
    row["tokenize_seconds"] = tok_seconds
    if "sums" in base:
        a, b = np.asarray(base["sums"]), np.asarray(ours["sums"])
        row["max_rel_diff_vs_plain"] = float(np.max(np.abs(a - b) / np.maximum(np.abs(a), 1e-9)))
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


def generate_section(shape, model, tokenizer, engine, args, device) -> list[dict]:
    n, new = args.generate_prompts, args.new_tokens
    lengths = lognormal_lengths(n, args.median, 0.9, 8, args.max_len, seed=3)
    prompts = prompts_of(lengths, model.config.vocab_size, seed=4)
    rows = []
    reset_peak(device)
    base = baseline_generate(model, prompts, 64, new, device)
    rows.append(
        _gen_row(shape, "model.generate, file order, batch 64", base, model, lengths, 64, device)
    )
    reset_peak(device)
    prepared, _ = bulk_prepare(tokenizer, prompts, TaskSpec(type="generate", max_new_tokens=new))
    budget = TokenBudget(args.max_tokens or _auto(model, device, generate=True), 256, new, 0.1)
    ours = bulk_generate(engine, prepared, budget, np.full(n, new))
    row = _gen_row(
        shape, "bulkinfer, sorted, batch <= 256", ours, model, lengths, ours["mean_batch"], device
    )
    if "tokens" in base:
        k = min(32, new)
        same = sum(a[:k] == b[:k] for a, b in zip(base["tokens"], ours["tokens"], strict=True))
        row["first_32_equal_vs_generate"] = same / n
        row["x_plain"] = row["tokens_per_s"] / rows[0]["tokens_per_s"]
    rows.append(row)
    if not args.skip_generate_batch:  # last: its cache may outlive the call
        reset_peak(device)
        cb = baseline_generate_batch(model, prompts, new, device)
        rows.insert(
            1, _gen_row(shape, "generate_batch, default config", cb, model, lengths, 64, device)
        )
    return rows


def sharegpt_section(shape, model, tokenizer, engine, args, device) -> list[dict]:
    n = args.sharegpt_prompts
    prompt_lengths = lognormal_lengths(n, 180, 1.0, 4, 1500, seed=5)
    answer_lengths = lognormal_lengths(n, 150, 0.9, 20, 1500, seed=6)
    prompts = prompts_of(prompt_lengths, model.config.vocab_size, seed=7)
    reset_peak(device)
    prepared, _ = bulk_prepare(tokenizer, prompts, TaskSpec(type="generate", max_new_tokens=1500))
    budget = TokenBudget(
        args.max_tokens or _auto(model, device, generate=True), 256, int(answer_lengths.max()), 0.1
    )
    ours = bulk_generate(engine, prepared, budget, answer_lengths)
    return [
        _gen_row(
            shape,
            "bulkinfer, ShareGPT-like lengths",
            ours,
            model,
            prompt_lengths,
            ours["mean_batch"],
            device,
        )
    ]


def _gen_row(shape, name, result, model, prompt_lengths, batch, device) -> dict:
    if "error" in result:
        return {"shape": shape, "work": "generate", "path": name, "error": result["error"]}
    tps = result["new_tokens"] / result["seconds"]
    weights = model.num_parameters() * 2
    kv = bytes_per_token(model.config, torch.bfloat16, True) - bytes_per_token(
        model.config, torch.bfloat16, False
    )
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
    return auto_token_budget(model.config, device, model.dtype, generate)


def print_table(rows: list[dict]) -> None:
    header = f"{'shape':<14}{'work':<10}{'path':<44}{'tok/s':>10}{'pad':>7}{'peak%':>7}{'GiB':>7}{'x plain':>9}"
    print(header)
    print("-" * len(header))
    for r in rows:
        if "error" in r:
            print(f"{r['shape']:<14}{r['work']:<10}{r['path']:<44}  {r['error']}")
            continue
        frac = r.get("peak_fraction", r.get("roofline_fraction", float("nan")))
        ratio = f"{r['x_plain']:.2f}" if "x_plain" in r else ""
        print(
            f"{r['shape']:<14}{r['work']:<10}{r['path']:<44}{r['tokens_per_s']:>10,.0f}"
            f"{r['padding']:>7.1%}{frac:>7.1%}{r['peak_gib']:>7.1f}{ratio:>9}"
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
    parser.add_argument("--skip-generate", action="store_true", help="score sections only")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.tiny:
        args.shapes, args.sharegpt_shape = "tiny", ""
        args.score_prompts, args.generate_prompts, args.new_tokens = 48, 16, 8
        args.median, args.max_len, args.max_tokens = 24, 200, 4096
        args.skip_generate_batch = True
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    print(f"device: {device_name(device)}, torch {torch.__version__}", flush=True)
    rows: list[dict] = []
    for shape in [s for s in args.shapes.split(",") if s]:
        model = build_model(shape, device, dtype)
        tokenizer = word_tokenizer(model.config.vocab_size)
        engine = HFEngine(model, tokenizer, device)
        rows += score_section(shape, model, tokenizer, engine, args, device)
        if not args.skip_generate:
            rows += generate_section(shape, model, tokenizer, engine, args, device)
        print_table(rows)
        save(args.out, device, rows)
        del model, engine
        reset_peak(device)
    if args.sharegpt_shape:
        model = build_model(args.sharegpt_shape, device, dtype)
        tokenizer = word_tokenizer(model.config.vocab_size)
        engine = HFEngine(model, tokenizer, device)
        rows += sharegpt_section(args.sharegpt_shape, model, tokenizer, engine, args, device)
    print()
    print_table(rows)
    save(args.out, device, rows)


def save(out: Path | None, device, rows: list[dict]) -> None:
    if out:
        out.mkdir(parents=True, exist_ok=True)
        data = {"device": device_name(device), "torch": torch.__version__, "rows": rows}
        (out / "bench.json").write_text(json.dumps(data, indent=2))


if __name__ == "__main__":
    main()

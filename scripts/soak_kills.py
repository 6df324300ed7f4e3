"""Long-run crash check: a 200k-row job on the tiny model, SIGKILLed every few seconds until done.

Reports rows lost or doubled in the final output (must be 0 and 0) and the work recomputed
because of the kills: rows computed but not yet committed when the process died (the goal is
under one checkpoint interval per kill). Run from the repository root:

    python scripts/soak_kills.py --rows 200000 --work /tmp/soak
"""

from __future__ import annotations

import argparse
import json
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.dataset as ds
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # tiny_model
from tiny_model import build_tiny_model

PROGRESS = re.compile(r"\] ([\d,]+)/([\d,]+) rows")


def make_input(path: Path, rows: int) -> None:
    words = [
        "the",
        "quick",
        "brown",
        "fox",
        "jumps",
        "over",
        "the",
        "lazy",
        "dog",
        "and",
        "runs",
        "far",
        "away",
    ]
    rng = random.Random(0)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(rows):
            n = max(1, int(rng.lognormvariate(2.5, 0.7)))
            text = " ".join(rng.choice(words) for _ in range(n))
            f.write(json.dumps({"id": f"row-{i}", "prompt": text}) + "\n")


def committed_rows(out: Path) -> int:
    manifest = out / "checkpoint" / "manifest.jsonl"
    if not manifest.exists():
        return 0
    return sum(
        json.loads(line)["rows"] for line in manifest.read_text().splitlines() if line.strip()
    )


def run_once(job: Path, out: Path, kill_after: float) -> tuple[bool, int]:
    """One attempt; returns (finished, rows computed but uncommitted at the kill)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "bulkinfer", "run", str(job)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _, err = proc.communicate(timeout=kill_after)
        if proc.returncode != 0:
            raise SystemExit(f"run failed with exit code {proc.returncode}:\n{err}")
        return True, 0
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate()
    computed = [int(m.group(1).replace(",", "")) for m in PROGRESS.finditer(err)]
    committed = committed_rows(out)
    return False, max(0, (computed[-1] if computed else committed) - committed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--work", type=Path, default=Path("/tmp/bulkinfer-soak"))
    parser.add_argument("--every-rows", type=int, default=2000)
    parser.add_argument("--kill-min", type=float, default=4.0)
    parser.add_argument("--kill-max", type=float, default=12.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    args.work.mkdir(parents=True, exist_ok=True)
    model = build_tiny_model(args.work / "tiny")
    inputs = args.work / "in.jsonl"
    make_input(inputs, args.rows)
    out = args.work / "out"
    job = args.work / "job.yaml"
    job.write_text(
        yaml.safe_dump(
            {
                "model": {"path": str(model)},
                "task": {"type": "score"},
                "input": {"path": str(inputs)},
                "output": {"path": str(out)},
                "batching": {"max_tokens": 8192, "max_batch_size": 256},
                "checkpoint": {"every_rows": args.every_rows},
                "progress": {"log_every_seconds": 0.1},
            }
        )
    )
    rng = random.Random(args.seed)
    kills, recomputed, started = 0, [], time.monotonic()
    while True:
        finished, lost_work = run_once(job, out, rng.uniform(args.kill_min, args.kill_max))
        if finished:
            break
        kills += 1
        recomputed.append(lost_work)
        print(
            f"kill {kills}: {committed_rows(out):,} rows committed, {lost_work:,} to recompute",
            flush=True,
        )
    ids = ds.dataset(out / "outputs", format="parquet").to_table(columns=["id"]).column("id")
    unique = len(set(ids.to_pylist()))
    lost = args.rows - unique
    doubled = len(ids) - unique
    worst = max(recomputed, default=0)
    mean = sum(recomputed) / len(recomputed) if recomputed else 0.0
    print(
        f"rows {args.rows:,}, kills {kills}, lost {lost}, doubled {doubled}, "
        f"recomputed per kill mean {mean:,.0f} max {worst:,} rows "
        f"(checkpoint interval {args.every_rows:,}), wall {time.monotonic() - started:,.0f} s"
    )
    sys.exit(0 if lost == doubled == 0 else 1)


if __name__ == "__main__":
    main()

"""Time a resume's start: the seconds from `bulkinfer run` to its first batch (the `start` log
event: the model loaded, the batches planned), for a job killed after its first part.

Each round runs the job fresh until it has committed a part and kept its tokenized input
(OUT/checkpoint/prepared/prepared.json), kills it, then times the rerun to its first batch and
stops it there. `--tree` runs another checkout of bulkinfer (PYTHONPATH) for an A/B in one call.

    python scripts/make_big_input.py --rows 200000 --seed 1 --out /tmp/big/in.jsonl
    python scripts/bench_resume.py --model MODEL --input /tmp/big/in.jsonl --work /tmp/br \\
        --tree new=. --tree old=/tmp/old_checkout --rounds 2
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml


def job_file(work: Path, name: str, model: str, inputs: str, task: str) -> Path:
    spec = {
        "model": {"path": str(Path(model).resolve())},
        "input": {"path": str(Path(inputs).resolve())},
        "output": {"path": str(work / f"out-{name}")},
        "task": {"type": task, **({"max_new_tokens": 4} if task == "generate" else {})},
        "checkpoint": {"every_rows": 200},
    }
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def killed_after_first_part(job: Path, out: Path, env: dict, kept: bool) -> None:
    """Run `job` until a part is committed (and, where the tree keeps them, the tokenized
    input), then SIGKILL it."""
    shutil.rmtree(out, ignore_errors=True)
    run = subprocess.Popen(
        [sys.executable, "-m", "bulkinfer", "run", str(job)],
        env=env,
        cwd=job.parent,  # (`python -m` puts the working folder first on sys.path)
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    manifest = out / "checkpoint" / "manifest.jsonl"
    record = out / "checkpoint" / "prepared" / "prepared.json"
    while not (manifest.exists() and manifest.read_text().strip()):
        if run.poll() is not None:
            raise SystemExit(f"{job}: the run ended before its first part; give a bigger input")
        time.sleep(0.05)
    deadline = time.monotonic() + 60
    while kept and not record.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    run.kill()
    run.wait()


def resume_to_first_batch(job: Path, env: dict) -> tuple[float, bool]:
    """Seconds from the rerun's start to its `start` event, and whether it read the kept input."""
    started = time.monotonic()
    run = subprocess.Popen(
        [sys.executable, "-m", "bulkinfer", "--log-format", "json", "run", str(job)],
        env=env,
        cwd=job.parent,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    reused = False
    for line in run.stderr:
        event = json.loads(line) if line.startswith("{") else {}
        reused |= bool(event.get("reused"))
        if event.get("event") == "start":
            break
    seconds = time.monotonic() - started
    run.kill()
    run.wait()
    return seconds, reused


def keeps_tokens(tree: str) -> bool:
    """Whether the checkout (or the installed bulkinfer) keeps the tokenized input for a resume."""
    if tree:
        return (Path(tree) / "bulkinfer" / "prepare" / "reuse.py").exists()
    return importlib.util.find_spec("bulkinfer.prepare.reuse") is not None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="model folder")
    parser.add_argument("--input", required=True, help="input file (make_big_input.py)")
    parser.add_argument("--work", required=True, help="a folder for job files and outputs")
    parser.add_argument("--task", default="score", choices=["score", "generate"])
    parser.add_argument(
        "--tree",
        action="append",
        default=None,
        metavar="NAME=PATH",
        help="a checkout to run (PYTHONPATH); repeat for an A/B (default: the installed one)",
    )
    parser.add_argument("--rounds", type=int, default=1, help="rounds, tree order reversed each")
    args = parser.parse_args()
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    trees = [t.split("=", 1) for t in (args.tree or ["installed="])]
    rows = []
    for k in range(args.rounds):
        for name, tree in trees if k % 2 == 0 else trees[::-1]:
            env = {**os.environ, **({"PYTHONPATH": str(Path(tree).resolve())} if tree else {})}
            label = f"{name}-{k}"
            job = job_file(work, label, args.model, args.input, args.task)
            kept = keeps_tokens(tree)
            killed_after_first_part(job, work / f"out-{label}", env, kept)
            seconds, reused = resume_to_first_batch(job, env)
            rows.append({"tree": name, "round": k, "seconds": round(seconds, 1), "kept": reused})
            print(json.dumps(rows[-1]), flush=True)
    (work / "bench_resume.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

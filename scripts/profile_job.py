"""Where a real `bulkinfer run` generation job's model time goes, call by call.

Runs the ShareGPT-like job of `scripts/bench_jobs.py` in this process (a model saved to disk,
the OpenAI Batch file, `bulkinfer run` as a user runs it) with the fast engine's `prefill` and
`decode` timed call by call (each ends with its tokens on the host, so a call's wall time is
its GPU time plus the launches), and the kernels of a few decode chunks in the middle of the
job under torch.profiler, by family. The summary sets the job's measured step costs beside
those of `scripts/profile_decode.py` (which steps rows of equal contexts in a loop): the
difference is what the job pays that the profile does not.

    python scripts/profile_job.py --requests 10000 [--set model.quantization=fp8 ...]
        [--work /tmp/bj8] --out $OUT
    python scripts/profile_job.py --tiny      (CPU: a tiny model and 200 requests)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "tests"))

import bench_jobs  # noqa: E402


def timed_engine(
    calls: list[dict], window: range, kernels: list, prefill_window: range = range(0)
) -> None:
    """Wrap the fast engine's prefill and decode: each call's seconds, rows and sizes go to
    `calls`; decode calls numbered in `window` and prefill calls in `prefill_window` run under
    torch.profiler (CUDA only)."""
    import torch

    from bulkinfer.engines.fast import FastEngine, decode_bucket

    prefill, decode = FastEngine.prefill, FastEngine.decode

    @contextlib.contextmanager
    def profiled(on: bool, steps: int, which: dict):
        """torch.profiler around a call when `on`; its kernels go to `kernels`."""
        if not on:
            yield
            return
        from torch.profiler import ProfilerActivity, profile

        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            yield
            torch.cuda.synchronize()
        kernels.append((prof, steps, which))

    def timed_prefill(self, prompts, *args, **kwargs):
        number = sum(c["kind"] == "prefill" for c in calls)
        past = args[6] if len(args) > 6 else kwargs.get("past")
        tokens = sum(len(p) for p in prompts) - (sum(past) if past else 0)
        on = self.device.type == "cuda" and number in prefill_window
        with profiled(on, 1, {"prefill_call": number, "tokens": int(tokens)}):
            started = time.perf_counter()
            out = prefill(self, prompts, *args, **kwargs)
            seconds = time.perf_counter() - started
        calls.append(
            {
                "kind": "prefill",
                "rows": len(prompts),
                "tokens": int(tokens),
                # attention's work grows with the square of each prompt's length
                "squares": int(sum(len(p) ** 2 for p in prompts)),
                "longest": max(len(p) for p in prompts),
                "seconds": seconds,
            }
        )
        return out

    def timed_decode(self, rows, steps, *args, **kwargs):
        n = len(rows.lengths)
        size = decode_bucket(n, self.slots)
        number = sum(c["kind"] == "decode" for c in calls)
        on = self.device.type == "cuda" and number in window
        with profiled(on, steps, {"decode_call": number}):
            started = time.perf_counter()
            out = decode(self, rows, steps, *args, **kwargs)
            seconds = time.perf_counter() - started
        calls.append(
            {
                "kind": "decode",
                "rows": n,
                "size": size,
                "steps": steps,
                "context": int(sum(rows.lengths)),
                "longest": max(rows.lengths) + steps,
                "seconds": seconds,
            }
        )
        return out

    FastEngine.prefill, FastEngine.decode = timed_prefill, timed_decode


def summarize(calls: list[dict]) -> dict:
    decode = [c for c in calls if c["kind"] == "decode"]
    prefill = [c for c in calls if c["kind"] == "prefill"]
    by_size: dict[int, list] = defaultdict(list)
    for c in decode:
        by_size[c["size"]].append(c)
    sizes = {}
    for size, group in sorted(by_size.items()):
        steps = sum(c["steps"] for c in group)
        sizes[size] = {
            "calls": len(group),
            "steps": steps,
            "ms_per_step": round(1e3 * sum(c["seconds"] for c in group) / steps, 2),
            "rows_mean": round(sum(c["rows"] * c["steps"] for c in group) / steps, 1),
            "cached_tokens_per_row": round(
                sum(c["context"] for c in group) / max(1, sum(c["rows"] for c in group)), 1
            ),
            # the first call of a size captures its graph (and may compile)
            "first_call_s": round(group[0]["seconds"], 3),
        }
    tokens = sum(c["tokens"] for c in prefill)
    prefill_s = sum(c["seconds"] for c in prefill)
    return {
        "prefill_calls": len(prefill),
        "prefill_tokens": tokens,
        "prefill_seconds": round(prefill_s, 2),
        "prefill_us_per_token": round(1e6 * prefill_s / max(1, tokens), 2),
        # without the first call, which compiles (or loads compiled code)
        "prefill_us_per_token_after_first": round(
            1e6 * sum(c["seconds"] for c in prefill[1:]) / max(1, tokens - prefill[0]["tokens"]), 2
        )
        if len(prefill) > 1
        else None,
        "prefill_first_call_s": round(prefill[0]["seconds"], 2) if prefill else None,
        "prefill_slowest_s": sorted(round(c["seconds"], 3) for c in prefill)[-5:],
        "decode_calls": len(decode),
        "decode_steps": sum(c["steps"] for c in decode),
        "decode_seconds": round(sum(c["seconds"] for c in decode), 2),
        "decode_by_size": sizes,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama-3.1-8b")
    parser.add_argument("--requests", type=int, default=10000)
    parser.add_argument("--set", dest="settings", action="append", default=[], help="KEY=VALUE")
    parser.add_argument("--window", default="100,103", help="decode calls to profile: FIRST,END")
    parser.add_argument(
        "--prefill-window", default="0,0", help="prefill calls to profile: FIRST,END"
    )
    parser.add_argument("--work", type=Path, default=None, help="keeps the saved model")
    parser.add_argument(
        "--pool-share", type=float, default=None, help="the KV pool's share of free memory"
    )
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    import tempfile

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.tiny:
        args.shape, args.requests = "tiny", min(args.requests, 200)
    work = args.work or Path(tempfile.mkdtemp(prefix="profile_job_"))
    model = bench_jobs.saved_model(work, args.shape, device)
    data = work / f"sharegpt-{args.requests}.jsonl"
    bench_jobs.write_requests(data, args.requests, model["per_word"])
    spec: dict = {
        "model": {"path": str(work / "model"), "engine": "fast"},
        "input": {"path": str(data)},
        "output": {"path": str(work / "out-profile-job")},
        "task": {"type": "generate", "max_new_tokens": 1500, "temperature": 0.0},
    }
    settings = dict(setting.split("=", 1) for setting in args.settings)
    bench_jobs.with_settings(spec, {k: bench_jobs.spec_value(v) for k, v in settings.items()})
    job = work / "profile-job.json"
    job.write_text(json.dumps(spec))

    if args.pool_share is not None:
        from bulkinfer.engines import memory

        memory.GPU_POOL_SHARE = args.pool_share
    calls: list[dict] = []
    kernels: list = []
    first, end = (int(x) for x in args.window.split(","))
    prefill_first, prefill_end = (int(x) for x in args.prefill_window.split(","))
    timed_engine(calls, range(first, end), kernels, range(prefill_first, prefill_end))
    from bulkinfer.cli import main as cli

    sys.argv = ["bulkinfer", "--log-format", "json", "run", str(job), "--overwrite"]
    started = time.perf_counter()
    with contextlib.suppress(SystemExit):  # click's exit once the job is done
        cli(standalone_mode=False)
    wall = time.perf_counter() - started
    summary = json.loads((work / "out-profile-job" / "summary.json").read_text())
    report = {
        "device": summary.get("device"),
        "settings": args.settings,
        "wall_seconds": round(wall, 1),
        "model_seconds": round(summary["model_seconds"], 1),
        "output_tokens": summary["output_tokens"],
        **summarize(calls),
    }
    if "device_memory_gib" in summary:  # how close the job came to the device's memory
        report["memory_gib"] = summary["device_memory_gib"]
    if kernels:
        from profile_decode import kernel_table

        report["kernels_per_step_in_window"] = [
            {**which, **kernel_table(p, steps)} for p, steps, which in kernels
        ]
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "profile_job.json").write_text(text)
        (args.out / "calls.json").write_text(json.dumps(calls))


if __name__ == "__main__":
    main()

"""What the fast engine's schedule asks of the GPU on the ShareGPT-like job, counted on the CPU.

Runs bulkinfer's own scheduler (engines/scheduler.py) over the requests of
`scripts/bench_jobs.py`'s sharegpt workload (same seed, every row decoding to its own
`max_tokens`, as the random-weight benchmark model does) with a stand-in engine that only
counts: the prefill forwards and their tokens, and per decode step the rows, the bucket of
slots computed and the rows' cached tokens. With step costs measured on a GPU
(`scripts/profile_decode.py`: a fixed part, a part per slot computed and a part per cached token
read) it predicts the model time of the job, to set beside what `bulkinfer run` measured.

    python scripts/count_schedule.py --requests 10000 [--slots 1024] [--pool-tokens 900000]
        [--step-ms 4.1 --slot-us 18.4 --kv-ns 34.4 --prefill-us 23.2]
        [--step-table 64:5.4,256:7.2,1024:20.5]   (for example)

The default costs are the bf16 8B figures of docs/perf.md (NVIDIA H200, 2026-12-04) as the
real job pays them (`scripts/profile_job.py`): step 4.1 ms + 18.4 us a slot + 34.4 ns a
cached token, prefill 23.2 us a token. The profile's steps of equal rows (15.5 us, 30.7 ns,
21.3 us) priced the job 19% low. Not counted: the first prefill's compile on a cold cache
(9.5 s for the 8B). `scheduler_host_s`: the scheduler's own work on this machine's CPU, which
the GPU waits for between decode chunks.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_jobs import request_lengths  # noqa: E402

from bulkinfer.engines.base import GenerateRequests  # noqa: E402
from bulkinfer.engines.fast import GPU_SLOTS, decode_bucket  # noqa: E402
from bulkinfer.engines.sampling import SamplingParams  # noqa: E402
from bulkinfer.engines.scheduler import stream  # noqa: E402


class CountingEngine:
    """The engine surface the scheduler uses; every token is 1 (never EOS), nothing computed."""

    eos_ids = frozenset({0})
    end_token = 0
    tokenizer = None
    device = "cpu"

    def __init__(self, slots: int, pool_tokens: int):
        self.slots, self.pool_tokens = slots, pool_tokens
        self.prefill_tokens, self.prefills = 0, 0
        self.steps: list[tuple[int, int, int]] = []  # (rows, slots computed, cached tokens)
        self.seconds = 0.0  # spent in decode: not the scheduler's

    def reserve(self, tokens_needed: int) -> int:
        return self.pool_tokens

    def prefill(self, prompts, starts, keys, chooser, logprobs, matchers, top, past):
        self.prefills += 1
        self.prefill_tokens += sum(len(p) - k for p, k in zip(prompts, past, strict=True))
        return [1] * len(prompts), None, None

    def decode(self, rows, steps, chooser, logprobs, matchers, top):
        started = time.perf_counter()
        try:
            return self._decode(rows, steps)
        finally:
            self.seconds += time.perf_counter() - started

    def _decode(self, rows, steps):
        n = len(rows.lengths)
        size = decode_bucket(n, self.slots)
        context = sum(rows.lengths)
        for j in range(steps):
            self.steps.append((n, size, context + n * j))
        return [[1] * steps for _ in range(n)], [[0.0] * steps for _ in range(n)], None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=10000)
    parser.add_argument("--slots", type=int, default=GPU_SLOTS)
    parser.add_argument("--pool-tokens", type=int, default=900_000)
    parser.add_argument("--batch-rows", type=int, default=4096, help="rows a checkpoint batch")
    parser.add_argument("--step-ms", type=float, default=4.1)
    parser.add_argument("--slot-us", type=float, default=18.4)
    parser.add_argument("--kv-ns", type=float, default=34.4)
    parser.add_argument("--prefill-us", type=float, default=23.2)
    parser.add_argument(
        "--step-table",
        default="",
        help="slots:ms,... a step's cost without its KV read by slots computed (measured by "
        "profile_decode.py), instead of --step-ms and --slot-us",
    )
    args = parser.parse_args()

    prompts, answers = request_lengths(args.requests)
    order = np.lexsort((-prompts, -answers))  # the plan's order: most decode steps first
    engine = CountingEngine(args.slots, args.pool_tokens)
    params = SamplingParams(max_new_tokens=int(answers.max()))

    def groups():
        for b, start in enumerate(range(0, len(order), args.batch_rows)):
            rows = order[start : start + args.batch_rows]
            yield (
                b,
                GenerateRequests(
                    [np.ones(int(prompts[i]), dtype=np.int64) for i in rows],
                    [int(i) for i in rows],
                    [params] * len(rows),
                    [int(answers[i]) for i in rows],
                ),
            )

    table = args.step_table and sorted(
        tuple(map(float, p.split(":"))) for p in args.step_table.split(",")
    )

    def step_parts(slots: np.ndarray) -> tuple[float, float]:
        """Seconds of the steps' fixed and per-slot parts: linear, or from --step-table (its
        points interpolated; the part over the smallest point's cost counted per slot)."""
        if not table:
            return len(slots) * args.step_ms * 1e-3, slots.sum() * args.slot_us * 1e-6
        ms = np.interp(slots, [p[0] for p in table], [p[1] for p in table])
        fixed = len(slots) * table[0][1] * 1e-3
        return fixed, ms.sum() * 1e-3 - fixed

    def seconds(steps: np.ndarray, prefill_tokens: int) -> tuple[float, float]:
        """Predicted prefill and decode seconds of these steps and prefill tokens."""
        slots, context = steps[:, 1], steps[:, 2]
        decode = sum(step_parts(slots))
        return prefill_tokens * args.prefill_us * 1e-6, decode + context.sum() * args.kv_ns * 1e-9

    left = {
        b: min(args.batch_rows, len(order) - b * args.batch_rows)
        for b, _ in enumerate(range(0, len(order), args.batch_rows))
    }
    done_at = []  # predicted model seconds at which each checkpoint batch's last row finished
    started = time.perf_counter()
    for update in stream(engine, groups()):
        if update.group is not None:
            left[update.group] -= len(update.finished)
            if not left[update.group]:
                done = seconds(np.array(engine.steps, dtype=np.float64), engine.prefill_tokens)
                done_at.append(round(sum(done), 1))
    # the host's work between decode calls, which a GPU waits for (the groups' building and
    # the count's own pricing included: an upper bound)
    host_s = time.perf_counter() - started - engine.seconds
    steps = np.array(engine.steps, dtype=np.float64)
    rows, slots, context = steps[:, 0], steps[:, 1], steps[:, 2]
    prefill_s, decode_s = seconds(steps, engine.prefill_tokens)
    fixed_s, per_slot_s = step_parts(slots)
    full = rows >= 0.9 * args.slots
    report = {
        "requests": args.requests,
        # rows decoded, steps past a row's end included (the host looks every 8 steps)
        "decode_row_steps": int(rows.sum()),
        "prefill_tokens": engine.prefill_tokens,
        "prefill_forwards": engine.prefills,
        "decode_steps": len(steps),
        "decode_rows_per_step": round(float(rows.mean()), 1),
        "decode_slots_filled": round(float(rows.sum() / slots.sum()), 3),
        "steps_with_90pct_of_slots": int(full.sum()),
        "cached_tokens_per_row_mean": round(float(context.sum() / rows.sum()), 1),
        "predicted_prefill_s": round(prefill_s, 1),
        "predicted_decode_s": round(decode_s, 1),
        "of_it_fixed_s": round(fixed_s, 1),
        "of_it_per_slot_s": round(per_slot_s, 1),
        "of_it_kv_read_s": round(context.sum() * args.kv_ns * 1e-9, 1),
        "predicted_model_s": round(prefill_s + decode_s, 1),
        "predicted_batches_done_at_s": done_at,
        "scheduler_host_s": round(host_s, 2),
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

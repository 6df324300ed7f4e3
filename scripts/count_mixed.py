"""Would mixing prefill into decode steps pay on the ShareGPT-like job? Counted, not run.

The fast engine prefills the rows it admits in forwards of their own (up to 16,384 tokens),
then decodes every row in flight in CUDA-graph steps. Chunked prefill (vLLM, SGLang) instead
puts the next prompts' tokens into the decode step's forward, so a step whose cost is the
weight read anyway also does some prefill. This prices the 1,000- or 10,000-request job of
`scripts/bench_jobs.py` (same seed, every row decoding to its own `max_tokens`, most steps
first) step by step under three schedules:

  separate  as the engine runs: admitted rows prefilled at 23.2 us a token, then decode steps
  mixed     every step's forward holds the decode rows and whole prompts of up to --chunk
            tokens (at least one), rows admitted as slots free up, no step without decode rows
            waiting on prefill; a mixed forward is not a graph replay (--mixed-host-ms more)
  held      as mixed, but a prompt waits while the step's tokens would pass --chunk, unless its
            row needs as many steps as the longest row in flight has left, or the rows waiting
            hold more tokens than those steps can take within --chunk (either way, waiting
            would lengthen the job): prefill fills steps the weight read pays for anyway

A forward of T tokens (decode rows plus prompt tokens) costs the decode step of T slots from
--step-table (measured CUDA-graph steps less their KV read; past its last point, per token at
the last slope), plus each prompt token's own attention (--prompt-us), plus the decode rows'
KV read (--kv-ns a cached token).

    python scripts/count_mixed.py --requests 1000 [--chunk 256,512,1024,2048]
        [--step-table 8:5.2,64:5.4,256:7.2,1024:20.5] [--kv-ns 20] [--mixed-host-ms 0.5]

The defaults are the bf16 8B figures of docs/perf.md (NVIDIA H200, 2026-12-04).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from bench_jobs import request_lengths  # noqa: E402

PREFILL_TOKENS = 16_384  # tokens of one separate prefill forward (engines/memory.py)


class Costs:
    def __init__(self, table: str, kv_ns: float, prefill_us: float, prompt_us: float, host: float):
        points = sorted(tuple(map(float, p.split(":"))) for p in table.split(","))
        self.slots, self.ms = [p[0] for p in points], [p[1] for p in points]
        last = len(points) - 1
        self.slope = (self.ms[last] - self.ms[last - 1]) / (self.slots[last] - self.slots[last - 1])
        self.kv_ms = kv_ns * 1e-6
        self.prefill_ms, self.prompt_ms, self.host_ms = prefill_us * 1e-3, prompt_us * 1e-3, host

    def forward(self, tokens: int) -> float:
        if tokens <= self.slots[-1]:
            return float(np.interp(tokens, self.slots, self.ms))
        return self.ms[-1] + (tokens - self.slots[-1]) * self.slope


def count(schedule: str, prompts, answers, costs: Costs, slots: int, chunk: int) -> dict:
    """Model seconds and steps of one schedule; rows in the plan's order (most steps first)."""
    ms, q, steps, n = 0.0, 0, 0, len(prompts)
    waiting = np.cumsum((prompts + answers)[::-1])[::-1]  # tokens of rows q.. (prompt, answer)
    left = np.zeros(0, dtype=np.int64)  # decode steps each row in flight still needs
    cached = np.zeros(0, dtype=np.int64)  # and the tokens in its KV region
    while q < n or len(left):
        admitted: list[int] = []
        if schedule == "separate":
            if q < n and (not len(left) or slots - len(left) >= min(n - q, slots // 8)):
                while q < n and len(left) + len(admitted) < slots:
                    admitted.append(q)
                    q += 1
                tokens = int(prompts[admitted].sum())
                ms += tokens * costs.prefill_ms
                left = np.concatenate([left, answers[admitted] - 1])
                cached = np.concatenate([cached, prompts[admitted] + 1])
                admitted = []
            step = costs.forward(len(left)) + cached.sum() * costs.kv_ms
        else:
            tokens = 0
            while q < n and len(left) + len(admitted) < slots:
                in_flight = [*left.tolist(), *(answers[admitted] - 1).tolist()]
                ahead = max(in_flight, default=-1)  # steps the longest row in flight has left
                # held: a row goes in when it needs as many steps as are left, or when what
                # waits is more than the steps left can hold within the budget
                room = ahead * max(chunk - len(left) - tokens, 1)
                must = schedule == "held" and (answers[q] - 1 >= ahead or waiting[q] > room)
                over = len(left) + tokens + prompts[q] > chunk
                waits = admitted or (schedule == "held" and len(left))  # a step goes on without it
                if over and waits and not must:
                    break
                admitted.append(q)
                tokens += int(prompts[q])
                q += 1
            step = costs.forward(len(left) + tokens) + cached.sum() * costs.kv_ms
            if tokens:
                step += tokens * costs.prompt_ms + costs.host_ms
        ms += step
        steps += 1
        keep = left > 1
        left, cached = left[keep] - 1, cached[keep] + 1
        if admitted:
            rows = np.asarray(admitted)
            new = answers[rows] - 1
            left = np.concatenate([left, new[new > 0]])
            cached = np.concatenate([cached, prompts[rows][new > 0] + 1])
    return {"model_s": round(ms / 1e3, 2), "steps": steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--slots", type=int, default=1024)
    parser.add_argument("--chunk", default="256,512,1024,2048", help="token budgets to try")
    parser.add_argument("--step-table", default="8:5.2,64:5.4,256:7.2,1024:20.5")
    parser.add_argument("--kv-ns", type=float, default=20.0)
    parser.add_argument("--prefill-us", type=float, default=23.2)
    parser.add_argument("--prompt-us", type=float, default=5.0)
    parser.add_argument("--mixed-host-ms", type=float, default=0.5)
    args = parser.parse_args()
    prompts, answers = request_lengths(args.requests)
    order = np.lexsort((-prompts, -answers))
    prompts, answers = prompts[order].astype(np.int64), answers[order].astype(np.int64)
    costs = Costs(args.step_table, args.kv_ns, args.prefill_us, args.prompt_us, args.mixed_host_ms)
    report = {"separate": count("separate", prompts, answers, costs, args.slots, PREFILL_TOKENS)}
    for chunk in map(int, args.chunk.split(",")):
        for schedule in ("mixed", "held"):
            report[f"{schedule} {chunk}"] = count(
                schedule, prompts, answers, costs, args.slots, chunk
            )
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

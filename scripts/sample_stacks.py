"""Where a `bulkinfer` command's threads spend their time: every thread's Python stack,
sampled every few milliseconds, for the first seconds of the command (a poor man's py-spy,
which the GPU machine lacks; cProfile sees the main thread only and inflates import-heavy code).

    python scripts/sample_stacks.py OUT.json --seconds 15 -- run job.yaml --overwrite

Runs the command as `python -m bulkinfer` does, in this process; after `--seconds` (or at the
command's end) writes the samples to OUT.json, and `--report OUT.json` prints, per thread and
per half second, the innermost bulkinfer frame and the innermost frame, then the functions
with most samples (inclusive) per thread.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import threading
import time


def sampler(out: str, seconds: float, every: float) -> threading.Thread:
    start = time.perf_counter()
    frames: dict[tuple, int] = {}
    samples: list = []
    stop = threading.Event()

    def intern(code) -> int:
        key = (code.co_filename, code.co_name, code.co_firstlineno)
        if key not in frames:
            frames[key] = len(frames)
        return frames[key]

    def write() -> None:
        table = [None] * len(frames)
        for (file, name, line), i in frames.items():
            table[i] = f"{file}:{line}:{name}"
        with open(out, "w") as f:
            json.dump(
                {"every": every, "frames": table, "samples": samples, "compile": compile_times()},
                f,
            )

    def run() -> None:
        me = threading.get_ident()
        while (now := time.perf_counter() - start) < seconds and not stop.is_set():
            names = {t.ident: t.name for t in threading.enumerate()}
            for ident, frame in sys._current_frames().items():
                if ident == me:
                    continue
                stack = []
                while frame is not None:
                    stack.append(intern(frame.f_code))
                    frame = frame.f_back
                samples.append([round(now, 4), names.get(ident, str(ident)), stack[::-1]])
            time.sleep(every)
        write()

    thread = threading.Thread(target=run, name="sampler", daemon=True)
    thread.start()
    thread.stop = stop  # type: ignore[attr-defined]
    return thread


def compile_times() -> str | None:
    """torch.compile's own account of its phases in this process (dynamo's tracing, inductor's
    lowering and code generation, waiting for kernels), where it compiled anything."""
    dynamo = sys.modules.get("torch._dynamo.utils")
    if dynamo is None:
        return None
    try:
        return dynamo.compile_times(repr="str", aggregate=True)
    except Exception as exc:  # noqa: BLE001 (a diagnosis aid only)
        return f"compile_times failed: {exc}"


def report(path: str, window: float = 0.5, top: int = 40) -> None:
    with open(path) as f:
        data = json.load(f)
    frames, samples = data["frames"], data["samples"]

    def short(i: int) -> str:
        file, line, name = frames[i].rsplit(":", 2)
        for marker in ("site-packages/", "bulkinfer/", "lib/python3"):
            if marker in file:
                file = file.split(marker, 1)[1]
                break
        return f"{file}:{name}"

    def own(stack: list[int]) -> str:
        inner = [i for i in stack if "/bulkinfer/" in frames[i]]
        return short(inner[-1]) if inner else "-"

    # a round of samples stands for the time since the round before (sleeps overrun)
    times = sorted({t for t, _, _ in samples})
    gaps = [times[0], *(b - a for a, b in zip(times, times[1:], strict=False))]
    weight = dict(zip(times, gaps, strict=True))
    timeline = collections.defaultdict(collections.Counter)
    inclusive = collections.defaultdict(collections.Counter)
    counts = collections.Counter()
    for t, thread, stack in samples:
        if thread.startswith("bulkinfer-to-gpu") or thread.startswith("ThreadPoolExecutor"):
            thread = thread.rsplit("_", 1)[0]
        leaf = short(stack[-1]) if stack else "-"
        timeline[(int(t / window), thread)][f"{own(stack)} | {leaf}"] += weight[t]
        counts[thread] += weight[t]
        for name in {short(i) for i in stack}:
            inclusive[thread][name] += weight[t]
    for (k, thread), c in sorted(timeline.items()):
        what, n = c.most_common(1)[0]
        print(f"{k * window:6.1f}s {thread[:22]:22} {n:4.2f}/{sum(c.values()):4.2f}s {what}")
    for thread, c in inclusive.items():
        print(f"\n== {thread}: {counts[thread]:.2f} s sampled")
        for name, n in c.most_common(top):
            print(f"{n:7.2f}s {name}")
    if data.get("compile"):
        print("\n== torch.compile's phases (seconds)\n" + data["compile"])


def main() -> None:
    if "--report" in sys.argv:
        report(sys.argv[sys.argv.index("--report") + 1])
        return
    split = sys.argv.index("--")
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--every", type=float, default=0.005)
    args = parser.parse_args(sys.argv[1:split])
    thread = sampler(args.out, args.seconds, args.every)
    sys.argv = ["bulkinfer", *sys.argv[split + 1 :]]
    exit_now = os._exit

    def write_then_exit(code: int) -> None:  # `entry` ends the process with os._exit
        thread.stop.set()  # it writes what it has, then ends
        thread.join()
        exit_now(code)

    os._exit = write_then_exit
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this tree's
    from bulkinfer.cli import entry

    entry()


if __name__ == "__main__":
    main()

"""Where a decode step's time goes: kernel table of one eager step (torch.profiler), 0.5B shape.

On a GPU:  python scripts/profile_decode.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import build_model, word_tokenizer  # noqa: E402

from bulkinfer.engines.kv import DecodeInputs  # noqa: E402
from bulkinfer.engines.select import engine_around  # noqa: E402


@torch.inference_mode()
def main() -> None:
    device = torch.device("cuda")
    shape = sys.argv[1] if len(sys.argv) > 1 else "qwen2.5-0.5b"
    model = build_model(shape, device, torch.bfloat16)
    fast = engine_around(model, word_tokenizer(model.config.vocab_size), "fast")
    print("pool tokens", fast.reserve(0), flush=True)
    for size in (8, 512):
        rows = DecodeInputs(
            last_tokens=[1] * size,
            lengths=[301] * size,
            starts=[1 + i * 400 for i in range(size)],
            keys=[0] * size,
            generated=[1] * size,
        )
        fast.load_slots(rows, size)
        fast.use_graphs = False
        for _ in range(3):
            fast.decode_step(size, 301)
        torch.cuda.synchronize()
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            for _ in range(5):
                fast.decode_step(size, 301)
            torch.cuda.synchronize()
        print(f"=== {shape} slots {size}, eager, 5 steps")
        print(
            prof.key_averages().table(
                sort_by="cuda_time_total", row_limit=14, max_name_column_width=70
            )
        )


if __name__ == "__main__":
    main()

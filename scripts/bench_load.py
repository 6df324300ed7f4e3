"""How fast a saved model's weights reach the GPU, by way of loading (page cache warm).

  bulkinfer   transformers loads on the CPU (memory-mapped safetensors), then model.to(cuda)
  threads     the same load, then the tensors copied to the GPU by 8 threads at once
  staged      the same load, then bulkinfer's engines/to_device.py: each tensor copied in pieces
              through pinned staging buffers (one per thread, 8 threads)
  device_map  transformers loads straight onto the GPU (device_map="cuda")

On a GPU:  python scripts/bench_load.py MODEL_FOLDER [--out $OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def load_cpu(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()


def tensors_of(model) -> list[torch.Tensor]:
    seen, out = set(), []
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


def to_gpu_threads(model, device) -> None:
    """Each tensor copied by `.to(device)` from 8 threads at once (pageable memory)."""
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda t: setattr(t, "data", t.data.to(device)), tensors_of(model)))
    torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("folder", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    device = torch.device("cuda")
    torch.zeros(1, device=device)
    import transformers  # noqa: F401  (imports are not what is measured)

    from bulkinfer.engines.base import LoadOptions
    from bulkinfer.engines.hf import load_weights
    from bulkinfer.engines.to_device import move_model

    results = {}

    def measure(name, fn):
        torch.cuda.empty_cache()
        start = time.perf_counter()
        model = fn()
        torch.cuda.synchronize(device)
        results.setdefault(name, []).append(round(time.perf_counter() - start, 2))
        print(name, results[name], flush=True)
        del model
        torch.cuda.empty_cache()

    def bulkinfer_way():
        from transformers import AutoModelForCausalLM

        options = LoadOptions(args.folder, "model", device="cuda", dtype="bfloat16")
        return load_weights(AutoModelForCausalLM, options)[0]

    def threads():
        model = load_cpu(args.folder)
        to_gpu_threads(model, device)
        return model

    def staged():
        return move_model(load_cpu(args.folder), device)

    def device_map():
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(
            args.folder, dtype=torch.bfloat16, device_map="cuda"
        )

    for _ in range(2):
        measure("bulkinfer", bulkinfer_way)
        measure("threads", threads)
        measure("staged", staged)
        measure("device_map", device_map)
    print(json.dumps(results))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "load.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

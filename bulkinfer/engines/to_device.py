"""A loaded model's weights onto the GPU at pinned-memory speed.

transformers loads safetensors on the CPU as memory-mapped tensors; `model.to("cuda")` then
copies each from pageable memory, one at a time, at a few GB/s (16 GB of an 8B model in ~2.3 s
on an H200 with the page cache warm). Here several threads each copy tensors, in pieces,
through their own pinned staging buffer and CUDA stream: the reads from the page cache and the
copies to the GPU of different threads overlap (0.85 s for the same 16 GB; scripts/bench_load.py,
docs/perf.md). Anything not on a CUDA device moves the ordinary way.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

STAGE_BYTES = 64 << 20  # one thread's pinned staging buffer
THREADS = 8
# BULKINFER_CUDA_AHEAD=1: start CUDA on a thread while the tokenizer loads (start_device)
CUDA_AHEAD_ENV = "BULKINFER_CUDA_AHEAD"


def start_device(name: str) -> None:
    """Start CUDA on the GPU `name` (a model.device setting) on a thread, where the
    BULKINFER_CUDA_AHEAD=1 asks for it. The driver's start and the context's creation (~0.5 s of
    an H200 box) wait with the GIL released, so they overlap the tokenizer's imports on the main
    thread, which otherwise meet them later, when the engine's limits read the free memory. Any
    failure is left for that later, ordinary path to report."""
    if os.environ.get(CUDA_AHEAD_ENV) == "1" and name not in ("cpu", "mps"):
        threading.Thread(
            target=_start_cuda, args=(name,), name="bulkinfer-cuda", daemon=True
        ).start()


def _start_cuda(name: str) -> None:
    try:
        if not torch.cuda.is_available():
            return
        device = torch.device("cuda" if name == "auto" else name)
        if device.type == "cuda":
            torch.cuda.init()
            torch.empty(1, device=device)  # the context, through the allocator (GIL released)
    except Exception:  # noqa: BLE001 (only a head start)
        return


def move_model(
    model: torch.nn.Module, device: torch.device, beside: Callable[[], None] | None = None
) -> torch.nn.Module:
    """`model.to(device)`, with the tensors on the CPU staged through pinned memory when the
    device is a GPU. Tensors shared by several modules (tied weights) stay shared. `beside`:
    work for a thread of its own while the copies run (they wait on the page cache and the GPU
    with the GIL released), done when this returns."""
    if device.type != "cuda":
        return model.to(device)
    helper = None
    if beside is not None:
        helper = threading.Thread(target=beside, name="bulkinfer-beside-copy", daemon=True)
        helper.start()
    tensors, seen = [], set()
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in seen and t.device.type == "cpu" and t.numel():
            seen.add(id(t))
            tensors.append(t)
    mover = StagedMover(device)
    with ThreadPoolExecutor(THREADS, thread_name_prefix="bulkinfer-to-gpu") as pool:
        list(pool.map(mover.move, tensors))
    torch.cuda.synchronize(device)
    if helper is not None:
        helper.join()
    return model.to(device)  # what is left (nothing, or tensors of size zero)


class StagedMover:
    def __init__(self, device: torch.device):
        self.device = device
        self.local = threading.local()

    def move(self, tensor: torch.Tensor) -> None:
        """Copy `tensor` to the GPU piece by piece through this thread's buffer, then point the
        tensor (a Parameter keeps its identity) at the copy."""
        if not hasattr(self.local, "buffer"):
            self.local.buffer = torch.empty(STAGE_BYTES, dtype=torch.uint8, pin_memory=True)
            self.local.stream = torch.cuda.Stream(self.device)
        buffer, stream = self.local.buffer, self.local.stream
        source = tensor.data.contiguous().view(-1).view(torch.uint8)
        target = torch.empty(source.numel(), dtype=torch.uint8, device=self.device)
        # `target` may be memory the caching allocator took back from tensors that kernels
        # queued on the default stream still read (fp8 loading quantizes there while other
        # threads copy): the copies wait for them, or they overwrite weights in use
        stream.wait_stream(torch.cuda.current_stream(self.device))
        for start in range(0, source.numel(), STAGE_BYTES):
            piece = source[start : start + STAGE_BYTES]
            staged = buffer[: piece.numel()]
            staged.copy_(piece)
            with torch.cuda.stream(stream):
                target[start : start + piece.numel()].copy_(staged, non_blocking=True)
            stream.synchronize()  # the buffer is free again
        tensor.data = target.view(tensor.dtype).view(tensor.shape)

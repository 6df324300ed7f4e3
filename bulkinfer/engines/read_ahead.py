"""A run's checkpoint read onto the GPU while its set-up is still importing.

A second run of a job on a box spends its first seconds in Python (transformers' imports and the
tokenizer, ~2 s of an 8B job's set-up) with the GPU idle, and only then reads the weights onto
it (1.5-2 s for an 8B model from the page cache). Here, as soon as a run knows its model folder,
a thread copies every tensor of the folder's safetensors files into one device buffer, through
pinned staging buffers as engines/to_device.py moves a loaded model (the page-cache reads and
the copies wait with the GIL released, beside the imports). The loader then takes each tensor
from the buffer by file and name instead of reading it again (engines/fp8_loading.py,
`load_by_tensor`) and frees the buffer once the model is built.

Only for a job the fast engine may run, and on a GPU only where the files take at most
READ_AHEAD_SHARE of the free device memory (the model is built beside the buffer). The device
memory a planned engine counts as free includes the buffer (`free_memory`), so a run plans as
one without a read-ahead would. Off unless BULKINFER_READ_AHEAD=1 asks for it, until a GPU
measures what it saves (docs/perf.md); on any device then, the CPU too (the tests check what the
loader builds from it).
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import torch

from bulkinfer.engines.to_device import STAGE_BYTES, THREADS

READ_AHEAD_ENV = "BULKINFER_READ_AHEAD"
READ_AHEAD_SHARE = 0.4  # of the device's free memory, at most
ALIGN = 256  # bytes: each tensor's place in the buffer

_pending: ReadAhead | None = None  # the one a run started, until its loader takes it


class _Dropped(Exception):
    """No loader will take the copy."""


class ReadAhead:
    """The tensors of `files` copied to `device` on a thread; `get` waits for it."""

    def __init__(self, files: list[Path], device: torch.device):
        self.files, self.device = files, device
        self.tensors: dict[tuple[str, str], torch.Tensor] = {}
        self.held = 0  # device bytes the buffer takes
        self.seconds: float | None = None  # the copy's, once done (None: nothing read ahead)
        self._buffer: torch.Tensor | None = None
        self._lock = threading.Lock()  # the buffer's allocation against `free_memory`
        self._stop = threading.Event()  # no loader will take it: copy no more
        self._thread = threading.Thread(target=self._run, name="bulkinfer-read-ahead", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        started = time.monotonic()
        try:
            from safetensors import safe_open

            with ExitStack() as files:
                names, mapped = [], []  # (file, name); the tensor as the file maps it
                for file in self.files:
                    f = files.enter_context(safe_open(str(file), framework="pt", device="cpu"))
                    for key in f.keys():  # noqa: SIM118 (a safe_open handle)
                        names.append((str(file), key))
                        mapped.append(f.get_tensor(key))
                places, total = [], 0
                for tensor in mapped:
                    places.append(total)
                    total += -(-tensor.nbytes // ALIGN) * ALIGN
                if not self._allocate(total):
                    return
                with ThreadPoolExecutor(THREADS, thread_name_prefix="bulkinfer-read-ahead") as pool:
                    copied = list(pool.map(self._copy, mapped, places))
                self.tensors = dict(zip(names, copied, strict=True))
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.seconds = time.monotonic() - started
        except Exception:  # noqa: BLE001 (only a head start: the loader reads the files itself)
            self.close()

    def _allocate(self, total: int) -> bool:
        """The buffer, where it fits READ_AHEAD_SHARE of the free memory."""
        with self._lock:
            if self.device.type == "cuda":
                if total > READ_AHEAD_SHARE * torch.cuda.mem_get_info(self.device)[0]:
                    return False
                before = torch.cuda.memory_reserved(self.device)
            self._buffer = torch.empty(total, dtype=torch.uint8, device=self.device)
            self.held = (
                max(total, torch.cuda.memory_reserved(self.device) - before)
                if self.device.type == "cuda"
                else total
            )
        return True

    def _copy(self, source: torch.Tensor, place: int) -> torch.Tensor:
        """`source` copied into its place in the buffer, in pieces through this thread's pinned
        staging buffer on a GPU; the copy, viewed as `source` is."""
        raw = source.contiguous().view(-1).view(torch.uint8)
        target = self._buffer[place : place + raw.numel()]
        if self.device.type != "cuda":
            target.copy_(raw)
        else:
            local = _staging(self.device)
            with torch.cuda.stream(local.stream):
                for start in range(0, raw.numel(), STAGE_BYTES):
                    if self._stop.is_set():
                        raise _Dropped  # ends the copy (caught in _run)
                    piece = raw[start : start + STAGE_BYTES]
                    staged = local.buffer[: piece.numel()]
                    staged.copy_(piece)
                    target[start : start + piece.numel()].copy_(staged, non_blocking=True)
                    local.stream.synchronize()  # the staging buffer is free again
        return target.view(source.dtype).view(source.shape)

    def get(self, file: Path | str, key: str) -> torch.Tensor | None:
        """The tensor `key` of `file` on the device, once (None where it was not read ahead)."""
        self._thread.join()
        return self.tensors.pop((str(file), key), None)

    def drop(self) -> None:
        """Stop copying, then let go of the buffer."""
        self._stop.set()
        self._thread.join()
        self.close()

    def close(self) -> None:
        """Let go of the buffer (and give it back to the device)."""
        with self._lock:
            self.tensors, self._buffer, self.held = {}, None, 0
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


_local = threading.local()


def _staging(device: torch.device):
    """This thread's pinned staging buffer and its stream."""
    if not hasattr(_local, "buffer"):
        _local.buffer = torch.empty(STAGE_BYTES, dtype=torch.uint8, pin_memory=True)
        _local.stream = torch.cuda.Stream(device)
    return _local


def wanted(folder: Path, engine: str, attn_implementation, causal: bool, device: str) -> bool:
    """Whether a run reads its weights ahead: onto a CUDA device unless BULKINFER_READ_AHEAD=0
    (BULKINFER_READ_AHEAD=1 asks for it on any device), for a causal job the fast engine may
    run (a model type it implements, no attention implementation named unless the fast engine
    is asked by name)."""
    import json
    import os

    from bulkinfer.configs import SUPPORTED_TYPES

    asked = os.environ.get(READ_AHEAD_ENV, "").strip().lower()
    if asked in ("0", "false", "no", "off") or not causal or engine == "reference":
        return False
    if asked not in ("1", "true", "yes", "on"):
        where = _device(device)
        if where is None or where.type != "cuda" or not torch.cuda.is_available():
            return False
    if engine == "auto" and attn_implementation is not None:
        return False  # the reference engine runs what names its attention
    try:
        config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
        text = config.get("text_config") or config
        if text.get("model_type", config.get("model_type")) not in SUPPORTED_TYPES:
            return False
    except (OSError, ValueError, AttributeError):
        return False
    return True


def start(folder: Path, device: str, fp8: bool) -> None:
    """Read the safetensors files a load of `folder` reads (`fp8`: model.quantization: fp8)
    ahead onto `device` (a model.device setting)."""
    global _pending
    from bulkinfer.engines.fp8_loading import loaded_files

    drop()
    files = loaded_files(Path(folder), fp8)
    where = _device(device)
    if files and where is not None:
        _pending = ReadAhead(files, where)


def take(folder: Path, device: torch.device, fp8: bool, used: bool = True) -> ReadAhead | None:
    """The read-ahead of what a load of `folder` reads onto `device`, done, for its loader to
    use and close; None where there is none, or it read nothing (the files did not fit), or it
    is not `used` (one of other files or another device is let go of)."""
    global _pending
    from bulkinfer.engines.fp8_loading import loaded_files

    found, _pending = _pending, None
    if found is None:
        return None
    if not used:
        found.drop()
        return None
    found._thread.join()
    same = found.device == _device(str(device)) and found.files == loaded_files(Path(folder), fp8)
    if not (same and found.seconds is not None):
        found.close()
        return None
    return found


def _device(name: str) -> torch.device | None:
    """The device a model.device setting names, with its index; None where it names none
    this process can use (the loader says why)."""
    try:
        if name == "auto":
            name = "cuda" if torch.cuda.is_available() else "cpu"
        device = torch.device(name)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        return device
    except Exception:  # noqa: BLE001
        return None


def drop() -> None:
    """Let go of a read-ahead no loader will take (the engine planned reads no tensors by name)."""
    global _pending
    found, _pending = _pending, None
    if found is not None:
        found.drop()


def free_memory(device: torch.device) -> int:
    """The device's free memory as a run without a read-ahead would see it: what is free now
    plus what the read-ahead's buffer holds."""
    found = _pending
    if found is None or found.device != _device(str(device)):
        return torch.cuda.mem_get_info(device)[0]
    with found._lock:
        return torch.cuda.mem_get_info(device)[0] + found.held

"""How many bytes a GGUF file's header says it holds, read from the header alone: a file cut short
(a partial download) is named at once, where a loader fails seconds later, deep in its reader,
with a message about array shapes.

The format (little-endian): 'GGUF', version, tensor count, metadata count; the metadata
(key, type, value; arrays of any type, strings among them); per tensor its name, dimensions,
type and offset into the data, which starts at the header's end rounded up to the alignment
(`general.alignment`, else 32). Values are skipped, not decoded: a tokenizer's 50,000-string
vocabulary takes milliseconds.
"""

from __future__ import annotations

import struct
from pathlib import Path

DEFAULT_ALIGNMENT = 32
# metadata value types: struct format of the fixed-size ones; 8 is a string, 9 an array
_SCALARS = {
    0: "B",
    1: "b",
    2: "H",
    3: "h",
    4: "I",
    5: "i",
    6: "f",
    7: "?",
    10: "Q",
    11: "q",
    12: "d",
}
_STRING, _ARRAY = 8, 9


class _Cut(Exception):
    """The header ends before what it declares."""


class _Header:
    def __init__(self, f, size: int) -> None:
        self.f, self.size = f, size

    def read(self, fmt: str):
        n = struct.calcsize("<" + fmt)
        data = self.f.read(n)
        if len(data) < n:
            raise _Cut
        return struct.unpack("<" + fmt, data)[0]

    def skip(self, n: int) -> None:
        if n < 0 or self.f.tell() + n > self.size:
            raise _Cut
        self.f.seek(n, 1)

    def string(self) -> bytes:
        n = self.read("Q")
        if self.f.tell() + n > self.size:
            raise _Cut
        return self.f.read(n)

    def value(self, kind: int):
        """A metadata value: the number where it is one (alignment), else None, skipped."""
        if kind in _SCALARS:
            return self.read(_SCALARS[kind])
        if kind == _STRING:
            self.skip(self.read("Q"))
        elif kind == _ARRAY:
            inner, count = self.read("I"), self.read("Q")
            if inner in _SCALARS:
                self.skip(count * struct.calcsize("<" + _SCALARS[inner]))
            else:
                for _ in range(count):
                    self.value(inner)
        else:
            raise ValueError(f"metadata type {kind}")
        return None


def gguf_shortfall(path: Path) -> str | None:
    """Why the GGUF file is shorter than its header says ("its tensors need N bytes, the file
    has M"; "its header is cut short"), or None: whole, or not a layout this reads (an older
    version, a big-endian file, a tensor type the gguf package does not know), left to the
    loader."""
    try:
        from gguf.constants import GGML_QUANT_SIZES
    except ImportError:
        return None
    size = path.stat().st_size
    with open(path, "rb") as f:
        header = _Header(f, size)
        try:
            if f.read(4) != b"GGUF" or header.read("I") not in (2, 3):
                return None
            tensors, entries = header.read("Q"), header.read("Q")
            alignment = DEFAULT_ALIGNMENT
            for _ in range(entries):
                key = header.string()
                number = header.value(header.read("I"))
                if key == b"general.alignment" and isinstance(number, int) and number > 0:
                    alignment = number
            end = 0
            for _ in range(tensors):
                header.string()
                dims = [header.read("Q") for _ in range(header.read("I"))]
                kind, offset = header.read("I"), header.read("Q")
                block, block_bytes = GGML_QUANT_SIZES[kind]
                elements = 1
                for d in dims:
                    elements *= d
                end = max(end, offset + elements // block * block_bytes)
            start = -(-f.tell() // alignment) * alignment
        except _Cut:
            return f"its header is cut short at {size:,} bytes"
        except (KeyError, ValueError, struct.error):
            return None
    need = start + end
    return f"its tensors need {need:,} bytes, the file has {size:,}" if need > size else None

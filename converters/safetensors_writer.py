"""Write a .safetensors file one tensor at a time, so memory never holds more than one tensor.

`safetensors.torch.save_file` needs every tensor of a file in one dict; for multi-GB shards that is
the whole shard in RAM. The format is simple enough to stream: 8-byte little-endian header length,
a JSON header {name: {dtype, shape, data_offsets}} (padded with spaces to 8 bytes), then the raw
bytes in header order. Since the names, shapes and dtypes are known up front (converters/names.py),
the header is written first and the tensors follow as they are produced. The file is written to
`<name>.tmp` and renamed only when every byte is there, so a crash never leaves a file that looks
complete.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Sequence
from math import prod
from pathlib import Path
from types import TracebackType

import torch

from converters.errors import CheckpointError

DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32",
    torch.float8_e4m3fn: "F8_E4M3", torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8",
}


def nbytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    return prod(shape) * dtype.itemsize


class StreamingSafetensorsWriter:
    """`with StreamingSafetensorsWriter(path, [(name, shape, dtype), ...]) as w: w.write(name, tensor)`.

    Tensors must be written in the declared order with the declared shape and dtype.
    """

    def __init__(self, path: Path, layout: Sequence[tuple[str, tuple[int, ...], torch.dtype]],
                 metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self.layout = list(layout)
        self._next = 0
        header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
        offset = 0
        for name, shape, dtype in self.layout:
            end = offset + nbytes(shape, dtype)
            header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, end]}
            offset = end
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        self._header = struct.pack("<Q", len(blob)) + blob
        self.data_bytes = offset
        self._file = None

    def __enter__(self) -> StreamingSafetensorsWriter:
        self._file = open(self.tmp, "wb")  # noqa: SIM115 (closed in __exit__)
        self._file.write(self._header)
        return self

    def write(self, name: str, tensor: torch.Tensor) -> None:
        want_name, shape, dtype = self.layout[self._next]
        assert name == want_name, f"{self.path.name}: wrote {name}, expected {want_name} next"
        assert tuple(tensor.shape) == tuple(shape) and tensor.dtype == dtype, \
            (name, tuple(tensor.shape), tensor.dtype)
        raw = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
        self._file.write(memoryview(raw.numpy()))
        self._next += 1

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._file.close()
        if exc_type is not None:
            self.tmp.unlink(missing_ok=True)
            return
        if self._next != len(self.layout):
            self.tmp.unlink(missing_ok=True)
            missing = [n for n, _, _ in self.layout[self._next:]]
            raise CheckpointError(f"{self.path}: not written, {len(missing)} tensor(s) missing", missing[:5])
        os.replace(self.tmp, self.path)


def write_json(path: Path, data: object) -> None:
    """Write JSON through a temporary file and rename, so readers never see half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)

"""Read a .safetensors header without touching the data, and check it as strictly as safetensors does.

A 600 GB checkpoint must be listable, sized and validated in well under a second per shard, so
nothing here maps or reads tensor data: the file is `u64 little-endian header length N`, then N
bytes of JSON `{name: {dtype, shape, data_offsets: [start, end]}, "__metadata__": {...}}`, then
the data. The checks mirror the Rust loader's (`safe_open` refuses the same files), so a shard
that passes `read_header` also opens, and every failure is a CheckpointError naming the file.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import Any

from converters.errors import CheckpointError

MAX_HEADER_BYTES = 100_000_000  # the Rust loader's limit
DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "F32": 4, "I64": 8, "F64": 8,
}


@dataclass(frozen=True)
class HeaderEntry:
    """One tensor as the header describes it; offsets are relative to the start of the data."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class ShardHeader:
    path: Path
    header_bytes: int  # N, the JSON length
    entries: dict[str, HeaderEntry]
    metadata: dict[str, str]
    file_bytes: int

    @property
    def data_start(self) -> int:
        return 8 + self.header_bytes


def _bad(path: Path, why: str) -> CheckpointError:
    return CheckpointError(f"{path}: {why}; re-download or re-convert this file")


def _read_raw_header(path: Path) -> tuple[bytes, int]:
    """The JSON header bytes and the file size; refuses lengths that run past the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise _bad(path, f"is {size} bytes, too short for a safetensors file")
            (n,) = struct.unpack("<Q", prefix)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise _bad(path, f"header length {n} runs past the end of the {size}-byte file "
                                 "(truncated, or not a safetensors file)")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    if len(raw) != n:
        raise _bad(path, f"header truncated: read {len(raw)} of {n} bytes")
    return raw, size


def _is_count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _entry(path: Path, name: str, value: Any) -> HeaderEntry:
    """Parse one header entry; its byte range must match dtype x shape exactly."""
    if not isinstance(value, dict):
        raise _bad(path, f"header entry {name!r} is not an object")
    dtype, shape, offsets = value.get("dtype"), value.get("shape"), value.get("data_offsets")
    if dtype not in DTYPE_BYTES:
        raise _bad(path, f"tensor {name!r} has unsupported dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise _bad(path, f"tensor {name!r} has a malformed shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)
            and offsets[0] <= offsets[1]):
        raise _bad(path, f"tensor {name!r} has malformed data_offsets {offsets!r}")
    entry = HeaderEntry(dtype, tuple(shape), offsets[0], offsets[1])
    if entry.nbytes != prod(entry.shape) * DTYPE_BYTES[dtype]:
        raise _bad(path, f"tensor {name!r} spans {entry.nbytes} bytes but {dtype} x {list(shape)} needs "
                         f"{prod(entry.shape) * DTYPE_BYTES[dtype]}")
    return entry


def _check_layout(path: Path, entries: dict[str, HeaderEntry], data_bytes: int) -> None:
    """Tensors must tile the data region exactly, in offset order, as the Rust loader demands."""
    expected = 0
    for name, e in sorted(entries.items(), key=lambda kv: (kv[1].start, kv[1].end)):
        if e.start != expected:
            raise _bad(path, f"tensor {name!r} starts at data byte {e.start}, expected {expected} "
                             "(gap or overlap in data_offsets)")
        expected = e.end
    if expected > data_bytes:
        raise _bad(path, f"file is shorter than its header says: tensors need {expected} data bytes, "
                         f"the file holds {data_bytes} (truncated download?)")
    if expected < data_bytes:
        raise _bad(path, f"{data_bytes - expected} stray bytes after the last tensor")


def read_header(path: str | Path) -> ShardHeader:
    """Parse and check a shard's header; reads 8 + N bytes, never the tensor data."""
    path = Path(path)
    raw, size = _read_raw_header(path)
    if not raw.startswith(b"{"):
        raise _bad(path, "header does not start with '{' (not a safetensors file)")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise _bad(path, f"header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise _bad(path, "header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise _bad(path, "header __metadata__ must map strings to strings")
    entries = {name: _entry(path, name, value) for name, value in header.items()}
    _check_layout(path, entries, size - 8 - len(raw))
    return ShardHeader(path, len(raw), entries, metadata, size)

"""Read one tensor, or one slice of it, from a safetensors file with plain reads (no mmap).

Why not `safe_open`: it memory-maps the shard, and every page a read touches stays resident in
the mapping (and counted in RSS) until the handle closes, so RSS would grow with the shard size.
Here a dim-0 slice (an expert range, a row block) is read straight into its own buffer with one
`readinto` at its byte offset; any other slice reads the tensor, narrows and copies. Memory is the
result (plus the whole tensor for a non-dim-0 slice), and page-cache pages are never mapped.

A slice is a list of `[dim, start, stop]` (the AFD manifest's form); empty means the whole tensor.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from math import prod
from pathlib import Path

import torch

from converters.errors import CheckpointError
from converters.safetensors_io import ShardHeader, read_header
from converters.writer import TORCH_DTYPES

Slice = Sequence[Sequence[int]]  # [[dim, start, stop], ...]


@lru_cache(maxsize=64)
def _header_cached(path: str, size: int, mtime_ns: int) -> ShardHeader:
    return read_header(path)


def header_of(path: Path) -> ShardHeader:
    """The checked header of a shard, cached while the file is unchanged (size and mtime)."""
    try:
        st = path.stat()
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    return _header_cached(str(path), st.st_size, st.st_mtime_ns)


def sliced_shape(shape: Sequence[int], slc: Slice) -> tuple[int, ...]:
    out = list(shape)
    for dim, start, stop in slc:
        out[dim] = stop - start
    return tuple(out)


def _read_into(path: Path, offset: int, buf: torch.Tensor, name: str) -> torch.Tensor:
    view = memoryview(buf.reshape(-1).view(torch.uint8).numpy()) if buf.numel() else memoryview(b"")
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            got = 0
            while got < len(view):
                n = f.readinto(view[got:])
                if not n:
                    raise CheckpointError(f"{path}: truncated while reading tensor {name}; re-create it")
                got += n
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read tensor {name} ({e.strerror or e})") from None
    return buf


def read_tensor(path: Path, name: str, slc: Slice = ()) -> torch.Tensor:
    """`name` from the safetensors file `path`, or its slice `slc`, as a fresh contiguous tensor."""
    header = header_of(path)
    entry = header.entries.get(name)
    if entry is None:
        raise CheckpointError(f"{path}: has no tensor named {name}")
    dtype, shape = TORCH_DTYPES[entry.dtype], entry.shape
    for dim, start, stop in slc:
        if not (0 <= dim < len(shape) and 0 <= start <= stop <= shape[dim]):
            raise CheckpointError(f"{path}: slice [{dim}, {start}, {stop}] is outside tensor {name} "
                                  f"of shape {list(shape)}")
    base = header.data_start + entry.start
    if not slc or (len(slc) == 1 and slc[0][0] == 0):
        start, stop = (slc[0][1], slc[0][2]) if slc else (0, shape[0] if shape else 1)
        row_bytes = prod(shape[1:]) * dtype.itemsize
        buf = torch.empty((stop - start, *shape[1:]) if shape else (), dtype=dtype)
        return _read_into(path, base + start * row_bytes, buf, name)
    full = _read_into(path, base, torch.empty(shape, dtype=dtype), name)
    for dim, start, stop in slc:
        full = full.narrow(dim, start, stop - start)
    return full.contiguous()

"""Read one tensor, or one slice of it, from a safetensors file with plain reads (no mmap).

Why not `safe_open`: it maps the whole shard, and every page a read touches stays in the mapping
(counted in RSS) until the handle closes, so RSS would grow with the shard size. Here a whole
tensor or a dim-0 slice (an expert range, a row block) is a private mapping of exactly its bytes,
returned without a copy (hashing and writing it read the page cache directly, which is what keeps
`step3 convert` close to `cp`); the mapping goes when the array is freed, and it is copy-on-write,
so writing into it never reaches the file. Any other slice maps the tensor, slices and copies.
Memory: one tensor (plus its copy for a non-dim-0 slice).

`read_array` gives the raw bits as a numpy array (unsigned integers of the dtype's item size):
converting and verifying only move and compare bytes, so they never import torch (1.4 s).
`read_tensor` is the same as a torch tensor of the stored dtype, for the callers that compute.

A slice is a list of `[dim, start, stop]` (the AFD manifest's form); empty means the whole tensor.
"""

from __future__ import annotations

import mmap
from collections.abc import Sequence
from functools import lru_cache
from math import prod
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from converters.errors import CheckpointError
from converters.safetensors_io import DTYPE_BYTES, ShardHeader, read_header
from converters.writer import FileRange, torch_dtype

if TYPE_CHECKING:
    import torch

Slice = Sequence[Sequence[int]]  # [[dim, start, stop], ...]
BITS = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}  # item size -> numpy dtype of the raw bits


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


def _mapped(path: Path, offset: int, nbytes: int, name: str) -> np.ndarray:
    """Bytes [offset, offset + nbytes) of `path` as a uint8 array over a private (copy-on-write) mapping."""
    if nbytes == 0:
        return np.empty(0, dtype=np.uint8)
    start = offset - offset % mmap.ALLOCATIONGRANULARITY
    try:
        with open(path, "rb") as f:
            mm = mmap.mmap(f.fileno(), offset + nbytes - start, flags=mmap.MAP_PRIVATE,
                           prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=start)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read tensor {name} ({e}); truncated? re-create it") from None
    return np.frombuffer(mm, dtype=np.uint8, count=nbytes, offset=offset - start)


def byte_range(path: Path, name: str, slc: Slice = ()) -> FileRange | None:
    """Where `name` (or its slice) lies in `path` when its bytes are contiguous (whole, or a dim-0 slice)."""
    if len(slc) > 1 or (slc and slc[0][0] != 0):
        return None
    header = header_of(path)
    entry = header.entries.get(name)
    if entry is None:
        raise CheckpointError(f"{path}: has no tensor named {name}")
    if not slc:
        return FileRange(path, header.data_start + entry.start, entry.nbytes)
    _, start, stop = slc[0]
    row_bytes = entry.nbytes // entry.shape[0] if entry.shape[0] else 0
    return FileRange(path, header.data_start + entry.start + start * row_bytes, (stop - start) * row_bytes)


def read_piece(path: Path, name: str, slc: Slice = ()) -> np.ndarray | FileRange:
    """What the converter hands the writer: a byte range to stream when contiguous, else the slice's bits."""
    return byte_range(path, name, slc) or read_array(path, name, slc)


def as_tensor(bits: np.ndarray, dtype: str) -> torch.Tensor:
    """Raw bits (`read_array`) as a torch tensor of the safetensors dtype `dtype`, sharing the memory."""
    import torch

    flat = torch.from_numpy(np.ascontiguousarray(bits).reshape(-1).view(np.uint8))
    return flat.view(torch_dtype(dtype)).reshape(bits.shape)


def read_tensor(path: Path, name: str, slc: Slice = ()) -> torch.Tensor:
    """`name` from the safetensors file `path`, or its slice `slc`, as a contiguous torch tensor."""
    bits = read_array(path, name, slc)
    return as_tensor(bits, header_of(path).entries[name].dtype)


def read_array(path: Path, name: str, slc: Slice = ()) -> np.ndarray:
    """The raw bits of `name` (or its slice `slc`) in the safetensors file `path`, contiguous (see above)."""
    header = header_of(path)
    entry = header.entries.get(name)
    if entry is None:
        raise CheckpointError(f"{path}: has no tensor named {name}")
    bits, shape = BITS[DTYPE_BYTES[entry.dtype]], entry.shape
    for dim, start, stop in slc:
        if not (0 <= dim < len(shape) and 0 <= start <= stop <= shape[dim]):
            raise CheckpointError(f"{path}: slice [{dim}, {start}, {stop}] is outside tensor {name} "
                                  f"of shape {list(shape)}")
    base = header.data_start + entry.start
    if not slc or (len(slc) == 1 and slc[0][0] == 0):
        start, stop = (slc[0][1], slc[0][2]) if slc else (0, shape[0] if shape else 1)
        row_bytes = prod(shape[1:]) * DTYPE_BYTES[entry.dtype]
        raw = _mapped(path, base + start * row_bytes, (stop - start) * row_bytes, name)
        return raw.view(bits).reshape((stop - start, *shape[1:]) if shape else ())
    index = [slice(None)] * len(shape)
    for dim, start, stop in slc:
        index[dim] = slice(start, stop)
    full = _mapped(path, base, entry.nbytes, name).view(bits).reshape(shape)
    return np.ascontiguousarray(full[tuple(index)])

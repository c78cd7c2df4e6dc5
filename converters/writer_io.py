"""The byte-moving half of converters/writer.py: copies and writes, and a sha256 that follows them.

Measured on a 2-core box (step3-small, 844 MB, page cache): one sha256 pass costs ~0.5 CPU-s and a
copy ~0.22, so hashing inline would more than triple a conversion's time. Two choices keep it near `cp`:

- `FileHash` hashes each output file on a pool thread, reading back from the page cache what the
  writer has written so far (small read-only mappings, one at a time), so the checksum is of the
  bytes in the file, the writer never waits for it, and another file can be written meanwhile;
- `copy_file_range` (as `cp` does) is used only when source and output offsets share their place in
  a page: it moves the data page by page, and when the offsets differ every page is written in two
  pieces (~50% more CPU); other ranges are read into a CHUNK buffer and written from it, as cheap as
  an aligned kernel copy. (Cutting writes on page boundaries of the output measured no cheaper here,
  and made the kernel's time swing 2-4x from run to run on this virtual machine.)
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import numpy as np

from converters.errors import Step3Error

if TYPE_CHECKING:
    import torch

CHUNK = 1 << 20  # bytes per write call and copy buffer (stays in cache between the read and the write)
WINDOW = 8 << 20  # bytes per read-only mapping while hashing (RSS grows by one window per hash thread)
PAGE = mmap.PAGESIZE
KERNEL_COPY = hasattr(os, "copy_file_range")


@dataclass(frozen=True)
class FileRange:
    """Bytes already laid out as wanted in a file (a whole source tensor, an expert range): a producer may
    return this instead of a tensor, and the writer copies it with `copy_range` (no Python objects)."""

    path: Path
    offset: int
    nbytes: int


def tensor_view(t: torch.Tensor | np.ndarray) -> memoryview:
    """The raw little-endian bytes of a torch tensor or numpy array, without a copy when contiguous."""
    if not isinstance(t, np.ndarray):
        import torch  # already loaded: `t` is a torch tensor

        t = t.detach().cpu().contiguous().reshape(-1)
        t = t.view(torch.uint8).numpy() if t.numel() else np.empty(0, np.uint8)
    return memoryview(np.ascontiguousarray(t).reshape(-1).view(np.uint8))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        hash_mapped(h, f.fileno(), 0, os.fstat(f.fileno()).st_size)
    return h.hexdigest()


def hash_mapped(h: hashlib._Hash, fd: int, pos: int, end: int) -> None:
    """Feed bytes [pos, end) of the open file `fd` to `h` through read-only mappings of WINDOW bytes (no
    copy out of the page cache; each is unmapped before the next, so RSS grows by one window at most)."""
    while pos < end:
        start = pos - pos % mmap.ALLOCATIONGRANULARITY  # mappings start on a granule
        length = min(end - start, pos - start + max(WINDOW, mmap.ALLOCATIONGRANULARITY))
        with mmap.mmap(fd, length, offset=start, access=mmap.ACCESS_READ) as mm, memoryview(mm) as view:
            h.update(view[pos - start:])
        pos = start + length


def write_all(f: BinaryIO, view: memoryview, wrote: Callable[[int], None]) -> None:
    """Append `view` to the unbuffered file `f`, CHUNK bytes per call (a raw write may be short: loop)."""
    for i in range(0, len(view), CHUNK):
        part = view[i:i + CHUNK]
        n = len(part)
        while part:
            part = part[f.write(part):]
        wrote(n)


def copy_range(f: BinaryIO, r: FileRange, wrote: Callable[[int], None]) -> None:
    """Append a byte range to the unbuffered file `f`: `copy_file_range` when source and output offsets
    share their place in a page, else through a CHUNK buffer (see the module docstring)."""
    done = 0
    with open(r.path, "rb", buffering=0) as src:
        if KERNEL_COPY and (r.offset - f.tell()) % PAGE == 0:
            with contextlib.suppress(OSError):  # EXDEV, ENOSYS, EINVAL: go on with read/write
                while done < r.nbytes:
                    n = os.copy_file_range(src.fileno(), f.fileno(), min(r.nbytes - done, CHUNK),
                                           r.offset + done)
                    if not n:
                        break
                    wrote(n)
                    done += n
        src.seek(r.offset + done)
        buf = memoryview(bytearray(min(CHUNK, r.nbytes - done)))
        while done < r.nbytes:
            n = min(CHUNK, r.nbytes - done)
            if src.readinto(buf[:n]) != n:
                raise Step3Error(f"{r.path}: ended {r.nbytes - done} bytes early while copying; was it "
                                 f"truncated? Re-run with --force.")
            write_all(f, buf[:n], wrote)
            done += n


class FileHash:
    """sha256 of one output file, computed on a pool thread that follows the writer through the file:
    `wrote(n)` says n more bytes are in it, `close()` that there are no more (call it on failure too, so
    the thread ends); `result` then holds the hex digest."""

    def __init__(self, pool: Executor, path: Path):
        self._end, self._closed = 0, False
        self._moved = threading.Condition()
        self.result: Future[str] = pool.submit(self._run, path)

    def wrote(self, n: int) -> None:
        with self._moved:
            self._end += n
            self._moved.notify()

    def close(self) -> None:
        with self._moved:
            self._closed = True
            self._moved.notify()

    def _next(self, pos: int) -> tuple[int, bool]:
        """Wait until the file holds more than `pos` bytes, or is closed: (bytes written, closed)."""
        with self._moved:
            self._moved.wait_for(lambda: self._end > pos or self._closed)
            return self._end, self._closed

    def _run(self, path: Path) -> str:
        h, pos, closed = hashlib.sha256(), 0, False
        with open(path, "rb") as f:
            while not closed:
                end, closed = self._next(pos)
                hash_mapped(h, f.fileno(), pos, end)
                pos = end
        return h.hexdigest()

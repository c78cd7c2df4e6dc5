"""The byte-moving half of converters/writer.py: kernel copies, and sha256 computed beside the writes.

Why a helper thread per file: sha256 runs at ~2 GB/s per core, slower than a page-cache copy, so
hashing inline would double a conversion's time. `FileHash` hashes one output file in byte order on
a pool thread while the writer goes on: a `FileRange` (bytes copied by `copy_file_range`) is hashed
straight from its source's page cache through small read-only mappings, with no hand-off; a produced
tensor is handed over and the writer waits for it before producing the next, so at most one tensor
is alive. The pool's other thread finishes the previous file meanwhile.
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
import queue
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

CHUNK = 16 << 20  # bytes per copy/write/hash call, and per mapping window while hashing
KERNEL_COPY = hasattr(os, "copy_file_range")


@dataclass(frozen=True)
class FileRange:
    """Bytes already laid out as wanted in a file (a whole source tensor, an expert range): a producer may
    return this instead of a tensor, and the writer copies it in the kernel, like `cp`."""

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
    hash_range(h, FileRange(path, 0, path.stat().st_size))
    return h.hexdigest()


def hash_range(h: hashlib._Hash, r: FileRange) -> None:
    """Feed a file's byte range to `h` through read-only mappings of CHUNK bytes (no copy out of the page
    cache; RSS grows by one window at most, since each is unmapped before the next)."""
    with open(r.path, "rb") as f:
        pos, end = r.offset, r.offset + r.nbytes
        while pos < end:
            start = pos - pos % mmap.ALLOCATIONGRANULARITY  # mappings start on a granule
            length = min(end - start, pos - start + max(CHUNK, mmap.ALLOCATIONGRANULARITY))
            with mmap.mmap(f.fileno(), length, offset=start, access=mmap.ACCESS_READ) as mm:
                h.update(memoryview(mm)[pos - start:])
            pos = start + length


def copy_range(f: BinaryIO, r: FileRange, tick: Callable[[int], None]) -> None:
    """Append a byte range to `f` (unbuffered): `copy_file_range` as `cp` does, else read/write."""
    left = r.nbytes
    with open(r.path, "rb", buffering=0) as src:
        if KERNEL_COPY:
            with contextlib.suppress(OSError):  # EXDEV, ENOSYS, EINVAL: fall back to read/write
                while left:
                    at = r.offset + r.nbytes - left
                    n = os.copy_file_range(src.fileno(), f.fileno(), min(left, CHUNK), at)
                    if not n:
                        break
                    tick(n)
                    left -= n
        src.seek(r.offset + r.nbytes - left)
        buf = memoryview(bytearray(min(CHUNK, left)))
        while left:
            n = src.readinto(buf[:min(left, len(buf))])
            if not n:
                raise Step3Error(f"{r.path}: ended {left} bytes early while copying; was it truncated? "
                                 f"Re-run with --force.")
            f.write(buf[:n])
            tick(n)
            left -= n


class FileHash:
    """sha256 of one output file, fed in byte order, computed on a pool thread (see the module doc)."""

    def __init__(self, pool: Executor, header: bytes):
        self._items: queue.SimpleQueue = queue.SimpleQueue()
        self._h = hashlib.sha256(header)
        self.result: Future[str] = pool.submit(self._run)

    def _run(self) -> str:
        while (item := self._items.get()) is not None:
            data, done = item
            try:
                if isinstance(data, FileRange):
                    hash_range(self._h, data)
                else:
                    self._h.update(data)
            finally:
                if done is not None:
                    done.set()
        return self._h.hexdigest()

    def add_range(self, r: FileRange) -> None:
        self._items.put((r, None))

    def add_bytes(self, view: memoryview) -> threading.Event:
        """Hash `view` next; the caller keeps it alive until the returned event is set."""
        done = threading.Event()
        self._items.put((view, done))
        return done

    def close(self) -> None:
        """No more bytes: the hash completes (also call it after a failure, so the thread ends)."""
        self._items.put(None)

"""Atomic, checksummed, resumable output writer: shared by `step3 convert` and `step3 quantize`.

The caller plans the whole output ahead as a deterministic `OutputPlan`: data files (safetensors,
each an ordered list of tensors with a producer callable), verbatim copies (tokenizer files) and a
`final` function that, given every file's (bytes, sha256), returns the small JSON files written
last (`manifest.json`, or `config.json` + `model.safetensors.index.json`). `write_output` then:

- refuses a non-empty OUT unless `resume` or `force` (force deletes only paths this plan or an
  earlier run recorded, never unrelated files);
- deletes the final files first, so an interrupted run never looks complete;
- writes each file to `<path>.partial`; a helper thread hashes it, reading back from the page cache
  what has been written so far (also while the next file is written), and only once the hash is
  known is it renamed into place and journaled; the journal
  (`.step3-write.json`: the plan's fingerprint and each finished file's bytes/sha256) lets `resume`
  skip files whose checksum still matches; a different fingerprint is refused;
- checks free disk space before writing (needed vs free) and turns ENOSPC into a Step3Error that
  says to free space and re-run with resume;
- streams: safetensors headers are built from the declared dtypes/shapes, then each tensor is
  produced, written and dropped, so memory holds one tensor (plus its producer's source) at a
  time, and the bytes are the same on every run. A producer may return a `FileRange` instead of a
  tensor (bytes already laid out in a source file): those are copied without passing through
  Python objects (converters/writer_io.py: `copy_file_range` as `cp`, or a small buffer).
  Producers are called in plan order (file by file), which `step3 quantize`'s one-slot cache needs.

Guarantees are against process death (kill -9): files are not fsynced, so after a power loss run
`step3 verify`, which re-checks every checksum.

How `step3 quantize` (HF -> HF-FP8) uses it, for example:

    def q(name):                       # quantize once per weight, hand out weight then scale
        ...                            # (a one-slot cache: the writer calls producers in file order)
    files = [SafetensorsFile("model-00001-of-00002.safetensors", (
                TensorOut("model.layers.0.mlp.up_proj.weight", torch.float8_e4m3fn, (512, 320),
                          lambda: q("model.layers.0.mlp.up_proj.weight")[0]),
                TensorOut("model.layers.0.mlp.up_proj.weight_scale_inv", torch.float32, (4, 3),
                          lambda: q("model.layers.0.mlp.up_proj.weight")[1]),
                ...)),
             CopyFile("tokenizer.json", src / "tokenizer.json")]
    def final(records):                # records: {relpath: FileRecord} of every data/copy file
        return [("config.json", json_bytes(cfg_with_quantization_config)),
                ("model.safetensors.index.json", json_bytes(index))]
    plan = OutputPlan(tuple(files), final, fingerprint=f"quantize fp8 {src.resolve()} {options}",
                      final_names=("config.json", "model.safetensors.index.json"))
    write_output(out_dir, plan, resume=resume, force=force, progress=progress)
"""

from __future__ import annotations

import json
import os
import struct
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from math import prod
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import numpy as np

from converters.errors import Step3Error
from converters.safetensors_io import DTYPE_BYTES
from converters.writer_io import FileHash, FileRange, copy_range, sha256_file, tensor_view, write_all
from converters.writer_state import (
    JOURNAL,
    PARTIAL,
    FileRecord,
    Journal,
    atomic_write,
    check_space,
    disk_errors,
    json_bytes,
    prepare,
    record_of,
    still_valid,
)

if TYPE_CHECKING:  # torch is imported only where a torch tensor or dtype is handled: converting needs none
    import torch

    Produced = torch.Tensor | np.ndarray | FileRange  # a producer's result: see TensorOut

# What callers import from here (the writer's whole interface lives in this one module name).
__all__ = ["JOURNAL", "PARTIAL", "CopyFile", "FileRange", "FileRecord", "OutputPlan", "SafetensorsFile",
           "TensorOut", "WriteResult", "atomic_write", "dtype_name", "json_bytes", "record_of", "sha256_file",
           "tensor_view", "torch_dtype", "write_output"]

# safetensors header dtype <-> torch dtype attribute name (torch.<name>)
_TORCH_NAMES = {"BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "I32": "int32", "I64": "int64",
                "F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64",
                "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
_ST_NAMES = {v: k for k, v in _TORCH_NAMES.items()}


def _st_name(dtype: str | torch.dtype) -> str:
    return dtype if isinstance(dtype, str) else _ST_NAMES.get(str(dtype).removeprefix("torch."), str(dtype))


def dtype_name(dtype: str | torch.dtype) -> str:
    """The safetensors dtype string ("BF16", "F8_E4M3", ...) of a torch dtype or of such a string."""
    name = _st_name(dtype)
    if name not in _TORCH_NAMES:
        raise Step3Error(f"dtype {dtype} cannot be stored in safetensors; use one of "
                         f"{', '.join(_TORCH_NAMES)}")
    return name


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype string (imports torch: only for callers that want tensors)."""
    import torch

    return getattr(torch, _TORCH_NAMES[dtype_name(name)])


ProgressFn = Callable[[int, int, str], None]


@dataclass(frozen=True)
class TensorOut:
    """One tensor of an output file: declared ahead (name, dtype, shape); produced when written.

    `dtype` may be given as a torch dtype or a safetensors string; it is kept as the string. `produce`
    returns a torch tensor, a numpy array of the raw bits (same shape and item size), or a FileRange."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    produce: Callable[[], Produced] = field(compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", dtype_name(self.dtype))

    @property
    def nbytes(self) -> int:
        return prod(self.shape) * DTYPE_BYTES[self.dtype]


@dataclass(frozen=True)
class SafetensorsFile:
    """A safetensors file written incrementally: header first, then each tensor's bytes in order."""

    path: str  # relative to OUT, '/'-separated
    tensors: tuple[TensorOut, ...]
    metadata: dict[str, str] | None = None

    def header(self) -> bytes:
        """The 8-byte length + JSON header (space-padded to 8 bytes), exactly as written."""
        head: dict[str, object] = {"__metadata__": self.metadata} if self.metadata else {}
        offset = 0
        for t in self.tensors:
            head[t.name] = {"dtype": t.dtype, "shape": list(t.shape),
                            "data_offsets": [offset, offset + t.nbytes]}
            offset += t.nbytes
        raw = json.dumps(head, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        return struct.pack("<Q", len(raw)) + raw

    @property
    def nbytes(self) -> int:
        return len(self.header()) + sum(t.nbytes for t in self.tensors)


@dataclass(frozen=True)
class CopyFile:
    """A file copied verbatim (tokenizer files, chat templates)."""

    path: str
    source: Path

    @property
    def nbytes(self) -> int:
        return self.source.stat().st_size


FinalFn = Callable[[dict[str, FileRecord]], Sequence[tuple[str, bytes]]]


@dataclass(frozen=True)
class OutputPlan:
    """Everything an output will hold. `fingerprint` names the inputs/options: resume refuses another."""

    files: tuple[SafetensorsFile | CopyFile, ...]
    final: FinalFn
    fingerprint: str
    final_names: tuple[str, ...]  # what `final` returns, in order; deleted first on every run

    @property
    def nbytes(self) -> int:
        return sum(f.nbytes for f in self.files)


@dataclass
class WriteResult:
    records: dict[str, FileRecord]  # every data/copy file
    finals: list[str]
    written: list[str]
    skipped: list[str]  # already complete (resume)
    bytes_written: int
    seconds: float


# ---- the run ---------------------------------------------------------------------------------------
def _produced_as(data: Produced) -> str:
    """What a producer returned, in the terms of a TensorOut: 'BF16 [4, 8]', '2-byte items [4, 8]', ..."""
    if isinstance(data, FileRange):
        return f"{data.nbytes} bytes"
    if isinstance(data, np.ndarray):  # raw bits: only the item size is known
        return f"{data.itemsize}-byte items {list(data.shape)}"
    return f"{_st_name(data.dtype)} {list(data.shape)}"


def _check_produced(spec: SafetensorsFile, t: TensorOut, data: Produced) -> None:
    want = (f"{t.nbytes} bytes" if isinstance(data, FileRange)
            else f"{DTYPE_BYTES[t.dtype]}-byte items {list(t.shape)}" if isinstance(data, np.ndarray)
            else f"{t.dtype} {list(t.shape)}")
    if _produced_as(data) != want:
        raise Step3Error(f"{t.name}: expected {t.dtype} {list(t.shape)} for {spec.path}, "
                         f"got {_produced_as(data)}; the source changed while writing? Re-run with --force.")


def _write_safetensors(f: BinaryIO, spec: SafetensorsFile, wrote: Callable[[int], None]) -> None:
    """Header, then each tensor as it is produced: a tensor's bytes are written and dropped before the
    next is produced (one tensor alive at a time); a byte range is copied from its file."""
    write_all(f, memoryview(spec.header()), wrote)
    for t in spec.tensors:
        data = t.produce()
        _check_produced(spec, t, data)
        if isinstance(data, FileRange):
            copy_range(f, data, wrote)
        else:
            write_all(f, tensor_view(data), wrote)
        del data


def _copy_file(f: BinaryIO, spec: CopyFile, wrote: Callable[[int], None]) -> None:
    copy_range(f, FileRange(spec.source, 0, spec.nbytes), wrote)


def _write_body(out: Path, spec: SafetensorsFile | CopyFile, tick: Callable[[int], None],
                pool: Executor) -> tuple[Path, Future[str]]:
    """Write one planned file to its `.partial` name; returns that path (renamed once hashed) and the hash."""
    path = out / spec.path
    tmp = path.with_name(path.name + PARTIAL)
    write = _copy_file if isinstance(spec, CopyFile) else _write_safetensors
    with disk_errors(path, spec.nbytes):
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb", buffering=0) as f:
            digest = FileHash(pool, tmp)

            def wrote(n: int) -> None:
                digest.wrote(n)
                tick(n)

            try:
                write(f, spec, wrote)
            finally:
                digest.close()
    return tmp, digest.result


class _Hashing:
    """The files written but not yet hashed. A file is renamed into place and journaled only once its
    sha256 is known, in plan order; at most THREADS files are in flight (one being written), so the
    hashes read bytes written recently enough to still be in the page cache."""

    THREADS = 2

    def __init__(self, out: Path, journal: Journal):
        self.out, self.journal = out, journal
        self.pool = ThreadPoolExecutor(max_workers=self.THREADS, thread_name_prefix="step3-sha256")
        self.inflight: deque[tuple[str, Path, Future[str]]] = deque()

    def make_room(self) -> None:
        """Before writing a file: finish done ones, and wait until a hash thread is free for it."""
        while self.inflight and (self.inflight[0][2].done() or len(self.inflight) >= self.THREADS):
            self._finish()

    def add(self, rel: str, tmp: Path, sha: Future[str]) -> None:
        self.inflight.append((rel, tmp, sha))

    def _finish(self) -> None:
        rel, tmp, sha = self.inflight.popleft()
        record = FileRecord(tmp.stat().st_size, sha.result())
        os.replace(tmp, self.out / rel)
        self.journal.add(rel, record)

    def close(self, ok: bool) -> None:
        """Finish the files already written, even when the run failed later (a resume then skips them);
        after a failure, a problem while finishing must not hide the first error."""
        try:
            while self.inflight:
                try:
                    self._finish()
                except (OSError, Step3Error):
                    if ok:
                        raise
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)


def write_output(out: Path | str, plan: OutputPlan, *, resume: bool = False, force: bool = False,
                 progress: ProgressFn | None = None) -> WriteResult:
    """Write `plan` into `out` (see the module docstring); returns what was written and skipped."""
    out, start = Path(out), time.perf_counter()
    paths = [f.path for f in plan.files]
    assert len(set(paths)) == len(paths), "duplicate output paths in the plan"
    journal = prepare(out, plan, resume, force)
    total = plan.nbytes
    report = progress or (lambda d, t, label="": None)
    skipped = [f.path for f in plan.files if still_valid(out, journal, f)]
    journal.records = {k: journal.records[k] for k in skipped}
    journal.save()
    todo = [f for f in plan.files if f.path not in set(skipped)]
    check_space(out, sum(f.nbytes for f in todo))
    done = total - sum(f.nbytes for f in todo)
    report(done, total, "checked existing files" if skipped else "")
    written = 0
    hashing, ok = _Hashing(out, journal), False
    try:
        for spec in todo:
            def tick(n: int, label: str = spec.path) -> None:
                nonlocal done, written
                done, written = done + n, written + n
                report(done, total, label)

            hashing.make_room()
            hashing.add(spec.path, *_write_body(out, spec, tick, hashing.pool))
        ok = True
    finally:
        hashing.close(ok)
    records = {f.path: journal.records[f.path] for f in plan.files}
    finals = list(plan.final(records))
    assert tuple(r for r, _ in finals) == plan.final_names, "plan.final must return plan.final_names"
    for rel, data in finals:
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(out / rel, data)
    report(total, total, "done")
    return WriteResult(records, [r for r, _ in finals], [f.path for f in todo], skipped, written,
                       time.perf_counter() - start)

"""Atomic, checksummed, resumable output writer: shared by `step3 convert` and `step3 quantize`.

The caller plans the whole output ahead as a deterministic `OutputPlan`: data files (safetensors,
each an ordered list of tensors with a producer callable), verbatim copies (tokenizer files) and a
`final` function that, given every file's (bytes, sha256), returns the small JSON files written
last (`manifest.json`, or `config.json` + `model.safetensors.index.json`). `write_output` then:

- refuses a non-empty OUT unless `resume` or `force` (force deletes only paths this plan or an
  earlier run recorded, never unrelated files);
- deletes the final files first, so an interrupted run never looks complete;
- writes each file to `<path>.partial`; helper threads hash it (read back from the page cache while
  the next file is written) and only then is it renamed into place and journaled; the journal
  (`.step3-write.json`: the plan's fingerprint and each finished file's bytes/sha256) lets `resume`
  skip files whose checksum still matches; a different fingerprint is refused;
- checks free disk space before writing (needed vs free) and turns ENOSPC into a Step3Error that
  says to free space and re-run with resume;
- streams: safetensors headers are built from the declared dtypes/shapes, then each tensor is
  produced, written and dropped, so memory holds one tensor (plus its producer's source) at a
  time, and the bytes are the same on every run. A producer may return a `FileRange` instead of a
  tensor (bytes already laid out in a source file): those are copied in the kernel, like `cp`.

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

import torch

from converters.errors import Step3Error
from converters.writer_io import CHUNK, FileHash, FileRange, copy_range, sha256_file, tensor_view
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

# What callers import from here (the writer's whole interface lives in this one module name).
__all__ = ["JOURNAL", "PARTIAL", "ST_DTYPES", "TORCH_DTYPES", "CopyFile", "FileRange", "FileRecord",
           "OutputPlan", "SafetensorsFile", "TensorOut", "WriteResult", "json_bytes", "record_of",
           "sha256_file", "tensor_view", "write_output"]

# torch dtype <-> safetensors header dtype
ST_DTYPES: dict[torch.dtype, str] = {
    torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.int32: "I32",
    torch.int64: "I64", torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32",
    torch.float64: "F64", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
TORCH_DTYPES: dict[str, torch.dtype] = {v: k for k, v in ST_DTYPES.items()}

ProgressFn = Callable[[int, int, str], None]


@dataclass(frozen=True)
class TensorOut:
    """One tensor of an output file: declared ahead (name, dtype, shape); produced when written."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    produce: Callable[[], torch.Tensor | FileRange] = field(compare=False, repr=False)

    @property
    def nbytes(self) -> int:
        return prod(self.shape) * self.dtype.itemsize


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
            head[t.name] = {"dtype": ST_DTYPES[t.dtype], "shape": list(t.shape),
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
def _check_produced(spec: SafetensorsFile, t: TensorOut, data: torch.Tensor | FileRange) -> None:
    ok = (data.nbytes == t.nbytes if isinstance(data, FileRange)
          else data.dtype == t.dtype and tuple(data.shape) == tuple(t.shape))
    if not ok:
        got = (f"{data.nbytes} bytes" if isinstance(data, FileRange)
               else f"{ST_DTYPES.get(data.dtype, data.dtype)} {list(data.shape)}")
        raise Step3Error(f"{t.name}: expected {ST_DTYPES[t.dtype]} {list(t.shape)} for {spec.path}, "
                         f"got {got}; the source changed while writing? Re-run with --force.")


def _write_safetensors(dst: Path, spec: SafetensorsFile, tick: Callable[[int], None],
                       pool: Executor) -> Future[str]:
    """Header, then each tensor as it is produced (a tensor, or a byte range copied from its file), with
    the sha256 computed beside the writes (writer_io.FileHash); returns the hash's future."""
    header = spec.header()
    digest = FileHash(pool, header)
    try:
        with open(dst, "wb", buffering=0) as f:
            f.write(header)
            for t in spec.tensors:
                data = t.produce()
                _check_produced(spec, t, data)
                if isinstance(data, FileRange):
                    digest.add_range(data)
                    copy_range(f, data, tick)
                    continue
                view = tensor_view(data)
                hashed = digest.add_bytes(view)
                for i in range(0, len(view), CHUNK):
                    f.write(view[i:i + CHUNK])
                    tick(min(CHUNK, len(view) - i))
                hashed.wait()  # one tensor alive at a time
                del data, view
    finally:
        digest.close()
    return digest.result


def _copy_file(dst: Path, spec: CopyFile, tick: Callable[[int], None], pool: Executor) -> Future[str]:
    digest = FileHash(pool, b"")
    try:
        with open(dst, "wb", buffering=0) as f:
            r = FileRange(spec.source, 0, spec.nbytes)
            digest.add_range(r)
            copy_range(f, r, tick)
    finally:
        digest.close()
    return digest.result


def _write_body(out: Path, spec: SafetensorsFile | CopyFile, tick: Callable[[int], None],
                pool: Executor) -> tuple[Path, Future[str]]:
    """Write one planned file to its `.partial` name; returns that path (renamed once hashed) and the hash."""
    path = out / spec.path
    tmp = path.with_name(path.name + PARTIAL)
    with disk_errors(path, spec.nbytes):
        path.parent.mkdir(parents=True, exist_ok=True)
        write = _copy_file if isinstance(spec, CopyFile) else _write_safetensors
        return tmp, write(tmp, spec, tick, pool)


class _Hashing:
    """The files written but not yet hashed. A file is renamed into place and journaled only once its
    sha256 is known, in plan order; at most THREADS files are in flight (one being written)."""

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

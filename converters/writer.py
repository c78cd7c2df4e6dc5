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

import errno
import hashlib
import json
import os
import shutil
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

JOURNAL = ".step3-write.json"
PARTIAL = ".partial"

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


@dataclass(frozen=True)
class FileRecord:
    bytes: int
    sha256: str

    def to_json(self) -> dict[str, object]:
        return {"bytes": self.bytes, "sha256": self.sha256}


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


def json_bytes(obj: object) -> bytes:
    """Deterministic, human-readable JSON for the final files."""
    return (json.dumps(obj, indent=2) + "\n").encode()


def record_of(data: bytes) -> FileRecord:
    return FileRecord(len(data), hashlib.sha256(data).hexdigest())


# ---- the run ---------------------------------------------------------------------------------------
class _Journal:
    """`.step3-write.json`: the plan fingerprint and the files finished so far (rewritten atomically)."""

    def __init__(self, out: Path, fingerprint: str, records: dict[str, FileRecord] | None = None):
        self.path, self.fingerprint, self.records = out / JOURNAL, fingerprint, dict(records or {})

    @classmethod
    def load(cls, out: Path) -> _Journal | None:
        try:
            d = json.loads((out / JOURNAL).read_text())
            recs = {k: FileRecord(int(v["bytes"]), str(v["sha256"])) for k, v in d["files"].items()}
            return cls(out, str(d["fingerprint"]), recs)
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None

    def add(self, path: str, record: FileRecord) -> None:
        self.records[path] = record
        self.save()

    def save(self) -> None:
        files = {k: self.records[k].to_json() for k in sorted(self.records)}
        body = {"fingerprint": self.fingerprint, "files": files}
        _atomic_write(self.path, json_bytes(body))


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + PARTIAL)
    with _disk_errors(path):
        tmp.write_bytes(data)
        os.replace(tmp, path)


class _disk_errors:
    """Turns ENOSPC/EDQUOT while writing `path` into a Step3Error (and removes the partial file)."""

    def __init__(self, path: Path, total: int = 0):
        self.path, self.total = path, total

    def __enter__(self) -> None:
        return None

    def __exit__(self, typ: type | None, exc: BaseException | None, tb: object) -> bool:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            self.path.with_name(self.path.name + PARTIAL).unlink(missing_ok=True)
            size = f" ({_gb(self.total)})" if self.total else ""
            raise Step3Error(f"out of disk space while writing {self.path}{size}. Free some space on that "
                             f"disk, then re-run the same command with --resume to finish "
                             f"(finished files are kept and skipped).") from None
        return False


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.2f} MB"


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
    with _disk_errors(path, spec.nbytes):
        path.parent.mkdir(parents=True, exist_ok=True)
        write = _copy_file if isinstance(spec, CopyFile) else _write_safetensors
        return tmp, write(tmp, spec, tick, pool)


class _Hashing:
    """The files written but not yet hashed. A file is renamed into place and journaled only once its
    sha256 is known, in plan order; at most THREADS files are in flight (one being written)."""

    THREADS = 2

    def __init__(self, out: Path, journal: _Journal):
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


def _prepare(out: Path, plan: OutputPlan, resume: bool, force: bool) -> _Journal:
    """Check OUT against resume/force, delete what must go, return the journal to continue."""
    if out.exists() and not out.is_dir():
        raise Step3Error(f"{out}: exists and is not a directory; choose another output path")
    existing = [p.name for p in out.iterdir()] if out.exists() else []
    old = _Journal.load(out) if existing else None
    if existing and not (resume or force):
        raise Step3Error(f"{out}: output directory is not empty. Pass --resume to finish an interrupted run "
                         f"into it, or --force to overwrite it (or choose an empty directory).")
    if existing and resume and not force:
        if old is None:
            raise Step3Error(f"{out}: not empty and has no record of an interrupted step3 run ({JOURNAL} is "
                             f"missing), so --resume cannot trust its files; use --force to overwrite it.")
        if old.fingerprint != plan.fingerprint:
            raise Step3Error(f"{out}: was started with other inputs or options than this run "
                             f"(recorded: {old.fingerprint!r}); re-run with the same ones, or use --force.")
    out.mkdir(parents=True, exist_ok=True)
    for name in reversed(plan.final_names):  # first, so an interrupted run never looks complete
        (out / name).unlink(missing_ok=True)
    planned = {f.path for f in plan.files}
    stale = set(old.records) if old else set()
    if force:
        stale |= planned
    for rel in sorted(stale - (planned if resume and not force else set())):
        (out / rel).unlink(missing_ok=True)
    for rel in sorted(planned):
        (out / (rel + PARTIAL)).unlink(missing_ok=True)
    keep = {k: v for k, v in old.records.items() if k in planned} if (old and resume and not force) else {}
    journal = _Journal(out, plan.fingerprint, keep)
    journal.save()
    return journal


def _still_valid(out: Path, journal: _Journal, spec: SafetensorsFile | CopyFile) -> bool:
    rec = journal.records.get(spec.path)
    path = out / spec.path
    if rec is None or not path.is_file() or path.stat().st_size != rec.bytes or rec.bytes != spec.nbytes:
        return False
    return sha256_file(path) == rec.sha256


def _check_space(out: Path, needed: int) -> None:
    free = shutil.disk_usage(out).free
    if needed > free:
        raise Step3Error(f"not enough free disk space for {out}: need {_gb(needed)}, {_gb(free)} free. "
                         f"Free some space or choose an output on another disk.")


def write_output(out: Path | str, plan: OutputPlan, *, resume: bool = False, force: bool = False,
                 progress: ProgressFn | None = None) -> WriteResult:
    """Write `plan` into `out` (see the module docstring); returns what was written and skipped."""
    out, start = Path(out), time.perf_counter()
    paths = [f.path for f in plan.files]
    assert len(set(paths)) == len(paths), "duplicate output paths in the plan"
    journal = _prepare(out, plan, resume, force)
    total = plan.nbytes
    report = progress or (lambda d, t, label="": None)
    skipped = [f.path for f in plan.files if _still_valid(out, journal, f)]
    journal.records = {k: journal.records[k] for k in skipped}
    journal.save()
    todo = [f for f in plan.files if f.path not in set(skipped)]
    _check_space(out, sum(f.nbytes for f in todo))
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
        _atomic_write(out / rel, data)
    report(total, total, "done")
    return WriteResult(records, [r for r, _ in finals], [f.path for f in todo], skipped, written,
                       time.perf_counter() - start)

"""The state of an output directory between runs of converters/writer.py: the resume journal, the
refusals (non-empty OUT, another run's files), cleanup before writing, disk-space and ENOSPC errors.

The journal `.step3-write.json` holds the plan's fingerprint and each finished file's bytes and
sha256; it is rewritten atomically after every file, so after a kill -9 it names exactly the files
that are complete. It stays in OUT, which makes a later `--resume` (even of a complete output) cheap.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from converters.errors import Step3Error
from converters.writer_io import sha256_file

if TYPE_CHECKING:
    from converters.writer import CopyFile, OutputPlan, SafetensorsFile

JOURNAL = ".step3-write.json"
PARTIAL = ".partial"


@dataclass(frozen=True)
class FileRecord:
    bytes: int
    sha256: str

    def to_json(self) -> dict[str, object]:
        return {"bytes": self.bytes, "sha256": self.sha256}


def record_of(data: bytes) -> FileRecord:
    return FileRecord(len(data), hashlib.sha256(data).hexdigest())


def json_bytes(obj: object) -> bytes:
    """Deterministic, human-readable JSON for the final files."""
    return (json.dumps(obj, indent=2) + "\n").encode()


class Journal:
    """`.step3-write.json`: the plan fingerprint and the files finished so far (rewritten atomically)."""

    def __init__(self, out: Path, fingerprint: str, records: dict[str, FileRecord] | None = None):
        self.path, self.fingerprint, self.records = out / JOURNAL, fingerprint, dict(records or {})

    @classmethod
    def load(cls, out: Path) -> Journal | None:
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
        atomic_write(self.path, json_bytes(body))


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` through `<path>.partial` and a rename: readers never see half a file."""
    tmp = path.with_name(path.name + PARTIAL)
    with disk_errors(path):
        tmp.write_bytes(data)
        os.replace(tmp, path)


class disk_errors:
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


def prepare(out: Path, plan: OutputPlan, resume: bool, force: bool) -> Journal:
    """Check OUT against resume/force, delete what must go, return the journal to continue."""
    if out.exists() and not out.is_dir():
        raise Step3Error(f"{out}: exists and is not a directory; choose another output path")
    existing = [p.name for p in out.iterdir()] if out.exists() else []
    old = Journal.load(out) if existing else None
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
    journal = Journal(out, plan.fingerprint, keep)
    journal.save()
    return journal


def still_valid(out: Path, journal: Journal, spec: SafetensorsFile | CopyFile) -> bool:
    rec = journal.records.get(spec.path)
    path = out / spec.path
    if rec is None or not path.is_file() or path.stat().st_size != rec.bytes or rec.bytes != spec.nbytes:
        return False
    return sha256_file(path) == rec.sha256


def check_space(out: Path, needed: int) -> None:
    free = shutil.disk_usage(out).free
    if needed > free:
        raise Step3Error(f"not enough free disk space for {out}: need {_gb(needed)}, {_gb(free)} free. "
                         f"Free some space or choose an output on another disk.")

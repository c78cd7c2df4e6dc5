"""Shared CLI rendering: consoles, progress bars, byte formatting.

Results go to stdout, everything else (progress, notes, errors) to stderr.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

out = Console()  # results
err = Console(stderr=True)  # progress, notes, errors


class ProgressFn(Protocol):
    """What library functions accept to report progress: bytes done so far, bytes in all, what is going on."""

    def __call__(self, done: int, total: int, label: str = "") -> None: ...


@contextmanager
def byte_progress(description: str) -> Iterator[ProgressFn]:
    """A rich progress bar over bytes with ETA, shown only when a person is watching (stderr is a TTY)."""
    if not sys.stderr.isatty():
        yield lambda done, total, label="": None
        return
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
               TimeRemainingColumn(), TextColumn("{task.fields[label]}", style="dim"))
    with Progress(*columns, console=err, transient=False) as bar:
        task = bar.add_task(description, total=None, label="")

        def update(done: int, total: int, label: str = "") -> None:
            bar.update(task, completed=done, total=total, label=label[-60:])

        yield update


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    raise AssertionError


def human_count(n: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))

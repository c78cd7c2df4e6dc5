"""The one error type users see. The CLI prints `Error: <message>` and exits 1 for these.

Every message names the file, tensor, field or flag at fault and, where there is one, the fix.
Internal invariants stay plain `assert`s: those are our bugs, not the user's.
"""

from __future__ import annotations


class Step3Error(Exception):
    """A user-facing problem (bad input, bad flag, missing file). Never our own bug."""


class ConfigError(Step3Error):
    """config.json is missing, unreadable or inconsistent."""


class CheckpointError(Step3Error):
    """A checkpoint (HF or AFD layout) is missing, corrupt or does not match its config."""

    def __init__(self, message: str, problems: list[str] | None = None):
        self.problems = problems or []
        if self.problems:
            message = message + "\n" + "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(message)

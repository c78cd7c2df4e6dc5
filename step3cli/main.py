"""The `step3` command: registers one module per command and draws the one error boundary."""

from __future__ import annotations

import os
import sys

# numpy's OpenBLAS starts a thread per core that spins for a while after import, stealing a core from
# `step3 convert`'s copy/hash threads (~0.1-0.3 CPU-s); no command does BLAS work in numpy (torch has MKL).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import typer
from rich.markup import escape

from converters.errors import Step3Error

app = typer.Typer(
    name="step3",
    help="Convert, quantize, verify and benchmark StepFun's Step-3 for Attention-FFN Disaggregation "
    "(`serve` is not built yet).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)

# Each command module exposes `register(app)`; the order here is the order in `step3 --help`.
# Add a command: import its module here and append it to COMMANDS.
from step3cli import (  # noqa: E402
    bench,
    convert,
    demo,
    inspect,
    quantize,
    render,  # noqa: F401  (keeps this import list non-empty)
    synth,
    verify,
)

COMMANDS: tuple = (inspect, synth, convert, quantize, verify, bench, demo)
for module in COMMANDS:
    module.register(app)


@app.callback()
def _root() -> None:
    """A root callback keeps `step3 COMMAND ...` a command group, whatever COMMANDS holds."""


def main() -> None:
    """Entry point: user mistakes (Step3Error) print `Error: ...` to stderr and exit 1, no traceback."""
    try:
        app()
    except Step3Error as e:
        if os.environ.get("STEP3_DEBUG"):
            raise
        from step3cli.render import err

        err.print(f"[bold red]Error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()

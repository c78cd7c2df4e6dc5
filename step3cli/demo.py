"""`step3 demo`: synthesize step3-tiny, inspect it, chat with it through the reference model."""

from __future__ import annotations

import tempfile
from contextlib import nullcontext
from itertools import count
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape
from rich.table import Table

from step3cli.render import byte_progress, err, out

if TYPE_CHECKING:  # the library (and torch) is imported when the command runs: `--help` stays fast
    from runtime.demo import StepReport


def _printable(text: str) -> str:
    """Control characters (random weights emit them) shown as escapes, so they cannot upset a terminal."""
    return "".join(c if c.isprintable() or c == "\n" else repr(c)[1:-1] for c in text)


def _render_step(number: int, report: StepReport) -> None:
    table = Table(title=f"{number}. {escape(report.title)}  [dim]({report.seconds:.2f} s)[/]",
                  title_justify="left", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value", overflow="fold")
    for label, value in report.facts.items():
        table.add_row(escape(label), escape(value))
    out.print(table)


def demo(
    workdir: Annotated[Path, typer.Option("--workdir", help="Where the demo writes (reused when it already "
                                                            "holds a valid demo checkpoint).")]
    = Path("step3-demo"),
    prompt: Annotated[str | None, typer.Option("--prompt", help="The user message to chat with.",
                                               show_default="a question about MFA")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1, help="Tokens to generate.")] = 24,
    tmp: Annotated[bool, typer.Option("--tmp", help="Work in a temporary directory, removed at the end "
                                                    "(ignores --workdir).")] = False,
) -> None:
    """Run the toolchain end to end on a synthetic step3-tiny, in seconds on a CPU.

    Example: [bold]step3 demo --prompt "Hello" --max-new-tokens 16[/]
    """
    from runtime.demo import DEFAULT_PROMPT, run_demo

    numbers = count(1)
    place = tempfile.TemporaryDirectory(prefix="step3-demo-") if tmp else nullcontext(str(workdir))
    with place as where, byte_progress("synthesize") as progress:
        err.print(f"demo workdir: {where}", style="dim")
        result = run_demo(where, DEFAULT_PROMPT if prompt is None else prompt, max_new_tokens,
                          progress=progress, on_step=lambda report: _render_step(next(numbers), report))
    out.print(f"[bold]Generated text:[/] {escape(_printable(result.reply))}")


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)

"""`step3 verify`: checksums of an AFD layout, and (with --against) bit equality with its source."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from step3cli.render import byte_progress, err, human_bytes, out


def verify(
    layout: Annotated[Path, typer.Argument(metavar="OUT", help="AFD layout (step3 convert output).")],
    against: Annotated[Path | None, typer.Option("--against", metavar="SRC", help="HF checkpoint it came "
                                                 "from: compare every tensor with its source slice.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Check every file's sha256 and the manifest; with --against, every tensor bit for bit (exit 1 if not).

    Examples: [bold]step3 verify ./step3-afd[/]

    [bold]step3 verify ./step3-afd --against ./step3-fp8[/]
    """
    from converters.verify import verify_layout

    with byte_progress("verifying") as progress:
        report = verify_layout(layout, against, progress=progress)
    if json_out:
        typer.echo(json.dumps({"path": str(report.path), "against": str(against) if against else None,
                               "ok": report.ok, "files": report.files, "tensors": report.tensors,
                               "bytes": report.bytes, "problems": report.problems}, indent=2))
    elif report.ok:
        what = f" and equal to {against}" if against else ""
        out.print(f"[green]OK[/] {escape(str(layout))}: {report.files} files, {report.tensors} tensors, "
                  f"{human_bytes(report.bytes)} checked{escape(what)}")
    else:
        err.print(f"[bold red]{len(report.problems)} problem(s)[/] in {escape(str(layout))}:")
        for p in report.problems:
            err.print(f"  - {escape(p)}", highlight=False, soft_wrap=True)
    if not report.ok:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command("verify")(verify)

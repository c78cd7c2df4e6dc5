"""`step3 convert`: HF checkpoint -> AFD layout (default), or an AFD layout back to HF (`--to hf`)."""

from __future__ import annotations

import json
import re
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from converters.errors import Step3Error
from step3cli.render import byte_progress, err, human_bytes, out

if TYPE_CHECKING:  # the library (and numpy) is imported when the command runs: `--help` stays fast
    from converters.convert import ConvertResult

DEFAULT_SHARD_SIZE = "4GB"  # converters.convert.DEFAULT_SHARD_SIZE (a test keeps the two equal)

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


class Target(str, Enum):
    afd = "afd"
    hf = "hf"


def parse_size(text: str, flag: str = "--shard-size") -> int:
    """'4GB', '500MB', '1GiB' or a plain byte count -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    unit = m.group(2).upper() if m else ""
    if not m or unit not in _UNITS or float(m.group(1)) * _UNITS[unit] < 1:
        raise Step3Error(f"{flag}: cannot read {text!r} as a size; use e.g. 4GB, 500MB, 1GiB or a byte count")
    return int(float(m.group(1)) * _UNITS[unit])


def _summary(r: ConvertResult) -> tuple[Table, str]:
    """The per-part table (stdout) and one line on what was written and how fast (stderr)."""
    w = r.write
    table = Table(title=f"{r.direction}: {r.out}", title_justify="left")
    for col in ("part", "files", "bytes"):
        table.add_column(col, justify="left" if col == "part" else "right")
    for part in sorted(r.bytes_by_part):
        table.add_row(part, str(r.files_by_part[part]), human_bytes(r.bytes_by_part[part]))
    table.add_row("[bold]total[/]", str(len(w.records) + len(w.finals)),
                  human_bytes(sum(r.bytes_by_part.values())), end_section=True)
    speed = w.bytes_written / w.seconds if w.seconds else 0.0
    note = (f"written {len(w.written)} file(s), {human_bytes(w.bytes_written)} in {w.seconds:.1f} s "
                     f"({human_bytes(speed)}/s); skipped {len(w.skipped)} complete file(s)")
    return table, note


def _to_json(r: ConvertResult) -> dict:
    w = r.write
    return {"out": str(r.out), "direction": r.direction, "written": w.written, "skipped": w.skipped,
            "bytes_written": w.bytes_written, "seconds": round(w.seconds, 3),
            "bytes_by_part": r.bytes_by_part, "files_by_part": r.files_by_part}


def convert(
    src: Annotated[Path, typer.Argument(metavar="SRC", help="HF Step-3 checkpoint directory (an AFD "
                                                            "layout with --to hf).")],
    dst: Annotated[Path, typer.Argument(metavar="OUT", help="Output directory (new or empty).")],
    ffn_ranks: Annotated[int | None, typer.Option("--ffn-ranks", "-F", help="FFN ranks F: experts in "
                                                  "F contiguous ranges, dense/shared MLPs in F slices.")]
    = None,
    attn_ranks: Annotated[int, typer.Option("--attn-ranks", "-A", help="Attention ranks (data parallel: "
                                            "all share one copy of the attention weights).")] = 1,
    shard_size: Annotated[str, typer.Option("--shard-size", help="Largest output file, e.g. 4GB, 500MB.")]
    = DEFAULT_SHARD_SIZE,
    to: Annotated[Target, typer.Option("--to", help="afd: HF -> AFD layout; hf: AFD layout -> HF.")]
    = Target.afd,
    resume: Annotated[bool, typer.Option("--resume", help="Finish an interrupted run into OUT, skipping "
                                         "files whose checksum matches.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Overwrite a non-empty OUT (only files this "
                                        "command writes are removed).")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Convert an HF Step-3 checkpoint into the AFD layout (attention/, ffn/rank-K/, vision/, manifest.json).

    Streams one tensor at a time; every file is checksummed and renamed into place when complete.

    Examples: [bold]step3 convert ./step3-fp8 ./step3-afd --ffn-ranks 2[/]

    [bold]step3 convert ./step3-afd ./step3-hf --to hf[/]   (rebuild the HF checkpoint)
    """
    from converters.convert import afd_to_hf, hf_to_afd

    size = parse_size(shard_size)
    with byte_progress("converting") as progress:
        if to is Target.hf:
            result = afd_to_hf(src, dst, shard_size=size, resume=resume, force=force, progress=progress)
        else:
            if ffn_ranks is None:
                raise Step3Error("--ffn-ranks is required to convert to the AFD layout (e.g. --ffn-ranks 2)")
            result = hf_to_afd(src, dst, ffn_ranks=ffn_ranks, attn_ranks=attn_ranks, shard_size=size,
                               resume=resume, force=force, progress=progress)
    if json_out:
        typer.echo(json.dumps(_to_json(result), indent=2))
        return
    table, note = _summary(result)
    out.print(table)
    err.print(note, style="dim")
    if to is Target.afd:
        err.print(f"check it with: step3 verify {dst} --against {src}", style="dim")


def register(app: typer.Typer) -> None:
    app.command("convert")(convert)

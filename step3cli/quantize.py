"""`step3 quantize`: block-FP8 weights for an HF checkpoint or an AFD layout, with an error report."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich import box
from rich.table import Table

from step3cli.convert import DEFAULT_SHARD_SIZE, parse_size
from step3cli.render import byte_progress, err, human_bytes, out

if TYPE_CHECKING:  # the library (and torch) is imported when the command runs: `--help` stays fast
    from quant.quantize import QuantizeResult
    from quant.report import GroupStats


class Backend(str, Enum):
    auto = "auto"
    torch = "torch"
    te = "te"


class KVCache(str, Enum):
    fp8 = "fp8"
    bf16 = "bf16"


def _num(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def _row(name: str, g: GroupStats) -> list[str]:
    snr = g.snr_db
    return [name, f"{g.quantized}/{g.tensors}", _num(g.mean_rel_error, ".2%"),
            _num(g.max_rel_error, ".2%"), "inf" if snr == float("inf") else _num(snr, ".1f"),
            human_bytes(g.bytes_before), human_bytes(g.bytes_after)]


def _report_table(r: QuantizeResult) -> Table:
    rep = r.report
    caption = ("err: ||dequantized - original|| / ||original|| per tensor; fp8/n: tensors quantized / in "
               "the group; before/after: bytes")
    table = Table(title=f"{r.mode} ({r.kind}, backend {r.backend or 'none'}): {r.out}", title_justify="left",
                  box=box.SIMPLE_HEAD, pad_edge=False, caption=caption, caption_justify="left")
    for i, col in enumerate(("group", "fp8/n", "mean err", "max err", "SNR dB", "before", "after")):
        table.add_column(col, justify="left" if i == 0 else "right", no_wrap=True)
    for name, g in sorted(rep.groups.items()):
        table.add_row(*_row(name, g))
    table.add_row(*[f"[bold]{c}[/]" for c in _row("total", rep.total)], end_section=True)
    return table


def _check_table(check: dict) -> Table:
    table = Table(title="check: reference-model logits, original vs quantized", title_justify="left")
    for col in ("prompts x tokens", "cosine mean", "cosine min", "top-1 agreement", "bar", "result"):
        table.add_column(col, justify="right")
    verdict = "[green]pass[/]" if check["passed"] else "[bold red]FAIL[/]"
    table.add_row(f"{check['prompts']} x {check['tokens_per_prompt']}", f"{check['cosine_mean']:.6f}",
                  f"{check['cosine_min']:.6f}", f"{check['top1_agreement']:.2%}",
                  f"cosine mean >= {check['threshold']}", verdict)
    return table


def quantize(
    src: Annotated[Path, typer.Argument(metavar="IN", help="HF Step-3 checkpoint or AFD layout.")],
    dst: Annotated[Path, typer.Argument(metavar="OUT", help="Output directory (new or empty), the same "
                                                            "kind as IN.")],
    backend: Annotated[Backend, typer.Option("--backend", help="auto: Transformer Engine where it imports on "
                                             "a CUDA machine, else torch. Both give the same bytes.")]
    = Backend.auto,
    device: Annotated[str | None, typer.Option("--device", help="Where the torch backend computes: cpu "
                                               "(default) or cuda[:N].")] = None,
    skip: Annotated[str | None, typer.Option("--skip", metavar="REGEX", help="Leave tensors whose name "
                                             "matches REGEX as stored (e.g. 'layers\\.0\\.').")] = None,
    kv_cache: Annotated[KVCache | None, typer.Option("--kv-cache", help="KV-cache dtype recorded for the "
                                                     "runtime (fp8 when not given).")] = None,
    requantize: Annotated[bool, typer.Option("--requantize", help="Quantize FP8 input again instead of "
                                             "passing it through unchanged.")] = False,
    dequantize: Annotated[bool, typer.Option("--dequantize", help="Turn FP8 input back into BF16.")] = False,
    check: Annotated[bool, typer.Option("--check", help="Compare reference-model logits of IN and OUT on a "
                                        "few prompts (cosine, top-1 agreement).")] = False,
    shard_size: Annotated[str, typer.Option("--shard-size", help="Largest output file, e.g. 4GB.")]
    = DEFAULT_SHARD_SIZE,
    resume: Annotated[bool, typer.Option("--resume", help="Finish an interrupted run into OUT.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Overwrite a non-empty OUT (only files this "
                                        "command writes are removed).")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Quantize linear weights to block FP8 (E4M3 + a float32 scale per 128x128 block, the step3-fp8 format).

    Routers, embeddings, lm_head, norms and the vision tower stay BF16. FP8 input is copied unchanged
    unless --requantize. The report (also OUT/quantize-report.json) gives each tensor group's error.

    Examples: [bold]step3 quantize ./step3-bf16 ./step3-fp8 --check[/]

    [bold]step3 quantize ./step3-afd ./step3-afd-fp8 --backend te --kv-cache fp8[/]

    [bold]step3 quantize ./step3-fp8 ./step3-bf16 --dequantize[/]
    """
    from quant.quantize import QuantizeOptions, quantize_checkpoint
    from quant.report import REPORT_FILE

    options = QuantizeOptions(backend=backend.value, device=device, skip=skip,
                              kv_cache=kv_cache.value if kv_cache else None, requantize=requantize,
                              dequantize=dequantize, check=check, shard_size=parse_size(shard_size))
    with byte_progress("quantizing") as progress:
        result = quantize_checkpoint(src, dst, options, resume=resume, force=force, progress=progress)
    if json_out:
        body = {"out": str(result.out), "kind": result.kind, **result.report.to_json()}
        typer.echo(json.dumps(body, indent=2))
        return
    out.print(_report_table(result))
    if result.report.check:
        out.print(_check_table(result.report.check))
    w = result.write
    err.print(f"backend: {result.backend or 'none (no quantization in this mode)'}; written "
              f"{len(w.written)} file(s), {human_bytes(w.bytes_written)} in {w.seconds:.1f} s; skipped "
              f"{len(w.skipped)} complete file(s); report: {dst / REPORT_FILE}", style="dim")
    if result.report.skipped:
        err.print(f"--skip kept {len(result.report.skipped)} weight(s) in BF16", style="dim")
    if result.report.check and not result.report.check["passed"]:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command("quantize")(quantize)

"""`step3 inspect`: config, parameter counts, KV-cache size and tensors of a checkpoint or preset."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from step3cli.inspect_afd import afd_ranks, render_ranks
from step3cli.render import err, human_bytes, human_count, out

if TYPE_CHECKING:  # the library (and torch) is imported when the command runs: `--help` stays fast
    from converters.summary import Summary

_PARAM_LABELS = {
    "total": "total (text)", "active": "active per token", "attention": "attention",
    "ffn": "dense MLP + shared expert",
    "routed_experts": "routed experts", "embedding": "embedding + lm_head", "vision": "vision tower",
    "total_with_vision": "total with vision", "stored": "stored in the files",
}


def _table(title: str, *columns: str, numbers: bool = True, header: bool = True) -> Table:
    """A table whose first column is a label; the others are right-aligned when they hold numbers."""
    table = Table(title=title, title_justify="left", show_header=header)
    for i, col in enumerate(columns):
        table.add_column(col, justify="right" if i and numbers else "left", overflow="fold")
    return table


def _quantization_table(q: dict) -> Table:
    """The FP8 record step3 quantize (or the checkpoint's publisher) wrote, incl. the KV-cache dtype."""
    from quant.record import kv_cache_dtype

    step3 = q.get("step3") or {}
    table = _table("quantization", "field", "value", numbers=False, header=False)
    rows = {"method": f"{q.get('quant_method')} {q.get('fmt', '')}, activations {q.get('activation_scheme')}",
            "weight blocks": "x".join(str(b) for b in q.get("weight_block_size") or []) or "-",
            "scheme": step3.get("scheme", "-"), "backend": step3.get("backend") or "-",
            "KV cache": kv_cache_dtype(q), "left in BF16 (--skip)": str(len(q.get("ignored_layers") or []))}
    for k, v in rows.items():
        table.add_row(k, str(v))
    return table


def _render(s: Summary) -> None:
    from converters.summary import config_facts

    src = s.source
    where = f"{src.path} ({src.kind})"
    if src.stored_bytes is not None:
        where += (f": {src.files} file(s), {human_bytes(src.stored_bytes)}, {'FP8' if src.fp8 else 'BF16'}"
                  f"{', vision' if src.vision else ''}")
    out.print(f"[bold]{where}[/]")
    config = _table("config", "field", "value", numbers=False, header=False)
    for k, v in config_facts(src.config).items():
        config.add_row(k, v)
    params = _table("parameters", "part", "count", header=False)
    for k, v in s.params.items():
        if k in ("vision", "total_with_vision") and not s.params["vision"]:
            continue
        params.add_row(_PARAM_LABELS.get(k, k), f"{human_count(v)} ({v:,})")
    kv = _table(f"KV cache (context {s.context:,})", "dtype", "per token", "per sequence")
    for d, b in s.kv_bytes_per_token.items():
        exact = f" ({b:,} B)" if b >= 1000 else ""
        kv.add_row(d, human_bytes(b) + exact, human_bytes(s.kv_bytes_per_sequence[d]))
    out.print(config, params, kv)
    if s.quantization:
        out.print(_quantization_table(s.quantization))
    if s.tensors:
        title = f"tensors ({len(s.tensors)} of {len(src.tensors)})"
        tensors = _table(title, "name", "dtype", "shape", "file", numbers=False)
        for t in s.tensors:
            tensors.add_row(t.name, t.dtype, str(list(t.shape)), t.file or "-")
        out.print(tensors)


def inspect(
    target: Annotated[str, typer.Argument(metavar="PATH|PRESET",
                                          help="Checkpoint directory, config.json, or preset (step3, "
                                               "step3-tiny, step3-small).")],
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object, no tables.")] = False,
    tensors: Annotated[str | None, typer.Option("--tensors", metavar="REGEX",
                                                help="List the tensors whose name matches REGEX "
                                                     "('.' lists all).")] = None,
    context: Annotated[int, typer.Option("--context", min=1,
                                         help="Tokens per sequence for the KV-cache size.")] = 4096,
    batch: Annotated[int, typer.Option("--batch", min=1, help="Sequences per attention rank, for an AFD "
                                       "layout's memory table.")] = 1,
) -> None:
    """Show a checkpoint's config, parameter counts, KV-cache bytes and tensors (reads headers only).

    Examples: [bold]step3 inspect step3 --json[/]

    [bold]step3 inspect ./step3-fp8 --tensors 'layers\\.4\\..*moe' --context 32768[/]
    """
    from converters.summary import summarize

    summary = summarize(target, context=context, tensors=tensors)
    ranks = afd_ranks(target, batch, context) if summary.source.kind == "afd" else None
    if json_out:
        typer.echo(json.dumps({**summary.to_dict(), **({"afd": ranks} if ranks else {})}, indent=2))
        return
    _render(summary)
    if ranks:
        render_ranks(ranks)
    if tensors is None:
        err.print(f"{len(summary.source.tensors)} tensors; list them with --tensors REGEX", style="dim")
    elif not summary.tensors:
        err.print(f"no tensor name matches --tensors {tensors!r}", style="yellow")


def register(app: typer.Typer) -> None:
    app.command("inspect")(inspect)

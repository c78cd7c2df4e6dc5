"""The AFD part of `step3 inspect`: the plan, and what each attention / FFN rank loads and needs."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from step3cli.render import human_bytes, human_count, out


def afd_ranks(path: str | Path, batch: int, context: int) -> dict:
    from converters.afd import AFDLayout, rank_summary

    return rank_summary(AFDLayout(path), batch=batch, context=context)


def _range(r: list[int] | None) -> str:
    return f"{r[0]}..{r[1] - 1}" if r else "-"


def render_ranks(data: dict) -> None:
    """Two tables: per-rank weights (attention, vision, each FFN rank) and an attention rank's memory."""
    att = data["attention"]
    ranks = Table(title=f"AFD plan: {att['ranks']} attention rank(s) ({att['mode']}, one shared copy), "
                        f"{len(data['ffn'])} FFN rank(s)", title_justify="left")
    for col in ("part", "experts (EP)", "dense MLP slice (TP)", "shared expert slice (TP)", "files", "bytes",
                "parameters"):
        ranks.add_column(col, justify="left" if col == "part" else "right")
    ranks.add_row("attention (per rank)", "-", "-", "-", str(att["files"]), human_bytes(att["bytes"]),
                  human_count(att["params"]))
    if data["vision"]:
        v = data["vision"]
        ranks.add_row("vision (attention side)", "-", "-", "-", str(v["files"]), human_bytes(v["bytes"]),
                      human_count(v["params"]))
    for r in data["ffn"]:
        ranks.add_row(f"ffn/rank-{r['rank']}", _range(r.get("experts")), _range(r.get("dense_intermediate")),
                      _range(r.get("shared_intermediate")), str(r["files"]), human_bytes(r["bytes"]),
                      human_count(r["params"]))
    memory = Table(title=f"attention rank memory at batch {data['batch']} x context {data['context']:,}",
                   title_justify="left")
    for col in ("KV cache", "weights", "KV cache bytes", "total"):
        memory.add_column(col, justify="left" if col == "KV cache" else "right")
    weights = att["bytes"] + (data["vision"]["bytes"] if data["vision"] else 0)
    for dtype, kv in att["kv_cache_bytes"].items():
        total = att["memory_per_rank_bytes"][dtype]
        memory.add_row(dtype, human_bytes(weights), human_bytes(kv), human_bytes(total))
    out.print(ranks, memory)

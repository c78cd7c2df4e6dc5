"""Rich tables for `step3 bench model`: the cost report (Tables 2-7) and the AFD plan. Results to stdout."""

from __future__ import annotations

from dataclasses import asdict

from rich import box
from rich.table import Table

from runtime.bench import cost_model, planner
from runtime.bench.cost_model import CostReport
from runtime.bench.planner import PaperComparison, Plan, PlanSetup
from step3cli.render import err, out


def _table(title: str, *columns: str) -> Table:
    """Light borders and unbreakable cells, so the tables stay whole in an 80-column pipe."""
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for i, col in enumerate(columns):
        table.add_column(col, justify="left" if i == 0 else "right", overflow="fold")
    return table


def _ctx(c: int) -> str:
    return f"{c // 1024}K" if c % 1024 == 0 else str(c)


def _e(x: float) -> str:
    """3 significant digits as the paper prints them: 2.56e8."""
    mantissa, exponent = f"{x:.2e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def render_report(r: CostReport) -> None:
    kv = {1: "8-bit", 2: "16-bit"}.get(r.kv_bytes_per_value, f"{r.kv_bytes_per_value}-byte")
    t = _table(f"Per-token decode work (paper Tables 2/3; KV cache {kv})", "model", "context", "KV bytes",
               "attn FLOPs", "linear FLOPs", "FFN FLOPs", "attn FLOP/B")
    for m, by_c in r.per_token.items():
        for c, p in by_c.items():
            t.add_row(m, _ctx(c), _e(p.kv_bytes), _e(p.attention_flops), _e(p.linear_flops), _e(p.ffn_flops),
                      f"{p.arithmetic_intensity:.0f}")
    out.print(t)

    t = _table("Hardware (Table 4) and unit costs (Table 5)", "GPU", "$/hour", "FLOP/s", "mem B/s",
               "net Gbps", "ridge", "$/FLOP", "$/byte")
    for h in r.hardware:
        u = r.unit_costs[h.name]
        t.add_row(h.name, f"{h.usd_per_hour:g}", f"{_e(h.flops)} {h.flops_dtype}", _e(h.memory_bw),
                  f"{h.gpus_per_server}x{h.network_gbps:g}", f"{h.ridge:.0f}", _e(u.usd_per_flop),
                  _e(u.usd_per_byte))
    out.print(t)

    names = [h.name for h in r.hardware]
    t = _table("Decode cost, USD per 1M tokens (Table 6)", "model", "part", *names)
    for m in r.attention_usd:
        for c, costs in r.attention_usd[m].items():
            t.add_row(m, f"attention @ {_ctx(c)}", *(f"{costs[n]:.3f}" for n in names))
        t.add_row(m, "FFN", *(f"{r.ffn_usd[m][n]:.3f}" for n in names), end_section=True)
    out.print(t)

    t = _table("Cheapest AFD pairing, USD per 1M tokens", "model", "context", "attention on", "attention",
               "FFN on", "FFN", "total")
    for m, by_c in r.pairings.items():
        for c, p in by_c.items():
            t.add_row(m, _ctx(c), "/".join(p.attention_hw), f"{p.attention_usd:.3f}", "/".join(p.ffn_hw),
                      f"{p.ffn_usd:.3f}", f"[bold]{p.total_usd:.3f}[/]")
    out.print(t)

    models = {m.name: m for m in r.models}
    t = _table("Minimum MoE sparsity: compute-bound FFN under the network limit (Table 7)", "GPU",
               *(f"{n} H={m.hidden} L={m.layers}" for n, m in models.items()))
    for n in names:
        t.add_row(n, *(f"{r.min_sparsity[m][n]:.3f}" for m in models))
    t.add_row("model's sparsity", *(f"{m.ffn.sparsity:.3f} ({m.ffn.top_k + m.ffn.shared_experts}/"
                                    f"{m.ffn.experts + m.ffn.shared_experts})" for m in models.values()))
    out.print(t)
    for line in cost_model.ASSUMPTIONS:
        err.print(f"[dim]assumption: {line}[/]")


def _plan_row(t: Table, p: Plan, *extra: str) -> None:
    st = p.stage_us
    t.add_row(p.name, str(p.gpus), f"{p.batch:,}", f"{p.tpot_s * 1e3:.1f}", f"{st['attention']:.0f}",
              f"{st['ffn']:.0f}", f"{st['network']:.0f}", p.limited_by, f"{p.tokens_per_s_per_gpu:,.0f}",
              *extra)


def _pct(x: float | None) -> str:
    return "> 100%" if x is None else f"{x:.0%}"  # None: even the roofline falls short


def render_plan(s: PlanSetup, plans: list[Plan], paper: list[PaperComparison]) -> None:
    e = s.efficiency
    out.print(f"[bold]AFD planner[/] (a model, not a measurement): {s.model.name}, context {s.context:,}, "
              f"TPOT {s.tpot_s * 1e3:g} ms, attention on {s.attention_hw.name}, FFN on {s.ffn_hw.name}, "
              f"{s.micro_batches} micro-batches; efficiencies: attention HBM {e.attention_memory:.0%}, "
              f"attention FLOP/s {e.attention_compute:.0%}, FFN FLOP/s {e.ffn_compute:.0%}, "
              f"FFN HBM {e.ffn_memory:.0%}, network {e.network:.0%}")
    cols = ("layout", "GPUs", "batch", "TPOT ms", "attn us", "FFN us", "net us", "limited by", "tok/s/GPU")
    t = _table("Best layouts (stage times: one MoE layer, one micro-batch)", *cols)
    for p in plans:
        _plan_row(t, p)
    out.print(t)
    t = _table(f"Paper deployments ({s.model.name}, {s.attention_hw.name}/{s.ffn_hw.name}): predicted vs "
               f"measured tok/s/GPU", "layout", "ctx", "model", "limit", "paper", "attn eff*", "batch*",
               "paper batch", "uniform*")
    for row in paper:
        t.add_row(row.layout, _ctx(row.context), f"{row.predicted.tokens_per_s_per_gpu:,.0f}",
                  row.predicted.limited_by, f"{row.measured:,.0f}", _pct(row.attention_memory_needed),
                  "-" if row.at_match is None else f"{row.at_match.batch:,}",
                  "-" if row.paper_batch is None else f"{row.paper_batch:,}", _pct(row.uniform_needed))
    out.print(t)
    out.print("[dim]attn eff*: the attention HBM efficiency (others as given) at which the model predicts "
              "the paper's figure; batch*: the batch it then picks; uniform*: one factor on all the given "
              "efficiencies that does the same ('> 100%': the model falls short even at the roofline).[/]")
    for line in planner.ASSUMPTIONS:
        out.print(f"[dim]assumption: {line}[/]")


def _plan_dict(p: Plan) -> dict:
    return {"layout": p.name, "attention_instances": p.attention_instances, "ffn_instances": p.ffn_instances,
            "gpus": p.gpus, "batch": p.batch, "tpot_ms": p.tpot_s * 1e3, "stage_us": p.stage_us,
            "limited_by": p.limited_by, "tokens_per_s_per_gpu": p.tokens_per_s_per_gpu}


def plan_json(s: PlanSetup, plans: list[Plan], paper: list[PaperComparison]) -> dict:
    return {"model": s.model.name, "context": s.context, "tpot_ms": s.tpot_s * 1e3,
            "attention_hw": s.attention_hw.name, "ffn_hw": s.ffn_hw.name, "micro_batches": s.micro_batches,
            "efficiency": asdict(s.efficiency), "best": [_plan_dict(p) for p in plans],
            "paper_comparison": [{"context": r.context, "layout": r.layout, "measured_tokens_per_s_per_gpu":
                                  r.measured, "predicted": _plan_dict(r.predicted),
                                  "attention_memory_efficiency_to_match": r.attention_memory_needed,
                                  "plan_at_match": None if r.at_match is None else _plan_dict(r.at_match),
                                  "paper_batch": r.paper_batch,
                                  "uniform_efficiency_scale_to_match": r.uniform_needed} for r in paper],
            "assumptions": list(planner.ASSUMPTIONS)}

"""`step3 bench`: benchmarks. `bench model` is the paper's analytic decode-cost model and AFD planner.

`app` is the `bench` sub-app; other modules add their commands to it (`@bench.app.command(...)`).
"""

from __future__ import annotations

import json
from typing import Annotated

import typer

from converters.config import KV_CACHE_BYTES, load_config
from converters.errors import Step3Error
from runtime.bench import planner
from runtime.bench.architectures import from_step3_config, get_model
from runtime.bench.cost_model import cost_report
from runtime.bench.hardware import load_hardware_file, resolve_hardware
from runtime.bench.planner import Efficiency, PlanSetup, best_plans, compare_with_paper
from step3cli import bench_render
from step3cli.render import err

app = typer.Typer(name="bench",
                  help="Benchmarks: the paper's decode-cost model and AFD planner (no GPU needed).",
                  no_args_is_help=True, rich_markup_mode="rich")

KV_WIDTH = KV_CACHE_BYTES


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="bench")


def _split(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def parse_contexts(value: str) -> list[int]:
    """'4096,8K,32k' -> [4096, 8192, 32768] (K = 1024, as in the paper)."""
    contexts = []
    for item in _split(value):
        text, scale = (item[:-1], 1024) if item[-1] in "kK" else (item, 1)
        try:
            n = int(text) * scale
        except ValueError:
            raise Step3Error(f"--context {item!r}: not a number (use e.g. 4096,8K,32K)") from None
        if n <= 0:
            raise Step3Error(f"--context {item!r}: must be positive")
        contexts.append(n)
    if not contexts:
        raise Step3Error("--context: give at least one context length, e.g. --context 8K,32K")
    return contexts


def parse_prices(values: list[str]) -> dict[str, float]:
    prices = {}
    for item in (p for v in values for p in _split(v)):
        name, _, usd = item.partition("=")
        try:
            price = float(usd)
        except ValueError:
            price = -1.0
        if not name or price <= 0:
            raise Step3Error(f"--price {item!r}: expected NAME=USD_PER_HOUR with a positive price, "
                             f"e.g. H200=3.5")
        prices[name.strip()] = price
    return prices


def _models(names: str, config: str | None) -> list:
    models = [get_model(n) for n in _split(names)]
    if not models:
        raise Step3Error("--models: give at least one model name")
    if config is not None:  # a Step-3 variant from any checkpoint's config.json replaces the preset
        variant = from_step3_config(load_config(config))
        models = [variant if m.name == "step3" else m for m in models]
        if variant not in models:
            models.insert(0, variant)
    return models


EXAMPLE = "\n".join((
    "[bold]Examples[/]",
    "  step3 bench model",
    "  step3 bench model --context 4K,8K,32K --json",
    "  step3 bench model --hardware H800,H200 --price H200=3.5 --plot cost.png",
    "  step3 bench model --config ./step3-ckpt --kv-dtype bf16",
    "  step3 bench model --plan --context 4096 --tpot-ms 50 --attention-hw H800 --ffn-hw H800",
    "",
    "[bold]Planner assumptions[/] (also printed with --plan): " + " ".join(planner.ASSUMPTIONS),
))


def _opt(help_text: str, **kw) -> typer.models.OptionInfo:
    return typer.Option(help=help_text, **kw)


def _eff(help_text: str) -> typer.models.OptionInfo:
    return typer.Option(min=0.01, max=1.0, help=f"Planner: {help_text}", rich_help_panel="Planner")


Contexts = Annotated[str, _opt("Cached tokens per request, comma-separated; K = 1024.")]
Hardware = Annotated[str, _opt("Accelerators: H800,H20,A800,910B (paper), H100, H200 (need --price), or "
                               "names from --hardware-file.")]
Models = Annotated[str, _opt("Models: step3, deepseek-v3, qwen3-235b-a22b.")]
Config = Annotated[str | None, _opt("Step-3 variant from a checkpoint dir, config.json or preset; replaces "
                                    "'step3'.")]
KvDtype = Annotated[str, _opt("KV-cache dtype: fp8 (the paper's 8-bit) or bf16.")]
Prices = Annotated[list[str] | None, _opt("NAME=USD_PER_HOUR, e.g. H200=3.5 (repeatable).")]
HardwareFile = Annotated[str | None, _opt("TOML/JSON file of extra accelerators (format: "
                                          "runtime/bench/hardware.py).")]
JsonOut = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of tables.")]
PlotFile = Annotated[str | None, _opt("Also write a PNG: USD per 1M tokens vs context, per accelerator.",
                                      metavar="FILE.png")]
PlanFlag = Annotated[bool, typer.Option("--plan", help="Run the AFD planner (first model, first context).",
                                        rich_help_panel="Planner")]
Tpot = Annotated[float, typer.Option(min=1.0, help="Planner: time-per-output-token budget, ms.",
                                     rich_help_panel="Planner")]
AttentionHw = Annotated[str, typer.Option(help="Planner: accelerator of the attention instances.",
                                          rich_help_panel="Planner")]
FfnHw = Annotated[str, typer.Option(help="Planner: accelerator of the FFN instances.",
                                    rich_help_panel="Planner")]
MicroBatches = Annotated[int, typer.Option(min=1, help="Planner: micro-batches in flight.",
                                           rich_help_panel="Planner")]


@app.command("model", epilog=EXAMPLE)
def model(
    context: Contexts = "8K,32K",
    hardware: Hardware = "H800,H20,A800,910B",
    models: Models = "step3,deepseek-v3,qwen3-235b-a22b",
    config: Config = None,
    kv_dtype: KvDtype = "fp8",
    price: Prices = None,
    hardware_file: HardwareFile = None,
    json_out: JsonOut = False,
    plot: PlotFile = None,
    plan: PlanFlag = False,
    tpot_ms: Tpot = 50.0,
    attention_hw: AttentionHw = "H800",
    ffn_hw: FfnHw = "H800",
    micro_batches: MicroBatches = 3,
    attn_mem_eff: Annotated[float, _eff("attention fraction of peak HBM bandwidth.")] = 1.0,
    attn_flop_eff: Annotated[float, _eff("attention fraction of peak FLOP/s.")] = 1.0,
    ffn_mfu: Annotated[float, _eff("FFN fraction of peak FLOP/s (0.6: block-FP8 GEMM on H200).")] = 0.6,
    ffn_mem_eff: Annotated[float, _eff("FFN fraction of peak HBM bandwidth.")] = 1.0,
    net_eff: Annotated[float, _eff("fraction of NIC line rate.")] = 1.0,
) -> None:
    """The paper's decode-cost model (Tables 2-7) from architectures and hardware; --plan sizes AFD."""
    if kv_dtype not in KV_WIDTH:
        raise Step3Error(f"--kv-dtype {kv_dtype!r}: use one of {', '.join(KV_WIDTH)}")
    extra = load_hardware_file(hardware_file) if hardware_file else None
    prices = parse_prices(price or [])
    contexts = parse_contexts(context)
    archs = _models(models, config)
    accs = resolve_hardware(_split(hardware), prices, extra)
    if not accs:
        raise Step3Error("--hardware: give at least one accelerator")
    report = cost_report(archs, contexts, accs, KV_WIDTH[kv_dtype])
    result = report.to_json()
    if plan:
        att, ffn = resolve_hardware([attention_hw, ffn_hw], prices, extra)
        eff = Efficiency(attn_mem_eff, attn_flop_eff, ffn_mfu, ffn_mem_eff, net_eff)
        setup = PlanSetup(archs[0], contexts[0], att, ffn, tpot_ms / 1000, micro_batches, KV_WIDTH[kv_dtype],
                          efficiency=eff)
        plans, paper = best_plans(setup), compare_with_paper(setup)
        result["plan"] = bench_render.plan_json(setup, plans, paper)
    if plot:
        from runtime.bench.plot import plot_costs

        err.print(f"wrote {plot_costs(plot, archs, accs, kv_bytes_per_value=KV_WIDTH[kv_dtype])}")
    if json_out:
        typer.echo(json.dumps(result, indent=2))
        return
    bench_render.render_report(report)
    if plan:
        bench_render.render_plan(setup, plans, paper)

"""PNG of decode cost per 1M tokens vs context: one panel per accelerator, one line per model.

Each panel runs attention and FFN on that accelerator; the last panel is the cheapest AFD pairing
(attention and FFN each on their cheapest accelerator). matplotlib is imported lazily (Agg backend):
it is an optional dependency (`pip install step3[bench]`).
"""

from __future__ import annotations

import math
from pathlib import Path

from converters.errors import Step3Error
from runtime.bench.architectures import Architecture
from runtime.bench.cost_model import attention_seconds, ffn_seconds, per_token, usd_per_1m
from runtime.bench.hardware import Accelerator

PLOT_CONTEXTS = tuple(2 ** k for k in range(10, 18))  # 1K .. 128K


def _curves(model: Architecture, hardware: list[Accelerator], contexts: list[int],
            kv_bytes_per_value: int) -> dict[str, list[float]]:
    """USD per 1M tokens per accelerator (attention + FFN there) and for the cheapest AFD pairing."""
    curves: dict[str, list[float]] = {h.name: [] for h in hardware}
    curves["cheapest AFD"] = []
    ffn_best = min(usd_per_1m(ffn_seconds(per_token(model, contexts[0]), h), h) for h in hardware)
    for c in contexts:
        pt = per_token(model, c, kv_bytes_per_value)
        att = {h.name: usd_per_1m(attention_seconds(pt, h), h) for h in hardware}
        for h in hardware:
            curves[h.name].append(att[h.name] + usd_per_1m(ffn_seconds(pt, h), h))
        curves["cheapest AFD"].append(min(att.values()) + ffn_best)
    return curves


def plot_costs(path: str | Path, models: list[Architecture], hardware: list[Accelerator],
               contexts: list[int] | None = None, kv_bytes_per_value: int = 1) -> Path:
    """Write the PNG to `path` (atomically: a temporary name, then rename) and return the path."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise Step3Error("--plot needs matplotlib: pip install 'step3[bench]'") from None
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise Step3Error(f"--plot {path}: the file name must end in .png")
    if not path.parent.is_dir():
        raise Step3Error(f"--plot {path}: folder {path.parent} does not exist")
    xs = sorted(set(contexts or PLOT_CONTEXTS))
    panels = [h.name for h in hardware] + ["cheapest AFD"]
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.8 * rows), sharey=True, squeeze=False)
    curves = {m.name: _curves(m, hardware, xs, kv_bytes_per_value) for m in models}
    for ax, panel in zip(axes.flat, panels, strict=False):
        for m in models:
            ax.plot(xs, curves[m.name][panel], marker="o", markersize=3, label=m.name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")  # costs span ~100x from 1K to 128K
        ax.set_xticks(xs, [f"{x // 1024}K" for x in xs])
        ax.set_title(panel if panel == "cheapest AFD" else f"{panel} (attention + FFN)")
        ax.set_xlabel("context (cached tokens)")
        ax.grid(True, which="both", alpha=0.3)
    for ax in axes[:, 0]:
        ax.set_ylabel("USD per 1M decoded tokens")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes.flat[0].legend()
    fig.suptitle("Decode cost at peak rates (Step-3 paper cost model)")
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    tmp.replace(path)
    return path

"""The SwiGLU MLP's cuBLAS first half as one GEMM over [gate; up] (N = 2I, what `mlp.swiglu_mlp` runs) against
a GEMM for each, at Step-3's shared expert (I 5120) and dense MLP (I 18432) widths (NOTES_ffn.md run 19).

    python -m benchmarks.mlp_first_half_ab --out DIR [--tokens 128 2048]

Per width and token count, CUDA-graph replays take turns for 7 rounds (`interleaved_graph_ms`): `two` /
`one` (the first half: GEMMs + `silu_mul_quant`), `two_mm` / `one_mm` (the GEMMs alone), `mlp_two` / `mlp_one`
(with the down GEMM) and `lib` (`swiglu_mlp` itself). The two first halves' outputs are compared bit for
bit. Writes DIR/mlp_first_half_ab_h200.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from benchmarks.common import gpu_versions, interleaved_graph_ms  # noqa: E402
from benchmarks.moe_ffn import HIDDEN, fp8_weight  # noqa: E402
from runtime.kernels.act_quant import act_quant  # noqa: E402
from runtime.kernels.fp8_linear import scaled_mm, scaled_mm_weight_scale  # noqa: E402
from runtime.kernels.mlp import MlpWeights, silu_mul_quant, swiglu_mlp  # noqa: E402


def _row(inter: int, xq, g, u, d, gu, mm: tuple, w: MlpWeights) -> dict:
    """One token count: the variants in turns, and whether the two first halves agree bit for bit."""
    mg, mu, mgu, md = mm

    def two():
        return silu_mul_quant(scaled_mm(xq, g, mg, torch.float32), scaled_mm(xq, u, mu, torch.float32))

    def one():
        y = scaled_mm(xq, gu, mgu, torch.float32)
        return silu_mul_quant(y[:, :inter], y[:, inter:])

    a, b = two(), one()
    same = torch.equal(a.q.view(torch.uint8), b.q.view(torch.uint8)) and torch.equal(a.scale_inv, b.scale_inv)
    fns = dict(two=two, one=one,
               two_mm=lambda: (scaled_mm(xq, g, mg, torch.float32), scaled_mm(xq, u, mu, torch.float32)),
               one_mm=lambda: scaled_mm(xq, gu, mgu, torch.float32),
               mlp_two=lambda: scaled_mm(two(), d, md, torch.bfloat16),
               mlp_one=lambda: scaled_mm(one(), d, md, torch.bfloat16),
               lib=lambda: swiglu_mlp(xq, w, torch.bfloat16))
    ms = interleaved_graph_ms(fns, 20, rounds=7)
    return dict(inter=inter, tokens=xq.q.shape[0], bit_equal=bool(same),
                **{k: round(v, 4) for k, v in ms.items()},
                first_half_ratio=ms["one"] / ms["two"], mlp_ratio=ms["mlp_one"] / ms["mlp_two"])


def measure(inter: int, tokens: list[int], gen: torch.Generator) -> list[dict]:
    shapes = ((inter, HIDDEN), (inter, HIDDEN), (HIDDEN, inter))
    (g, gs), (u, us), (d, ds) = (fp8_weight(s, gen) for s in shapes)
    mm = tuple(scaled_mm_weight_scale(s) for s in (gs, us, torch.cat([gs, us]), ds))
    w = MlpWeights(g, gs, u, us, d, ds)
    rows = []
    for T in tokens:
        xq = act_quant(torch.randn(T, HIDDEN, generator=gen, device="cuda").bfloat16())
        rows.append(_row(inter, xq, g, u, d, torch.cat([g, u]), mm, w))
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--tokens", type=int, nargs="+", default=[128, 512, 1024, 2048, 4096, 8192])
    args = ap.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = [row for inter in (5120, 18432) for row in measure(inter, args.tokens, gen)]
    args.out.mkdir(parents=True, exist_ok=True)
    result = dict(env=dict(gpu=torch.cuda.get_device_name(), **gpu_versions()), rows=rows)
    (args.out / "mlp_first_half_ab_h200.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

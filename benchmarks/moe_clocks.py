"""The MoE layer and the floor's FP8 GEMM, each rested and under sustained load: time per call, SM clock,
board power (NOTES_ffn.md items 23-24). Both sides run into the H200's power cap under load, which is why
moe_ffn.py's floor takes cuBLAS's rate under sustained load, as its timed rows run; this puts both sides'
clocks, rested and loaded, in one file.

    python -m benchmarks.moe_clocks --out DIR [--tokens 2048 4096]   # writes DIR/moe_clocks_h200.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from benchmarks.common import clocks_under_load, gpu_versions, time_ms
from benchmarks.moe_ffn import RATE_N, inputs, make_layer, rate_gemm
from runtime.kernels.moe import moe_ffn


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tokens", type=int, nargs="+", default=[2048, 4096])
    ap.add_argument("--seconds", type=float, default=2.0, help="sustained load per call")
    args = ap.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    calls = {"scaled_mm_8192": rate_gemm(gen)}
    experts, shared = make_layer(gen)
    for T in args.tokens:
        xt, weights, ids = inputs(T, gen)
        calls[f"layer_{T}"] = lambda x=xt, w=weights, i=ids: moe_ffn(x, w, i, experts, shared)
    rested = {}
    for name, fn in calls.items():
        fn()  # compiles, outside the rest
        torch.cuda.synchronize()
        time.sleep(1.0)
        rested[name] = time_ms(fn, 5)
    loaded = clocks_under_load(calls, {}, args.seconds)
    rows = {name: dict(rested_ms=rested[name], **loaded[name]) for name in calls}
    flop = 2 * RATE_N**3
    rows["scaled_mm_8192"] |= dict(rested_tflops=flop / rested["scaled_mm_8192"] / 1e9,
                                   sustained_tflops=flop / loaded["scaled_mm_8192"]["ms_per_call"] / 1e9)
    for name, r in rows.items():
        print(f"{name:16s} rested {r['rested_ms']:.3f} ms, sustained {r['ms_per_call']:.3f} ms at "
              f"{r['sm_mhz']:.0f} MHz, {r['watts']:.0f} W", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    result = dict(machine=torch.cuda.get_device_name(), versions=gpu_versions(), seconds=args.seconds,
                  rows=rows)
    (args.out / "moe_clocks_h200.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

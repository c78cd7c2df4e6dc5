"""The MoE layer on the library's persistent grouped GEMM (runtime/kernels/fp8_gemm_wsp.py) against another
version of that file, in turns, on one GPU (NOTES_ffn.md run 18: the A/Bs of the row scales by TMA).

    git show REV:runtime/kernels/fp8_gemm_wsp.py > /tmp/old.py
    python -m benchmarks.moe_wsp_ab --old /tmp/old.py --out DIR [--tokens 512 2048] [--name moe_wsp_ab]

At each token count's default config (`moe.default_moe_config`; sizes whose default is not the persistent
kernel are skipped), the whole layer (`moe.moe_ffn`, shared expert included) runs with the module's
`wsp_grouped_gemm` swapped for the old file's or left as is: eager windows of 10 calls, the two in turns for
--rounds rounds, medians. Outputs are compared bit for bit (a pure speed change must keep them). Writes
DIR/NAME_h200.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from benchmarks.common import gpu_versions, load_source, time_ms  # noqa: E402
from benchmarks.moe_ffn import inputs, make_layer  # noqa: E402


def layer_call(gemm, x, w, ids, experts, shared, config):
    """One moe_ffn call with fp8_gemm_wsp.wsp_grouped_gemm set to `gemm` for its duration."""
    from runtime.kernels import fp8_gemm_wsp
    from runtime.kernels.moe import moe_ffn

    library = fp8_gemm_wsp.wsp_grouped_gemm

    def call():
        fp8_gemm_wsp.wsp_grouped_gemm = gemm  # moe_tma looks it up at each call
        try:
            return moe_ffn(x, w, ids, experts, shared, config)
        finally:
            fp8_gemm_wsp.wsp_grouped_gemm = library
    return call


def measure(T: int, gen: torch.Generator, experts, shared, gemms: dict, rounds: int) -> dict | None:
    from runtime.kernels.moe import MOE_CANDIDATES, default_moe_name

    x, w, ids = inputs(T, gen)
    name = default_moe_name(T, ids.shape[1], experts.num_local)
    config = MOE_CANDIDATES[name]
    if not config.persistent:
        return None
    calls = {name: layer_call(g, x, w, ids, experts, shared, config) for name, g in gemms.items()}
    outs = [call().view(torch.int16) for call in calls.values()]
    times = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            times[name].append(time_ms(call, 10))
    ms = {name: statistics.median(t) for name, t in times.items()}
    return dict(tokens=T, config=name,
                bit_equal=bool(torch.equal(*outs)), ms=ms, new_over_old=ms["new"] / ms["old"],
                rounds={name: [round(t, 4) for t in v] for name, v in times.items()})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--old", type=Path, required=True, help="the other fp8_gemm_wsp.py")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--tokens", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--name", default="moe_wsp_ab")
    args = ap.parse_args()
    from runtime.kernels import fp8_gemm_wsp

    old = load_source(args.old.read_text(), "fp8_gemm_wsp_old")
    gemms = {"old": old.wsp_grouped_gemm, "new": fp8_gemm_wsp.wsp_grouped_gemm}
    gen = torch.Generator(device="cuda").manual_seed(0)
    experts, shared = make_layer(gen)
    rows = []
    for T in args.tokens:
        row = measure(T, gen, experts, shared, gemms, args.rounds)
        if row:
            rows.append(row)
            print(json.dumps({k: row[k] for k in ("tokens", "config", "bit_equal", "ms", "new_over_old")}),
                  flush=True)
    machine = dict(gpu=torch.cuda.get_device_name(), **gpu_versions())
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}_h200.json").write_text(json.dumps(dict(machine=machine, rows=rows), indent=1))


if __name__ == "__main__":
    main()

"""The Hopper Gluon kernels under whichever Triton this process imports: a few FP8 / BF16 MFA decode shapes
and the MoE layer at three token counts, each checked and timed. Run it once per Triton (PYTHONPATH pointing
at each install in turn, the image's first and last to see the machine drift) and compare the JSON files: a
new Triton joins fp8_linear.GLUON_TRITONS only when its GPU tests pass and these times match.

    python -m benchmarks.gluon_tritons --out DIR     # writes DIR/gluon_tritons_<triton version>_h200.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

from benchmarks.common import capture_graph, gpu_versions, time_ms
from benchmarks.mfa_attention import Pools, decode_point
from benchmarks.moe_ffn import inputs, make_layer, rel_err
from runtime.kernels.fp8_linear import gluon_usable
from runtime.kernels.moe import MOE_CANDIDATES, default_moe_name, fused_moe, fused_moe_ref, moe_ffn

DECODE = ((1, 4096), (32, 4096), (128, 4096), (64, 32768))  # (batch, context), page 64
MOE_TOKENS = (512, 2048, 8192)
ROUNDS = 5


def decode_rows(reps: int, gen: torch.Generator) -> list[dict]:
    """Each shape's decode_point (graph replays, error against float64) in ROUNDS rounds: the median time."""
    pools = Pools(max(b * c for b, c in DECODE) + (1 << 20), gen)
    rows = []
    for batch, ctx in DECODE:
        for fp8 in (True, False):
            times, row = [], None
            for _ in range(ROUNDS):
                row = decode_point(pools, batch, ctx, fp8, 64, reps, gen)
                times.append(row["time_us"])
            rows.append(row | dict(time_us=statistics.median(times), time_us_rounds=times))
            print(f"decode {batch}x{ctx} {row['kv']}: {rows[-1]['time_us']:.1f} us, err {row['rel_err']:.1e}",
                  flush=True)
    return rows


def moe_rows(reps: int, gen: torch.Generator) -> list[dict]:
    """The layer (default config) as CUDA-graph replays, ROUNDS windows; the routed experts' error against
    the format-exact reference."""
    experts, shared = make_layer(gen)
    rows = []
    for T in MOE_TOKENS:
        x, weights, ids = inputs(T, gen)
        name = default_moe_name(T, ids.shape[1], experts.num_experts)
        config = MOE_CANDIDATES[name]
        replay = capture_graph(lambda: moe_ffn(x, weights, ids, experts, shared, config)).replay  # noqa: B023
        times = [time_ms(replay, reps) for _ in range(ROUNDS)]
        routed = fused_moe(x, weights, ids, experts, out_dtype=torch.float32, config=config)
        err = rel_err(routed, fused_moe_ref(x, weights, ids, experts))
        rows.append(dict(tokens=T, candidate=name, ms=statistics.median(times), ms_rounds=times,
                         rel_err_routed=err))
        print(f"moe {T}: {rows[-1]['ms']:.3f} ms ({name}), routed err {err:.1e}", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--reps", type=int, default=10, help="timed calls per round")
    args = ap.parse_args()
    versions = gpu_versions()
    if not gluon_usable(torch.device("cuda")):
        sys.exit(f"gluon_tritons: the Gluon kernels are off with Triton {versions['triton']} on "
                 f"{torch.cuda.get_device_name()} (fp8_linear.gluon_usable)")
    gen = torch.Generator(device="cuda").manual_seed(0)
    result = dict(machine=torch.cuda.get_device_name(), versions=versions, rounds=ROUNDS, reps=args.reps,
                  decode=decode_rows(args.reps, gen), moe=moe_rows(args.reps, gen))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"gluon_tritons_{versions['triton']}_h200.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

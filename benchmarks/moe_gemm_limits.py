"""What bounds the routed MoE GEMMs at a token count, on one GPU (NOTES_ffn.md run 18).

    python -m benchmarks.moe_gemm_limits --out DIR [--tokens 2048 4096]

The library's persistent grouped GEMM (runtime/kernels/fp8_gemm_wsp.py) at the MoE default tile of these
sizes (`wsp192g4`: 192 rows, GROUP_M 4, 4 stages) against copies of it built from its source at run time (the
library file is not touched), each leaving one side of the work out:
- loads: the consumers only wait for each stage and release it (no wgmma, no promotion): the TMA stream
  alone; loads_a / loads_b: only A's boxes (the gathered token rows, re-read from L2) or only B's (the
  weights, from DRAM).
- mma: the producer issues no TMA and arrives `ready` itself: the wgmma chains and promotion on stale shared
  memory, at the library's waits.
- half_a: every second tile of a CTA loads no A: the full kernel's MMA work with half of A's L2 reads, what
  a CTA pair sharing A by TMA multicast would save (its outputs are garbage).
- no_tail: a 64-row part with fewer than 32 pairs counts as padding (no A loads, no wgmma): the most that
  cheaper tail parts (a swap-AB tail) could save (those rows' outputs are not computed).
- noprom: each wgmma chain accumulates in the tensor core (no promotion math, no scale loads), same waits;
  noscale: the library's promotion with constant scales (its math without its scale reads a step).
- blocked: the library kernel over weights re-laid out so that each 128 x 128 block is 16 contiguous KB (a TMA
  box one DRAM-contiguous run instead of 128 rows 7 KB apart); its outputs are checked bit-equal to the
  library's (the other copies' outputs mean nothing).
gate_up and down are timed separately on the benchmark's layer (moe_ffn.make_layer / inputs): eager windows of
10 calls, the variants in turns for 7 rounds, medians. Writes DIR/moe_gemm_limits_h200.json. Under the H200's
power cap a lighter copy keeps a higher clock than the full kernel (whose rounds slow down as the run goes
on), so a gap between the library and a copy is partly the cap's; compare two full kernels by an A/B in turns.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from benchmarks.common import clocks_under_load, edited_source, gpu_versions, load_source, time_ms  # noqa: E402
from benchmarks.moe_ffn import copy_bandwidth, inputs, make_layer  # noqa: E402

SOURCE = Path(__file__).resolve().parents[1] / "runtime" / "kernels" / "fp8_gemm_wsp.py"
TILE = "wsp192g4"
ROUNDS = 7


def _step_loads(src: str) -> str:
    """The producer's loads of one K step in fp8_gemm_wsp.py's source: the lines from its `expect`s to its
    last copy (read from the file, not restated here)."""
    start, end = "            bar = ready.index(s)\n", "            step += 1\n"
    if src.count(start) != 1 or src.count(end) != 1:
        raise SystemExit(f"moe_gemm_limits: {SOURCE.name} lost the producer's step ({start.strip()!r} .. "
                         f"{end.strip()!r}): bring benchmarks/moe_gemm_limits.py up to date")
    return src[src.index(start) + len(start):src.index(end)]


_LOADS = _step_loads(SOURCE.read_text())  # expects, A's parts and their row scales, then the weight tile
_LOAD_B = "            load_b(b_desc, b2_desc, b_smem.index(s), bar, off_b, j, k, SWIGLU, SUB_N)\n"
_B_SCALES = "                b_s, b2_s = weight_scales(bs_ptr, b2s_ptr, kb, stride_bsk, SWIGLU)\n"
_A_SCALES = "                a_s = _a_scales(as_smem, s, half, PARTS)\n"
_PROMOTED = """            for kb in range(k_tiles):
                step = base + kb
                s = step % STAGES
""" + _B_SCALES + """                mbarrier.wait(ready.index(s), (step // STAGES) & 1)
""" + _A_SCALES + """                t = _mma(a_smem.index(PARTS * s + half), b_smem.index(s), zero)
                release(empty.index(s))
                acc, acc2 = promote(t, acc, acc2, a_s, b_s, b2_s, SWIGLU)
"""
_IN_TENSOR_CORE = """            acc_t = zero
            for kb in range(k_tiles):
                step = base + kb
                s = step % STAGES
                mbarrier.wait(ready.index(s), (step // STAGES) & 1)
                acc_t = warpgroup_mma(a_smem.index(PARTS * s + half), b_smem.index(s).permute((1, 0)), acc_t,
                                      is_async=True)
                acc_t = warpgroup_mma_wait(0, deps=[acc_t])
                release(empty.index(s))
            if SWIGLU:
                acc, acc2 = _halves(acc_t)
            else:
                acc = acc_t
"""
_BLOCKED_LOAD = '''

BLOCKED = {}  # a weight's data_ptr -> the same weights as [1, E * N * K / 128, 128] (`blocked`)


@gluon.jit
def _load_b_blocked(b_desc, b2_desc, b, bar, off_b, j, k, K, SWIGLU: gl.constexpr, SUB_N: gl.constexpr):
    r = off_b + j * SUB_N if SWIGLU else off_b
    row = ((r // 128) * (K // 128) + k // 128) * 128 + r % 128
    if SWIGLU:
        tma_load(b_desc, [row, 0], bar, b.slice(0, SUB_N))
        tma_load(b2_desc, [row, 0], bar, b.slice(SUB_N, SUB_N))
    else:
        tma_load(b_desc, [row, 0], bar, b)
'''
# half_a: every second tile of a CTA loads no A (its rows and row scales): the consumers multiply stale shared
# memory there, so the MMA work stays and A's L2 reads halve, as a CTA pair sharing A by TMA multicast would.
_A_LOADS = _LOADS.replace(_LOAD_B, "")
_HALF_A = ("            if n % 2 == 1:\n                mbarrier.expect(bar, B_BYTES)\n            else:\n"
           + "".join("    " + line for line in _A_LOADS.splitlines(keepends=True)) + _LOAD_B)
_NO_MMA = [("acc = _k_loop(step, k_tiles, live,", "acc = _k_loop(step, k_tiles, False,"),
           ("h1 = _k_loop(step, k_tiles, live,", "h1 = _k_loop(step, k_tiles, False,")]
EDITS = {
    "loads": _NO_MMA,
    "loads_a": _NO_MMA + [(_LOADS, _LOADS.replace("B_BYTES + ", "").replace(_LOAD_B, ""))],
    "loads_b": _NO_MMA + [(_LOADS, "            mbarrier.expect(bar, B_BYTES)\n" + _LOAD_B)],
    "half_a": [(_LOADS, _HALF_A)],
    "no_tail": [("return gl.load(rows_ptr + off_m + half * HALF_M) < num_pairs",
                 "return gl.load(rows_ptr + off_m + half * HALF_M + 31) < num_pairs")],
    "mma": [(_LOADS, "            mbarrier.arrive(bar, count=1)\n")],
    "noprom": [(_PROMOTED, _IN_TENSOR_CORE)],
    "noscale": [(_B_SCALES, "                b_s, b2_s = 1.0, 1.0\n"),
                (_A_SCALES, "                a_s = gl.full([HALF_M], 1.0, gl.float32, "
                            "gl.SliceLayout(1, layout))\n")],
    "blocked": [(_LOAD_B, _LOAD_B.replace("load_b(", "_load_b_blocked(").replace("SWIGLU", "K, SWIGLU")),
                ("a_desc, b_desc, b2_desc = descriptors(a, b, b2)",
                 "a_desc, b_desc, b2_desc = descriptors(a, BLOCKED[b.data_ptr()], "
                 "None if b2 is None else BLOCKED[b2.data_ptr()])")],
}


def variant_source(name: str) -> str:
    """fp8_gemm_wsp.py as the copy `name` (EDITS)."""
    src = edited_source(SOURCE, EDITS[name], "benchmarks/moe_gemm_limits.py")
    return src + _BLOCKED_LOAD if name == "blocked" else src


def blocked(w: torch.Tensor) -> torch.Tensor:
    """[E, N, K] weights as [1, E * N * K / 128, 128], each 128 x 128 block 16 contiguous KB."""
    E, N, K = w.shape
    return w.view(E, N // 128, 128, K // 128, 128).permute(0, 1, 3, 2, 4).contiguous().view(1, -1, 128)


def gemm_calls(T: int, gen: torch.Generator, experts, modules: dict) -> tuple[dict, dict, dict]:
    """(name -> one gate_up or down GEMM of `T` tokens on that module's kernel, name -> its output buffer,
    `wgmma_rows` of the routing)."""
    from quant.fp8 import FP8_DTYPE
    from runtime.kernels.act_quant import act_quant
    from runtime.kernels.moe import MOE_CANDIDATES
    from runtime.kernels.moe_routing import align_by_expert, pair_buffer
    from runtime.kernels.moe_tma import gather_rows

    cfg = MOE_CANDIDATES[TILE]
    x, w, ids = inputs(T, gen)
    pairs = ids.numel()
    rows, block_expert = align_by_expert(ids, experts.first, experts.num_local, cfg.block_m)
    a, a_scale_t = gather_rows(act_quant(x), rows, ids.shape[1])
    hq = torch.empty((a.shape[0], experts.gate.shape[1]), dtype=FP8_DTYPE, device=a.device)
    hs = torch.empty((hq.shape[1] // 128, a.shape[0]), dtype=torch.float32, device=a.device)
    partial = pair_buffer(experts, pairs, torch.bfloat16, a.device)
    tiles = dict(block_m=cfg.block_m, group_m=cfg.group_m, skip=cfg.skip_pad, defer=cfg.defer, rows=rows,
                 num_pairs=pairs)
    topk_w = w.reshape(-1).float()
    calls, outs = {}, {}
    for name, m in modules.items():
        calls[f"gate_up:{name}"] = lambda m=m: m.wsp_grouped_gemm(
            a, a_scale_t, experts.gate, experts.gate_scale, hq, block_expert, b2=experts.up,
            b2_scale=experts.up_scale, out_scale_t=hs, num_stages=cfg.stages_gate_up, **tiles)
        calls[f"down:{name}"] = lambda m=m: m.wsp_grouped_gemm(
            hq, hs, experts.down, experts.down_scale, partial, block_expert, topk_weights=topk_w,
            num_stages=cfg.stages_down, **tiles)
        outs[f"gate_up:{name}"], outs[f"down:{name}"] = hq, partial
    return calls, outs, wgmma_rows(rows, pairs)


def wgmma_rows(rows: torch.Tensor, pairs: int) -> dict[str, int]:
    """Rows the consumers multiply per weight tile: 64 per part holding a pair (the library), and without the
    parts of fewer than 32 pairs (`no_tail`); against the pairs themselves."""
    valid = (rows < pairs).view(-1, 64).sum(1)
    return dict(pairs=pairs, library=64 * int((valid > 0).sum()), no_tail=64 * int((valid >= 32).sum()))


def blocked_matches(calls: dict, outs: dict) -> dict[str, bool]:
    """Whether the blocked-weight kernel writes the library's bytes (gate_up's h, then down's partials from
    the library's h)."""
    same = {}
    for gemm in ("gate_up", "down"):
        calls["gate_up:library"]()
        calls[f"{gemm}:library"]()
        want = outs[f"{gemm}:library"].clone()
        calls["gate_up:library"]()
        calls[f"{gemm}:blocked"]()
        same[gemm] = bool(torch.equal(want.view(torch.uint8), outs[f"{gemm}:blocked"].view(torch.uint8)))
    return same


def measure(T: int, gen: torch.Generator, experts, modules: dict, clocks: bool = False) -> dict:
    calls, outs, mma_rows = gemm_calls(T, gen, experts, modules)
    same = blocked_matches(calls, outs) if "blocked" in modules else None
    times = {name: [] for name in calls}
    for _ in range(ROUNDS):
        for name, fn in calls.items():
            if name.startswith("down"):
                calls["gate_up:library"]()  # the library's h (the copies write garbage)
            times[name].append(time_ms(fn, 10))
    ms = {name: statistics.median(t) for name, t in times.items()}
    h_first = {name: calls["gate_up:library"] for name in calls if name.startswith("down")}
    weight_gb = {g: getattr(experts, g).numel() / 1e9 for g in ("gate", "up", "down")}
    gb = {"gate_up": weight_gb["gate"] + weight_gb["up"], "down": weight_gb["down"]}
    tbs = {name: gb[name.split(":")[0]] / ms[name] for name in ms if name.endswith("loads_b")}
    return dict(tokens=T, ms=ms, blocked_bit_equal=same, weights_tb_per_s=tbs,
                wgmma_rows=mma_rows, clocks=clocks_under_load(calls, h_first) if clocks else None,
                rounds={name: [round(t, 4) for t in v] for name, v in times.items()})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--tokens", type=int, nargs="+", default=[2048, 4096])
    ap.add_argument("--variants", nargs="+", choices=sorted(EDITS), default=sorted(EDITS),
                    help="the copies to time beside the library (default: all)")
    ap.add_argument("--clocks", action="store_true",
                    help="also run each call alone for 1.5 s and record the SM clock and power (nvidia-smi)")
    args = ap.parse_args()
    from runtime.kernels import fp8_gemm_wsp

    copies = {n: load_source(variant_source(n), f"wsp_{n}") for n in args.variants}
    modules = {"library": fp8_gemm_wsp} | copies
    gen = torch.Generator(device="cuda").manual_seed(0)
    experts, _ = make_layer(gen)
    for w in (experts.gate, experts.up, experts.down) if "blocked" in modules else ():
        modules["blocked"].BLOCKED[w.data_ptr()] = blocked(w)
    rows = []
    for T in args.tokens:
        rows.append(measure(T, gen, experts, modules, args.clocks))
        print(json.dumps({k: rows[-1][k] for k in ("tokens", "ms", "blocked_bit_equal")}), flush=True)
    machine = dict(gpu=torch.cuda.get_device_name(), copy_tb_per_s=copy_bandwidth() / 1e12, **gpu_versions())
    result = dict(machine=machine, tile=TILE, rounds=ROUNDS, rows=rows)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "moe_gemm_limits_h200.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

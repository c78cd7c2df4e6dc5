"""Where a CTA of the Gluon FP8 decode kernel spends its time, on one GPU (NOTES_mfa.md run 13).

    python benchmarks/mfa_cta_trace.py --out DIR                     # timeline per CTA
    python benchmarks/mfa_cta_trace.py --waits consumer --out DIR    # + cycles its mbarrier waits take
    python benchmarks/mfa_cta_trace.py --waits converter --out DIR

A traced copy of runtime/kernels/mfa_decode_ws.py is built from its source at run time (the library file is
not touched, and the traced kernel is never the library's): every CTA writes %globaltimer at its entry, when
its consumer starts, when q is in its registers (and the converter's rows of q), when each partition's q split
and the whole split are done, after its first S, when its loop ends and after its epilogue, and the loader and
the converter when their first tile is issued / in. With --waits, thread 0 of that partition also sums the
%clock cycles spent in each of its mbarrier waits in the loop (one partition a run: counters in both, or at
the consumer's wgmma waits, make ptxas spill the consumer; the consumer's counters still spill 24 B where a
sequence is split, so count its waits at one-split shapes). Each shape: the library kernel and the traced one
as CUDA-graph replays, then one traced replay after warm ones; medians over the CTAs. Writes
DIR/mfa_cta_trace[_PARTITION_waits]_h200.json (DIR: benchmarks/results unless --out).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from benchmarks.common import capture_graph, edited_source, gpu_versions, load_source  # noqa: E402
from benchmarks.mfa_attention import time_graph  # noqa: E402

SOURCE = Path(__file__).resolve().parents[1] / "runtime" / "kernels" / "mfa_decode_ws.py"
SLOTS = 24  # int64 words per CTA: 0-9, 12, 13, 16-18 timeline; 10, 11, 14, 15 wait counters (low 32 bits)
H, D, PAGE = 64, 256, 64
SHAPES = ((128, 0), (128, 1024), (128, 4096), (128, 8192), (256, 4096), (32, 4096), (128, 32768))
TIMELINE = {"q_split_done": 1, "first_s": 2, "loop_done": 3, "epilogue_done": 4, "loader_first_issue": 6,
            "converter_first_v": 7, "consumer_start": 12, "q_loaded": 13, "consumer_split_done": 16,
            "converter_split_done": 17, "converter_q_loaded": 18}
FIXED = (1, 4, 12, 13, 16, 17, 18)  # the slots an empty sequence (ctx 0) writes too
WAITS = {"consumer": {"k_ready": 10, "v16_ready": 11}, "converter": {"v_ready": 14, "v16_empty": 15}}

_HELPERS = '''@gluon.jit
def _now():
    return gl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=gl.int64, is_pure=False,
                                     pack=1)


@gluon.jit
def _now_after(x):
    """%globaltimer once x is computed (the asm takes it as an operand, so it cannot be read earlier)."""
    return gl.inline_asm_elementwise("mov.u64 $0, %globaltimer; // $1", "=l,r", [x], dtype=gl.int64,
                                     is_pure=False, pack=1)


@gluon.jit
def _clk():
    return gl.inline_asm_elementwise("mov.u64 $0, %clock64;", "=l", [], dtype=gl.int64, is_pure=False, pack=1)


@gluon.jit
def _c32():
    return gl.inline_asm_elementwise("mov.u32 $0, %clock;", "=r", [], dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def _acc(tr, slot: gl.constexpr, val):
    """Thread 0 of the warpgroup adds val to the low word of slot (the wait counters)."""
    ptr = tr.to(gl.pointer_type(gl.int32), bitcast=True) + 2 * slot
    gl.inline_asm_elementwise("{ .reg .pred p; .reg .b32 t; mov.u32 t, %tid.x; and.b32 t, t, 127; "
                              "setp.eq.u32 p, t, 0; @p red.global.add.u32 [$1], $2; mov.u32 $0, 0; }",
                              "=r,l,r", [ptr, val], dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def _tile_bounds('''


def _wait(line: str, slot: int) -> str:
    """line (an mbarrier wait) with its cycles summed into slot."""
    pad = line[: len(line) - len(line.lstrip())]
    return f"{pad}c0 = _c32()\n{line}\n{pad}_acc(tr, {slot}, _c32() - c0)"


def _edits(waits: str | None) -> list[tuple]:
    """(anchor, replacement[, copies of the anchor, 1 if not given]) on mfa_decode_ws.py's source: the trace
    pointer `tr` is passed to every partition (and into _qk / _pv through the consumer's bufs tuple) and the
    stores are added."""
    k_wait = "    mbarrier.wait(k_ready.index(s), (i // STAGES) & 1)"
    v16_wait = "    mbarrier.wait(v16_ready.index(j), (i // VSTAGES) & 1)"
    v_wait = "        mbarrier.wait(v_ready.index(s), (i // STAGES) & 1)"
    free_wait = "        mbarrier.wait(v16_empty.index(j), ((i // VSTAGES) & 1) ^ 1)"
    load_v = "        _load_tile(v_desc, v_smem, v_ready, v_empty, s, phase, rows, BLOCK_N, R, NH)\n"
    split_q = "    _split_q_smem(x0, x1, q_smem, q_in, qs_smem, NH, "  # the consumer's and the converter's
    q_done = "    mbarrier.wait(q_done, 0)  # the converter's rows\n"
    q_arrive = "    mbarrier.arrive(q_in, count=1)  # after the loads"
    q_done_arrive = "    mbarrier.arrive(q_done, count=1)\n"
    consumer_first = "    k_scale = gl.load(k_scale_ptr)  # the scales and q first"
    last_wait = "        acc0, acc1, p16 = warpgroup_mma_wait(0, deps=[t0, t1, p16])\n    if PDL == 2:"
    epilogue = "              num_splits, stride_ob, stride_oh, H, DIRECT, o_layout)\n"
    bufs = "(q_smem, k_smem, k_ready, k_empty, v16_smem, v16_ready, v16_empty"
    store = "{}gl.store(tr + {}, _now())\n".format
    edits = [
        ("@gluon.jit\ndef _tile_bounds(", _HELPERS),
        ("            STAGES: gl.constexpr, NH: gl.constexpr):\n",
         "            STAGES: gl.constexpr, NH: gl.constexpr, tr):\n"),
        (load_v, load_v + "        if i == 0:\n" + store(" " * 12, 6)),
        ("               VEC: gl.constexpr):", "               VEC: gl.constexpr, tr):"),  # the converter
        (v_wait + "\n", (_wait(v_wait, 14) if waits == "converter" else v_wait) + "\n        if i == 0:\n"
         + store(" " * 12, 7)),
        ("k_ready, i, zero, STAGES", "k_ready, i, zero, tr, STAGES"),
        ("zero_s, STAGES, NH)", "zero_s, tr, STAGES, NH)", 2),  # S of the first tile, S(i + 1)
        ("def _pv(p, alpha, acc0, acc1, v16_smem, v16_ready, i, VSTAGES",
         "def _pv(p, alpha, acc0, acc1, v16_smem, v16_ready, i, tr, VSTAGES"),
        ("v16_ready, i, VSTAGES, o_layout)", "v16_ready, i, tr, VSTAGES, o_layout)"),
        ("v16_ready, last, VSTAGES, o_layout)", "v16_ready, last, tr, VSTAGES, o_layout)"),
        ("v16_smem, v16_ready, v16_empty = bufs", "v16_smem, v16_ready, v16_empty, tr = bufs"),
        (f"bufs = {bufs})", f"bufs = {bufs}, tr)"),
        ("PAIR: gl.constexpr, PDL: gl.constexpr):\n    \"\"\"Scores",
         "PAIR: gl.constexpr, PDL: gl.constexpr, tr):\n    \"\"\"Scores"),
        (split_q, split_q.replace("NH, ", "NH, tr, "), 2),
        ("def _split_q_smem(x0, x1, q_smem, q_in, qs_smem, NH: gl.constexpr, ROW0: gl.constexpr):",
         "def _split_q_smem(x0, x1, q_smem, q_in, qs_smem, NH: gl.constexpr, tr, ROW0: gl.constexpr):"),
        (q_arrive, "    loaded = _now_after(gl.max(amax, 0).to(gl.int32, bitcast=True))\n"
         "    gl.store(tr + (13 if ROW0 == 0 else 18), loaded)  # the consumer's rows, or the converter's\n"
         + q_arrive),
        (q_done, store(" " * 4, 16) + q_done + store(" " * 4, 1)),
        (q_done_arrive, store(" " * 4, 17) + q_done_arrive),
        (consumer_first, store(" " * 4, 12) + consumer_first),
        ("        release(k_empty.index(0))\n",
         "        release(k_empty.index(0))\n" + store(" " * 8, 2)),
        (last_wait, last_wait.replace("\n", "\n" + store(" " * 4, 3))),
        (epilogue, epilogue + store(" " * 4, 4) + "    gl.store(tr + 5, _clk())\n"),
        ("PAIR: gl.constexpr, PDL: gl.constexpr):", "PAIR: gl.constexpr, PDL: gl.constexpr, trace_ptr):"),
        ("    b = gl.program_id(1)\n", "    b = gl.program_id(1)\n"
         f"    tr = trace_ptr + (b * num_splits + split) * {SLOTS}\n"
         + store(" " * 4, 0) + "    gl.store(tr + 8, _clk())\n"),
        ("STAGES, VSTAGES, NH, DIRECT, PAIR, PDL)),", "STAGES, VSTAGES, NH, DIRECT, PAIR, PDL, tr)),"),
        ("STAGES, VSTAGES, NH, VEC)),", "STAGES, VSTAGES, NH, VEC, tr)),"),
        ("PAGE, BLOCK_N, STAGES, NH)),", "PAGE, BLOCK_N, STAGES, NH, tr)),"),
        ("pdl: int = 0) -> None:", "pdl: int = 0, trace: torch.Tensor | None = None) -> None:"),
        ("num_warps=4, launch_pdl=pdl > 0,", "num_warps=4, launch_pdl=pdl > 0, trace_ptr=trace,"),
    ]
    if waits == "consumer":
        edits += [(k_wait + "\n", _wait(k_wait, 10) + "\n"), (v16_wait + "\n", _wait(v16_wait, 11) + "\n")]
    elif waits == "converter":
        edits += [(free_wait + "\n", _wait(free_wait, 15) + "\n")]
    return edits


def traced_source(waits: str | None = None) -> str:
    """mfa_decode_ws.py with the trace stores; a clear error names the anchor the kernel source has lost."""
    return edited_source(SOURCE, _edits(waits), "benchmarks/mfa_cta_trace.py")


def load_traced(waits: str | None):
    """The traced kernel module (Gluon reads a kernel's source from its file)."""
    return load_source(traced_source(waits), f"mfa_decode_ws_traced_{waits or 'timeline'}")


def trace_shape(batch: int, ctx: int, library, traced, waits: str | None) -> dict:
    """One shape (ctx 0: empty sequences, the CTA's fixed cost alone): times, then the CTAs' timeline."""
    from runtime.kernels.kv_cache import FP8_DTYPE, PagedKVCache
    from runtime.kernels.mfa_decode import LOG2E, partial_dtype
    from runtime.kernels.mfa_plan import plan_decode

    pages = batch * max(ctx, PAGE) // PAGE
    kv = [(torch.randn(pages * PAGE, D, device="cuda") * 20).clamp(-448, 448).to(FP8_DTYPE) for _ in "kv"]
    scale = torch.tensor([0.05], device="cuda")
    cache = PagedKVCache(kv[0].view(-1, PAGE, D), kv[1].view(-1, PAGE, D), scale, scale.clone())
    table = torch.randperm(pages, device="cuda").int().view(batch, -1)
    q = torch.randn(batch, H, D, device="cuda", dtype=torch.bfloat16)
    lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    plan = plan_decode(batch, max(ctx, PAGE), D, torch.device("cuda"), FP8_DTYPE, PAGE, gluon=2, qk_fp8=2)
    out = torch.empty_like(q)
    split = plan.num_splits > 1
    part_o = torch.empty(batch, plan.num_splits, H, D, device="cuda", dtype=partial_dtype(cache, q.dtype))
    part_o = part_o if split else out
    part_lse = torch.empty(batch, plan.num_splits, H, device="cuda") if split else out
    trace = torch.zeros(batch * plan.num_splits * SLOTS, dtype=torch.int64, device="cuda")
    kw = dict(block_n=plan.block_n, stages=plan.num_stages, vstages=plan.gluon_vstages, pair=plan.gluon == 2)
    args = (q, cache, table, lens, out, part_o, part_lse, D**-0.5 * LOG2E, plan.num_splits,
            plan.tokens_per_split)
    call = lambda mod, **more: lambda: mod.mfa_decode_ws(*args, **kw, **more)
    row = dict(batch=batch, context=ctx, splits=plan.num_splits, stages=plan.num_stages,
               vstages=plan.gluon_vstages, library_us=time_graph(call(library), 20),
               traced_us=time_graph(call(traced, trace=trace), 20))
    graph = capture_graph(call(traced, trace=trace))
    for _ in range(5):
        graph.replay()
    trace.zero_()
    graph.replay()
    torch.cuda.synchronize()
    t = trace.view(-1, SLOTS).cpu()
    us = lambda a, b: (t[:, b] - t[:, a]).double() / 1e3
    med = lambda v: round(float(v.median()), 2)
    row |= {f"{name}_us": med(us(0, slot)) for name, slot in TIMELINE.items() if ctx or slot in FIXED}
    row |= dict(cta_us_max=round(float(us(0, 4).max()), 2),
                span_us=round(float(t[:, 4].max() - t[:, 0].min()) / 1e3, 2),
                ghz=round(float(((t[:, 5] - t[:, 8]).double() / (t[:, 4] - t[:, 0]).double()).median()), 3))
    tiles = plan.tokens_per_split // plan.block_n
    if waits and ctx:
        low = (t & 0xFFFFFFFF).double()
        row |= {f"{waits}_wait_{name}_cycles_per_tile": round(float(low[:, slot].median()) / tiles, 1)
                for name, slot in WAITS[waits].items()}
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--waits", choices=sorted(WAITS), help="also count this partition's mbarrier wait cycles")
    args = ap.parse_args()
    from runtime.kernels import mfa_decode_ws

    traced = load_traced(args.waits)
    rows = []
    for batch, ctx in SHAPES:
        rows.append(trace_shape(batch, ctx, mfa_decode_ws, traced, args.waits))
        print(json.dumps(rows[-1]), flush=True)
    machine = dict(gpu=torch.cuda.get_device_name(), **gpu_versions())
    cost = statistics.median(r["traced_us"] / r["library_us"] for r in rows)  # what the tracing costs
    result = dict(machine=machine, waits=args.waits, rows=rows, traced_over_library=cost)
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"mfa_cta_trace_{args.waits}_waits_h200.json" if args.waits else "mfa_cta_trace_h200.json"
    (args.out / name).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

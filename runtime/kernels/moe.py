"""The fused MoE: routing, grouping by expert, grouped FP8 expert GEMMs and the weighted combine.

    y[t] = sum_j w[t, j] * down_e(q(silu(gate_e x_t) * up_e x_t)),  e = ids[t, j] in [a, b)
A rank that holds experts [a, b) (AFD expert parallelism) computes only the pairs routed into its
range; pairs routed elsewhere contribute zero here, so the sum over ranks is the full MoE.
Launches (no host synchronization, so the whole layer can be captured in a CUDA graph):
  1. act_quant of x (skipped when x arrives as FP8, as AFD sends it);
  2. `align_by_expert` (moe_routing.py): the T*k (token, slot) pairs sorted by expert, each
     expert's run padded to BLOCK_M; the grid is sized for the worst case
     (T*k + E*(BLOCK_M-1) rows) and the unused M-blocks exit at once;
  3. gate_up: fp8_gemm over (M-block, N-tile) gathering token rows, gate and up tiles in one
     program, silu-and-mul and 1x128 re-quantization in the epilogue -> FP8 [P, I];
  4. down: fp8_gemm over the same blocks, times the routing weight, stored at row t*k + j;
  5. combine: sum over the k slots ([T, k, H] -> [T, H]) plus the shared expert, one kernel (moe_combine.py).
Traffic: each weight tile once from HBM per launch (M-blocks sharing it run together), x_q read k
times (gathered), the FP8 intermediate written and read once, [T*k, H] partials written and read.
`moe_ffn` can also route the experts through cuBLAS (moe_cublas.py, MoeConfig.backend = "cublas"),
but that lost at every size on the H200, so `default_moe_config` always picks the Triton path; and
through the TMA kernels over pre-gathered rows (moe_tma.py, backend "tma": the warp-specialized Gluon
kernel on Hopper, fp8_gemm_ws.py / fp8_gemm_wsp.py, or its portable Triton twin), the default from ~16
pairs per expert (256 tokens of Step-3's 48 experts, top-3; H200 runs 6-15).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F

from converters.errors import Step3Error
from quant.fp8 import FP8_DTYPE, dequantize_fp8
from runtime.kernels.act_quant import Fp8Act, act_quant
from runtime.kernels.fp8_gemm import fp8_gemm
from runtime.kernels.fp8_linear import scaled_mm_usable, scaled_mm_weight_scale
from runtime.kernels.mlp import MlpWeights, swiglu_mlp, swiglu_mlp_ref
from runtime.kernels.moe_combine import combine_pairs
from runtime.kernels.moe_cublas import cublas_moe, side_streams
from runtime.kernels.moe_routing import align_by_expert, pair_buffer
from runtime.kernels.moe_tma import portable_block_m, tma_moe_pairs, tma_moe_usable


@dataclass(frozen=True)
class ExpertWeights:
    """Experts [first, first + E_local) of one MoE layer: the HF fused 3-D layout, FP8 or BF16.

    gate/up [E_local, I, H], down [E_local, H, I]; scales [E_local, ceil(out/128), ceil(in/128)] for
    FP8, None for unquantized experts. `num_experts` is the layer's total E (all ranks together).
    """

    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor
    gate_scale: torch.Tensor | None = None
    up_scale: torch.Tensor | None = None
    down_scale: torch.Tensor | None = None
    first: int = 0
    num_experts: int | None = None
    name: str = "moe"

    def __post_init__(self) -> None:
        e, inter, hidden = self.gate.shape
        if self.up.shape != self.gate.shape or tuple(self.down.shape) != (e, hidden, inter):
            raise Step3Error(f"{self.name}: expert shapes disagree: gate_proj {tuple(self.gate.shape)}, "
                             f"up_proj {tuple(self.up.shape)}, down_proj {tuple(self.down.shape)} "
                             f"(want [E, I, H] twice and [E, H, I])")
        fp8 = self.gate.dtype == FP8_DTYPE
        scales = (self.gate_scale, self.up_scale, self.down_scale)
        if any((s is not None) != fp8 for s in scales):
            raise Step3Error(f"{self.name}: FP8 experts need gate/up/down weight_scale_inv; "
                             f"BF16 ones take none")
        total = self.num_experts if self.num_experts is not None else self.first + e
        if not 0 <= self.first <= total - e:
            raise Step3Error(f"{self.name}: expert range [{self.first}, {self.first + e}) is outside "
                             f"0..{total} (num_experts)")
        object.__setattr__(self, "num_experts", total)

    @property
    def num_local(self) -> int:
        return self.gate.shape[0]

    @property
    def fp8(self) -> bool:
        return self.gate_scale is not None

    @cached_property
    def mm_scales(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """gate/up/down scales in torch._scaled_mm's layout ([E, K/128, N/128] views), made once."""
        return tuple(scaled_mm_weight_scale(s) for s in (self.gate_scale, self.up_scale, self.down_scale))


@dataclass(frozen=True)
class MoeConfig:
    """Tile sizes and warps/stages of the two grouped launches (benchmarks/moe_ffn.py sweeps them)."""

    block_m: int = 64
    group_m: int = 8
    warps_gate_up: int = 4
    stages_gate_up: int = 3
    block_n_down: int = 128
    warps_down: int = 4
    stages_down: int = 3
    shared_first_half: str = "auto"  # see mlp.swiglu_mlp
    backend: str = "triton"  # routed experts: "triton" (fused_moe), "tma" (moe_tma.py) or "cublas"
    streams: int = 4  # CUDA streams of the cuBLAS backend
    interleave: bool = False  # gate_up as one dot over interleaved gate/up columns (fp8_gemm INTERLEAVE)
    warp_specialize: bool = False  # "tma" on Hopper: the Gluon producer/consumer kernel (fp8_gemm_ws.py)
    fuse_quant: bool = False  # and h quantized in its gate_up epilogue (no fp32 h, no act_quant launch)
    persistent: bool = False  # with fuse_quant: the persistent kernel with a producer warp (fp8_gemm_wsp.py)
    skip_pad: bool = False  # and no wgmma for a consumer whose 64 rows are all padding
    defer: bool = False  # and two wgmma chains in flight per consumer (one promoted while the next runs)
    shared_stream: bool = False  # moe_ffn: the shared expert on a side CUDA stream


# Tile candidates, by name: benchmarks/moe_ffn.py times them in-run per token count and records all.
# MoeConfig(block_m, group_m, warps_gate_up, stages_gate_up, block_n_down, warps_down, stages_down).
# The gate_up tile is BLOCK_M x (128 gate + 128 up) columns with two fp32 accumulators: at 64 rows and
# 4 warps ptxas (sm_90a) needs 255 registers and spills (104 B after the scalar weight scales, 776 B
# before); at 64 rows and 8 warps (two warpgroups, 64x64 of each per warpgroup) it needs 177 and
# spills nothing; 128 rows / 8 warps 255 + 64 B spills. The down tile (one accumulator) fits at
# 64 / 4 (187 registers) and 128 / 8 (179). See benchmarks/NOTES_ffn.md.
MOE_CANDIDATES = {
    "m16s2": MoeConfig(16, 1, 4, 2, 128, 4, 2),
    "m16s3": MoeConfig(16, 1, 4, 3, 128, 4, 3),
    "m32s3": MoeConfig(32, 1, 4, 3, 128, 4, 3),
    "m64w4": MoeConfig(64, 8, 4, 3, 128, 4, 3),
    "m64w4s4": MoeConfig(64, 8, 4, 4, 128, 4, 4),
    # 2 stages: 82 KB of buffers and 255 registers (no spills) let TWO independent 4-warp CTAs share an
    # SM (run 4's 3-stage tile: one), so one CTA's promotion can overlap the other's wgmma
    "m64w4s2": MoeConfig(64, 8, 4, 2, 128, 4, 2),
    "m64w8": MoeConfig(64, 8, 8, 3, 128, 4, 3),
    "m64w8s4": MoeConfig(64, 8, 8, 4, 128, 4, 4),
    "m128w8": MoeConfig(128, 8, 8, 3, 128, 8, 3),
    # gate and up as ONE dot over interleaved columns: 64x256 per program, at 8 warps one m64n128
    # wgmma chain per warpgroup and K step (188 registers, no spills) instead of two m64n64 chains
    # with a full wait between them; at 16 rows (mma.sync) one dot instead of two.
    "m16s3i": MoeConfig(16, 1, 4, 3, 128, 4, 3, interleave=True),
    "m64w8i": MoeConfig(64, 8, 8, 3, 128, 4, 3, interleave=True),
    "m64w8s4i": MoeConfig(64, 8, 8, 4, 128, 4, 4, interleave=True),
    # and the down GEMM as 64x256 tiles on 8 warps (two warpgroups of 64x128: 186 registers, no spills)
    "m64w8id": MoeConfig(64, 8, 8, 3, 256, 8, 3, interleave=True),
    # expert-contiguous rows gathered first, both operands by TMA (moe_tma.py), 128-row tiles: the
    # warp-specialized Gluon kernel on Hopper (fp8_gemm_ws.py; stages of gate_up, down), and the
    # portable Triton kernel (fp8_gemm_tma.py, 8 warps) that is also its interpreter fallback
    "ws128": MoeConfig(128, 8, 4, 4, 128, 4, 4, backend="tma", warp_specialize=True),
    "ws128s6": MoeConfig(128, 8, 4, 5, 128, 4, 6, backend="tma", warp_specialize=True),
    "tma128": MoeConfig(128, 8, 8, 3, 128, 8, 3, backend="tma"),
    # run 7: the Gluon gate_up quantizes h in its epilogue (a program: 128 rows x 128 h columns as two
    # 64-column sub-tiles through one continuous pipeline; no fp32 h, no act_quant launch)
    "ws128q": MoeConfig(128, 8, 4, 4, 128, 4, 4, backend="tma", warp_specialize=True, fuse_quant=True),
    "ws128qs6": MoeConfig(128, 8, 4, 5, 128, 4, 6, backend="tma", warp_specialize=True, fuse_quant=True),
    # run 8: ws128q as a persistent grid (a CTA per SM loops over tiles) with a 1-warp TMA producer partition
    # (fp8_gemm_wsp.py); s: no wgmma for all-padding 64-row halves; d: two chains in flight per consumer;
    # 6: 5 / 6 stages
    "wsp": MoeConfig(128, 8, 4, 4, 128, 4, 4, backend="tma", warp_specialize=True, fuse_quant=True,
                     persistent=True),
    "wsps": MoeConfig(128, 8, 4, 4, 128, 4, 4, backend="tma", warp_specialize=True, fuse_quant=True,
                      persistent=True, skip_pad=True),
    "wspsd": MoeConfig(128, 8, 4, 4, 128, 4, 4, backend="tma", warp_specialize=True, fuse_quant=True,
                       persistent=True, skip_pad=True, defer=True),
    "wspsd6": MoeConfig(128, 8, 4, 5, 128, 4, 6, backend="tma", warp_specialize=True, fuse_quant=True,
                        persistent=True, skip_pad=True, defer=True),
    # g4: GROUP_M 4; side: the shared expert on a side stream (moe_ffn)
    "wspsdg4": MoeConfig(128, 4, 4, 4, 128, 4, 4, backend="tma", warp_specialize=True, fuse_quant=True,
                         persistent=True, skip_pad=True, defer=True),
    "wspsd_side": MoeConfig(128, 8, 4, 4, 128, 4, 4, backend="tma", warp_specialize=True, fuse_quant=True,
                            persistent=True, skip_pad=True, defer=True, shared_stream=True),
    "wspsdg4_side": MoeConfig(128, 4, 4, 4, 128, 4, 4, backend="tma", warp_specialize=True, fuse_quant=True,
                              persistent=True, skip_pad=True, defer=True, shared_stream=True),
    # run 9: 192-row tiles, three consumer warpgroups (no defer: 160 registers each), 4 / 5 stages
    "wsp192g4": MoeConfig(192, 4, 4, 4, 128, 4, 4, backend="tma", warp_specialize=True, fuse_quant=True,
                          persistent=True, skip_pad=True),
    "wsp192g4_side": MoeConfig(192, 4, 4, 4, 128, 4, 4, backend="tma", warp_specialize=True, fuse_quant=True,
                               persistent=True, skip_pad=True, shared_stream=True),
    "wsp192g4s5": MoeConfig(192, 4, 4, 5, 128, 4, 5, backend="tma", warp_specialize=True, fuse_quant=True,
                            persistent=True, skip_pad=True),
    "wsp192g8_side": MoeConfig(192, 8, 4, 4, 128, 4, 4, backend="tma", warp_specialize=True, fuse_quant=True,
                               persistent=True, skip_pad=True, shared_stream=True),
    # session 5: routing in two launches leaves the shared expert little to overlap on a side stream
    "wsp192g8": MoeConfig(192, 8, 4, 4, 128, 4, 4, backend="tma", warp_specialize=True, fuse_quant=True,
                          persistent=True, skip_pad=True),
}
# default per mean (token, slot) pairs per expert: (upper bound, candidate name), first match wins.
# Above ~96 pairs (2048 tokens: 128) the persistent Gluon GEMM (tiles in order from an atomic counter),
# no wgmma for padding parts, 192-row tiles (an expert's 129-192 pairs stream its weights once), GROUP_M 4
# and the shared expert on a side stream up to ~256 pairs (2048 / 4096 tokens), GROUP_M 8 and no side
# stream at ~512 (8192). H200 run 11 (session 6): the in-run winners of all three full runs, ahead of run
# 10's defaults (wspsd_side, wsp192g8_side) by 1-3% at 2048, 0.5-4% at 4096 and 2-4% at 8192.
# Session 10 (`benchmarks/results/moe_mid_ab_run15_h200.json`, 5 interleaved rounds): the 32-row tile lost to
# the persistent Gluon kernel from ~32 pairs per expert (512 tokens 2.05 vs 1.67 ms, 1024 tokens 3.15 vs 1.84
# ms: 64 pairs had gone to 32-row tiles), and beat the 16-row one at 256 tokens (1.57 vs 1.69).
DEFAULT_MOE_TILES = ((8, "m16s3i"), (16, "m32s3"), (96, "wspsd_side"), (384, "wsp192g4_side"),
                     (float("inf"), "wsp192g8"))


def default_moe_config(tokens: int, top_k: int, num_experts: int) -> MoeConfig:
    """MOE_CANDIDATES[default_moe_name(...)]."""
    return MOE_CANDIDATES[default_moe_name(tokens, top_k, num_experts)]


def default_moe_name(tokens: int, top_k: int, num_experts: int) -> str:
    """The fastest candidate per mean pairs per expert on the H200 (DEFAULT_MOE_TILES), by name.

    16- and 32-row gathering tiles while experts get up to ~16 pairs (weight-bandwidth bound: little
    padding); above, the TMA path over expert-contiguous rows (warp-specialized and persistent on Hopper:
    128-row tiles with two chains in flight per consumer, then 192-row tiles from ~96 pairs). The cuBLAS
    backend never won (CPU-launch bound, NOTES_ffn.md). num_experts is the layer's: an AFD rank holding some
    of them sees the same mean pairs per expert as the whole layer.
    """
    mean = tokens * top_k / max(num_experts, 1)
    return next(name for bound, name in DEFAULT_MOE_TILES if mean <= bound)


def fused_moe(x: torch.Tensor | Fp8Act, weights: torch.Tensor, ids: torch.Tensor, experts: ExpertWeights,
              out_dtype: torch.dtype | None = None, config: MoeConfig | None = None) -> torch.Tensor:
    """Routed experts of this rank: x [T, H], weights/ids [T, k] -> [T, H] partial sum (out_dtype)."""
    return combine_pairs(routed_pairs(x, weights, ids, experts, out_dtype, config), ids.shape[1])


def routed_pairs(x: torch.Tensor | Fp8Act, weights: torch.Tensor, ids: torch.Tensor, experts: ExpertWeights,
                 out_dtype: torch.dtype | None = None, config: MoeConfig | None = None) -> torch.Tensor:
    """fused_moe before the combine: [T * k, H] in out_dtype, row t * k + j = w[t, j] times expert
    ids[t, j]'s output for token t (zeros where that expert is on another rank)."""
    T, k = ids.shape
    if experts.fp8 and not isinstance(x, Fp8Act):
        out_dtype, x = out_dtype or x.dtype, act_quant(x)
    a, a_scale = (x.q, x.scale_inv) if isinstance(x, Fp8Act) else (x, None)
    out_dtype = out_dtype or (a.dtype if not experts.fp8 else torch.bfloat16)
    if a.shape != (T, experts.gate.shape[2]) or weights.shape != ids.shape:
        raise Step3Error(f"{experts.name}: x {tuple(a.shape)}, weights {tuple(weights.shape)} and ids "
                         f"{tuple(ids.shape)} do not fit hidden size {experts.gate.shape[2]}")
    config = config or default_moe_config(T, k, experts.num_experts)
    if config.backend == "tma" and tma_moe_usable(experts):
        return tma_moe_pairs(x, weights, ids, experts, out_dtype, config)
    bm = portable_block_m(config.block_m)
    rows, block_expert = align_by_expert(ids, experts.first, experts.num_local, bm)
    inter = experts.gate.shape[1]
    h = torch.empty((rows.numel(), inter), dtype=FP8_DTYPE if experts.fp8 else a.dtype, device=a.device)
    h_scale = (torch.empty((-(-inter // 128), rows.numel()), dtype=torch.float32, device=a.device).t()
               if experts.fp8 else None)
    grouped = dict(rows=rows, block_expert=block_expert, num_pairs=T * k, top_k=k, block_m=bm,
                   group_m=config.group_m)
    fp8_gemm(a, a_scale, experts.gate, experts.gate_scale, h, b2=experts.up, b2_scale=experts.up_scale,
             out_scale=h_scale, gather_a=True, block_n=128, num_warps=config.warps_gate_up,
             num_stages=config.stages_gate_up, interleave=config.interleave, **grouped)
    partial = pair_buffer(experts, T * k, out_dtype, a.device)
    fp8_gemm(h, h_scale, experts.down, experts.down_scale, partial, topk_weights=weights.reshape(-1).float(),
             block_n=config.block_n_down, num_warps=config.warps_down, num_stages=config.stages_down,
             **grouped)
    return partial


def moe_ffn(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, experts: ExpertWeights,
            shared: MlpWeights | None, config: MoeConfig | None = None) -> torch.Tensor:
    """A MoE layer's FFN on one rank: routed experts + (this rank's slice of) the shared expert, summed
    by one combine kernel (moe_combine.py). config.shared_stream: the shared expert runs on a side CUDA
    stream, beside the routing and the routed GEMMs."""
    config = config or default_moe_config(ids.shape[0], ids.shape[1], experts.num_experts)
    xq = act_quant(x) if experts.fp8 else x
    hidden, inter = experts.gate.shape[2], experts.gate.shape[1]
    cublas = (experts.fp8 and scaled_mm_usable(x.device, inter, hidden)
              and scaled_mm_usable(x.device, hidden, inter))
    shared_fn = None if shared is None else (lambda: swiglu_mlp(xq if experts.fp8 else x, shared,
                                                                 out_dtype=x.dtype,
                                                                 first_half=config.shared_first_half))
    if config.backend == "cublas" and cublas:
        y = cublas_moe(xq, weights, ids, experts, out_dtype=x.dtype, num_streams=config.streams)
        return y if shared_fn is None else y + shared_fn()
    side = config.shared_stream and x.is_cuda and shared_fn is not None
    if side:
        y_shared, join = on_side_stream(shared_fn, x.device)
    else:
        y_shared, join = (None if shared_fn is None else shared_fn()), None
    pairs = routed_pairs(xq, weights, ids, experts, out_dtype=x.dtype, config=config)
    if join is not None:
        join()
    return combine_pairs(pairs, ids.shape[1], y_shared)


def on_side_stream(fn, device: torch.device):
    """Run fn's launches on a side stream that starts after the current stream's work so far: (its result,
    join), join making the current stream wait for them (a fork and join that CUDA graphs capture)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    main, side = torch.cuda.current_stream(device), side_streams(index, 1)[0]
    side.wait_stream(main)
    with torch.cuda.stream(side):
        out = fn()

    def join() -> None:
        # no record_stream for `out` (it is not captured in CUDA graphs): its block goes back to the side
        # stream's pool, whose next user waits for the main stream first (the wait_stream above)
        main.wait_stream(side)

    return out, join


def fused_moe_ref(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                  experts: ExpertWeights) -> torch.Tensor:
    """fp32 reference, expert by expert: dequantized weights, the same activation quantizations."""
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in range(experts.num_local):
        token, slot = (ids.long() == experts.first + e).nonzero(as_tuple=True)
        if token.numel() == 0:
            continue
        if experts.fp8:
            w = MlpWeights(experts.gate[e], experts.gate_scale[e], experts.up[e], experts.up_scale[e],
                           experts.down[e], experts.down_scale[e])
            y = swiglu_mlp_ref(x[token], w)
        else:
            g, u, d = experts.gate[e].float(), experts.up[e].float(), experts.down[e].float()
            xe = x[token].float()
            y = (F.silu(xe @ g.t()) * (xe @ u.t())) @ d.t()
        out.index_add_(0, token, y * weights[token, slot, None].float())
    return out


def dequantized_experts(experts: ExpertWeights) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 gate, up, down of the local experts (for runtime/model/reference.py's routed_experts)."""
    if not experts.fp8:
        return experts.gate.float(), experts.up.float(), experts.down.float()
    return (dequantize_fp8(experts.gate, experts.gate_scale), dequantize_fp8(experts.up, experts.up_scale),
            dequantize_fp8(experts.down, experts.down_scale))

"""Grouped block-FP8 GEMM, DeepGEMM-style, in Gluon for Hopper: two consumer warpgroups, fed by TMA,
that promote each 128-K step to fp32 without waiting for each other.

    C[m, n] = sum_kb (A_q[m, kb] @ B_q[e(m), n, kb]^T) * a_scale[kb, m] * b_scale[e(m), n // 128, kb]
A's rows are sorted by expert, each expert's run padded to 128 (moe_tma.py gathers them), so every
operand tile is a plain TMA box: A [P, K] at (m, k) in two 64-row halves, B [E * N, K] at
(expert * N + n, k). `gl.warp_specialize` runs two partitions of 4 warps, consumer 0 and 1 (rows
64c..64c+63 of the tile), synchronized only through per-stage mbarriers (no CTA-wide barrier in the
K loop): per K step each waits for `ready`, runs the wgmma chain into an fp32 temporary, waits for
it, releases the stage (`empty`: each thread, `gluon_sync.release`), and scales and adds the temporary
to its fp32 accumulator (the per-128-K promotion: chained FP8 accumulation inside the tensor core measured 4x
the error, NOTES_ffn.md run 3). Consumer 0 also issues the TMA loads, STAGES - 1 steps ahead, each
once both consumers released that stage. So one consumer's promotion can run while the other's
wgmma keeps the tensor cores busy: the overlap that the pointer-based kernel (fp8_gemm.py: every
warp meets at one barrier per K step) cannot give, and that Triton 3.6's automatic warp
specialization of fp8_gemm_tma.py's loop was meant to give but did not finish on the H200.
A separate producer warp would make 3 warpgroups (ptxas then caps every thread at 168 registers).
Every K step is one m64n128k32 wgmma chain per consumer: a 64-column B tile reads A from shared memory
once per 64 columns, a 128-column one once per 128 (a quarter less shared-memory traffic per FLOP,
NOTES_ffn.md run 7). Modes:
  SWIGLU   gate and up, 64 rows each, into one [128, 128] B stage (two TMA boxes): one accumulator
           whose column halves are gate and up (`_halves`: a register relabeling); h = silu(gate) * up.
           QUANT: a program runs two such 64-column sub-tiles through one continuous pipeline (the
           loads of the second start during the first) and quantizes the 128 columns of h per 1x128
           group in its epilogue, FP8 out + scales [N/128, P] (as act_quant, so the codes are the
           same bits); else h leaves as fp32 [P, N] and moe_tma.py runs act_quant.
  WEIGHTED the down projection, 128 columns: row m is pair rows[m] (padding: >= num_pairs,
           dropped); stores w[pair] * row at C[pair].
ptxas (sm_90a, Triton 3.6): no spills in any mode (QUANT also under a 200-register cap), 131-197 KB of shared
memory. Two 128-column chains per step (a 256-column down tile) spilled 600 B: not used.
Runs on the Tritons of fp8_linear.GLUON_TRITONS (3.6-3.9). Traffic:
GROUP_M M-blocks sweep the N tiles together (an expert's weight tile comes from HBM about once per
launch; A tiles are reused from L2).
"""

from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from runtime.kernels.gluon_api import tma_load
from runtime.kernels.gluon_sync import WARPGROUP_THREADS, release

BLOCK_M, HALF_M = gl.constexpr(128), gl.constexpr(64)
# a consumer's [64, 128] fp32 accumulator (m64n128 wgmma) and its [64, 64] h (SwiGLU) register layouts
ACC_LAYOUT = gl.constexpr(gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                    instr_shape=[16, 128, 32]))
H_LAYOUT = gl.constexpr(gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                  instr_shape=[16, 64, 32]))


@gluon.jit
def _tile(pid, block_expert_ptr, N, K, num_m, TILE_N: gl.constexpr, GROUP_M: gl.constexpr,
          TILE_M: gl.constexpr):
    """(first A row, first B row, n tile, expert, K steps) of tile `pid` (TILE_M rows per M-block); K steps
    0 past the end."""
    in_group = GROUP_M * (N // TILE_N)
    first_m = (pid // in_group) * GROUP_M
    group_size = gl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % group_size
    pid_n = (pid % in_group) // group_size
    expert = gl.load(block_expert_ptr + pid_m)
    k_tiles = gl.where(expert < 0, 0, K // 128)
    expert = gl.maximum(expert, 0)
    return pid_m * TILE_M, expert * N + pid_n * TILE_N, pid_n, expert, k_tiles


@gluon.jit
def _load(step, k_tiles, a_desc, b_desc, b2_desc, a_smem, b_smem, ready, empty, off_m, off_b,
          SWIGLU: gl.constexpr, STAGES: gl.constexpr, SUB_N: gl.constexpr):
    """Issue global step `step`'s TMA loads (sub-tile step // k_tiles, K block step % k_tiles) once both
    consumers released its stage (`empty`). SwiGLU: gate rows into the stage's first 64 rows,
    up rows into the last 64, so one m64n128 wgmma multiplies A by both."""
    s = step % STAGES
    j = step // k_tiles
    k = (step - j * k_tiles) * 128
    mbarrier.wait(empty.index(s), ((step // STAGES) & 1) ^ 1)  # the first round passes at once
    bar = ready.index(s)
    mbarrier.expect(bar, (BLOCK_M + 128) * 128)
    tma_load(a_desc, [off_m, k], bar, a_smem.index(2 * s))
    tma_load(a_desc, [off_m + HALF_M, k], bar, a_smem.index(2 * s + 1))
    load_b(b_desc, b2_desc, b_smem.index(s), bar, off_b, j, k, SWIGLU, SUB_N)


@gluon.jit
def load_b(b_desc, b2_desc, b, bar, off_b, j, k, SWIGLU: gl.constexpr, SUB_N: gl.constexpr):
    """The weight tile of sub-tile j at K offset k into stage b: SwiGLU gate rows into its first SUB_N rows
    and up rows into the last SUB_N (one m64n128 wgmma multiplies A by both), else B's 128 rows."""
    if SWIGLU:
        tma_load(b_desc, [off_b + j * SUB_N, k], bar, b.slice(0, SUB_N))
        tma_load(b2_desc, [off_b + j * SUB_N, k], bar, b.slice(SUB_N, SUB_N))
    else:
        tma_load(b_desc, [off_b, k], bar, b)


@gluon.jit
def _halves(t):
    """[64, 128] -> its column halves [64, 64] (gate, up): in the m64n128 accumulator layout column bit 6
    is a register index, so this moves no data."""
    return gl.split(gl.permute(gl.reshape(t, [HALF_M, 2, 64]), [0, 2, 1]))


@gluon.jit
def weight_scales(bs_ptr, b2s_ptr, kb, stride_bsk, SWIGLU: gl.constexpr):
    """K block kb's weight-tile scales (gate's and up's): one float each, the same for every thread."""
    b_s = gl.load(bs_ptr + kb * stride_bsk)
    return b_s, gl.load(b2s_ptr + kb * stride_bsk) if SWIGLU else b_s


@gluon.jit
def scales(as_ptr, bs_ptr, b2s_ptr, kb, offs_m, stride_asg, stride_bsk, SWIGLU: gl.constexpr):
    """K block kb's scales: A's per row, the weight tile's (gate's and up's); loaded before the stage wait,
    so their L2 latency hides behind it (NOTES_ffn.md run 7)."""
    a_s = gl.load(as_ptr + kb * stride_asg + offs_m)
    b_s, b2_s = weight_scales(bs_ptr, b2s_ptr, kb, stride_bsk, SWIGLU)
    return a_s, b_s, b2_s


@gluon.jit
def promote(t, acc, acc2, a_s, b_s, b2_s, SWIGLU: gl.constexpr):
    """acc += t * a_s * b_s (SwiGLU: t's column halves into the gate and up accumulators)."""
    if SWIGLU:
        tg, tu = _halves(t)
        acc = acc + tg * gl.convert_layout(a_s * b_s, gl.SliceLayout(1, tg.type.layout))[:, None]
        acc2 = acc2 + tu * gl.convert_layout(a_s * b2_s, gl.SliceLayout(1, tu.type.layout))[:, None]
    else:
        acc = acc + t * (a_s * b_s)[:, None]
    return acc, acc2


@gluon.jit
def _mma(a, b, zero):
    """a b^T on the tensor cores into a fresh fp32 tile, waited for (the promotion reads it next)."""
    t = warpgroup_mma(a, b.permute((1, 0)), zero, use_acc=False, is_async=True)
    return warpgroup_mma_wait(0, deps=[t])


@gluon.jit
def _k_loop(j, half, k_tiles, a_desc, b_desc, b2_desc, a_smem, b_smem, ready, empty, as_ptr, bs_ptr, b2s_ptr,
            off_m, off_b, offs_m, stride_asg, stride_bsk,
            SWIGLU: gl.constexpr, SUB: gl.constexpr, STAGES: gl.constexpr, SUB_N: gl.constexpr,
            LOADER: gl.constexpr, layout: gl.constexpr, out_layout: gl.constexpr):
    """Sub-tile j's K loop (global steps j * k_tiles + kb): per step wait for the stage, one m64n128
    wgmma chain into an fp32 temporary, wait for it, release the stage, promote (scale and add).
    Returns the [64, 128] accumulator, or for SwiGLU h = silu(gate) * up [64, 64] in out_layout."""
    zero = gl.zeros([HALF_M, 128], gl.float32, layout)
    if SWIGLU:
        acc, acc2 = _halves(zero)
    else:
        acc, acc2 = zero, zero  # acc2 unused
    for kb in range(k_tiles):
        step = j * k_tiles + kb
        s = step % STAGES
        a_s, b_s, b2_s = scales(as_ptr, bs_ptr, b2s_ptr, kb, offs_m, stride_asg, stride_bsk, SWIGLU)
        mbarrier.wait(ready.index(s), (step // STAGES) & 1)
        t = _mma(a_smem.index(2 * s + half), b_smem.index(s), zero)
        release(empty.index(s))
        if LOADER and step + STAGES - 1 < SUB * k_tiles:  # the stage of step - 1, both consumers past it
            _load(step + STAGES - 1, k_tiles, a_desc, b_desc, b2_desc, a_smem, b_smem, ready, empty,
                  off_m, off_b, SWIGLU, STAGES, SUB_N)
        acc, acc2 = promote(t, acc, acc2, a_s, b_s, b2_s, SWIGLU)
    if SWIGLU:
        acc = gl.convert_layout(acc / (1.0 + gl.exp(-acc)) * acc2, out_layout)
    return acc


@gluon.jit
def _consumer(half, a_desc, b_desc, b2_desc, a_smem, b_smem, ready, empty, as_ptr, bs_ptr, b2s_ptr,
              c_ptr, cs_ptr, block_expert_ptr, rows_ptr, topk_w_ptr, N, K, num_m, num_pairs, stride_asg,
              stride_bse, stride_bsn, stride_bsk, stride_cm, stride_csg,
              SWIGLU: gl.constexpr, WEIGHTED: gl.constexpr, QUANT: gl.constexpr, STAGES: gl.constexpr,
              GROUP_M: gl.constexpr, LOADER: gl.constexpr):
    layout: gl.constexpr = ACC_LAYOUT
    out_layout: gl.constexpr = H_LAYOUT
    SUB_N: gl.constexpr = 64 if SWIGLU else 128
    SUB: gl.constexpr = 2 if QUANT else 1
    TILE_N: gl.constexpr = SUB * SUB_N
    off_m, off_b, pid_n, expert, k_tiles = _tile(gl.program_id(0), block_expert_ptr, N, K, num_m, TILE_N,
                                                  GROUP_M, BLOCK_M)
    lay: gl.constexpr = out_layout if SWIGLU else layout
    offs_m = off_m + half * HALF_M + gl.arange(0, HALF_M, layout=gl.SliceLayout(1, layout))
    scale_off = expert.to(gl.int64) * stride_bse + (pid_n * TILE_N // 128) * stride_bsn
    bs, b2s = bs_ptr + scale_off, b2s_ptr + scale_off
    if LOADER:
        for step in gl.static_range(STAGES - 1):
            if step < SUB * k_tiles:
                _load(step, k_tiles, a_desc, b_desc, b2_desc, a_smem, b_smem, ready, empty, off_m, off_b,
                      SWIGLU, STAGES, SUB_N)
    acc = _k_loop(0, half, k_tiles, a_desc, b_desc, b2_desc, a_smem, b_smem, ready, empty, as_ptr, bs, b2s,
                  off_m, off_b, offs_m, stride_asg, stride_bsk, SWIGLU, SUB, STAGES, SUB_N, LOADER, layout,
                  out_layout)
    h1 = acc
    if QUANT:  # the second 64 columns of h
        h1 = _k_loop(1, half, k_tiles, a_desc, b_desc, b2_desc, a_smem, b_smem, ready, empty, as_ptr, bs, b2s,
                     off_m, off_b, offs_m, stride_asg, stride_bsk, SWIGLU, SUB, STAGES, SUB_N, LOADER, layout,
                     out_layout)
    _store(acc, h1, offs_m, pid_n, c_ptr, cs_ptr, rows_ptr, topk_w_ptr, num_pairs, stride_cm, stride_csg,
           SWIGLU, WEIGHTED, QUANT, TILE_N, SUB_N, lay)


@gluon.jit
def _store(acc, h1, offs_m, pid_n, c_ptr, cs_ptr, rows_ptr, topk_w_ptr, num_pairs, stride_cm, stride_csg,
           SWIGLU: gl.constexpr, WEIGHTED: gl.constexpr, QUANT: gl.constexpr, TILE_N: gl.constexpr,
           SUB_N: gl.constexpr, lay: gl.constexpr):
    """A consumer's epilogue: QUANT: h = [acc | h1] quantized per 1x128 group (FP8 + scale per row); SWIGLU:
    fp32 h; WEIGHTED: w[pair] * acc scattered to row pair (padding rows dropped)."""
    rows = gl.convert_layout(offs_m, gl.SliceLayout(1, lay)).to(gl.int64)
    offs_n = pid_n * TILE_N + gl.arange(0, SUB_N, layout=gl.SliceLayout(0, lay))
    if QUANT:  # the format's 1x128 quantization over both halves
        amax = gl.maximum(gl.max(gl.abs(acc), axis=1), gl.max(gl.abs(h1), axis=1))
        amax = gl.where(amax > 0, amax, 1.0)
        scale = gl.div_rn(gl.full(amax.shape, 448.0, gl.float32, amax.type.layout), amax)  # IEEE, as torch
        c_ptrs = c_ptr + rows[:, None] * stride_cm + offs_n[None, :]
        gl.store(c_ptrs, (acc * scale[:, None]).to(c_ptr.dtype.element_ty))  # cvt.rn.satfinite, as torch
        gl.store(c_ptrs + SUB_N, (h1 * scale[:, None]).to(c_ptr.dtype.element_ty))
        gl.store(cs_ptr + pid_n * stride_csg + rows, gl.div_rn(gl.full(amax.shape, 1.0, gl.float32,
                                                                        amax.type.layout), scale))
    elif SWIGLU:  # h, every row (unused blocks: zeros, so act_quant sees finite rows)
        gl.store(c_ptr + rows[:, None] * stride_cm + offs_n[None, :], acc.to(c_ptr.dtype.element_ty))
    if WEIGHTED:
        pair = gl.load(rows_ptr + offs_m)
        row_ok = pair < num_pairs
        acc = acc * gl.load(topk_w_ptr + pair, mask=row_ok, other=0.0)[:, None]
        c_ptrs = c_ptr + pair.to(gl.int64)[:, None] * stride_cm + offs_n[None, :]
        gl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=row_ok[:, None])


@gluon.jit
def smem_ring(a_desc, b_desc, STAGES: gl.constexpr, PARTS: gl.constexpr):
    """The K-step ring of both grouped GEMMs (this one and fp8_gemm_wsp.py): per stage PARTS 64-row A parts
    (one per consumer warpgroup) and one [128, 128] B tile, a `ready` mbarrier (the stage's TMA bytes
    landed) and an `empty` one (every consumer warpgroup is done with it)."""
    a_smem = gl.allocate_shared_memory(a_desc.dtype, [PARTS * STAGES, HALF_M, 128], a_desc.layout)
    b_smem = gl.allocate_shared_memory(b_desc.dtype, [STAGES, 128, 128], b_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=PARTS * WARPGROUP_THREADS)  # every consumer thread (`release`)
    fence_async_shared()
    return a_smem, b_smem, ready, empty


@gluon.jit
def _ws_gemm_kernel(a_desc, as_ptr, b_desc, b2_desc, bs_ptr, b2s_ptr, c_ptr, cs_ptr, block_expert_ptr,
                    rows_ptr, topk_w_ptr, N, K, num_m, num_pairs, stride_asg, stride_bse, stride_bsn,
                    stride_bsk, stride_cm, stride_csg,
                    SWIGLU: gl.constexpr, WEIGHTED: gl.constexpr, QUANT: gl.constexpr, STAGES: gl.constexpr,
                    GROUP_M: gl.constexpr, CONSUMER_REGS: gl.constexpr):
    a_smem, b_smem, ready, empty = smem_ring(a_desc, b_desc, STAGES, 2)
    # the argument tuples are spelled out: a tuple built by concatenation turns constexprs into tensors
    gl.warp_specialize([
        (_consumer, (0, a_desc, b_desc, b2_desc, a_smem, b_smem, ready, empty, as_ptr, bs_ptr, b2s_ptr, c_ptr,
                     cs_ptr, block_expert_ptr, rows_ptr, topk_w_ptr, N, K, num_m, num_pairs, stride_asg,
                     stride_bse, stride_bsn, stride_bsk, stride_cm, stride_csg, SWIGLU, WEIGHTED, QUANT,
                     STAGES, GROUP_M, True)),
        (_consumer, (1, a_desc, b_desc, b2_desc, a_smem, b_smem, ready, empty, as_ptr, bs_ptr, b2s_ptr, c_ptr,
                     cs_ptr, block_expert_ptr, rows_ptr, topk_w_ptr, N, K, num_m, num_pairs, stride_asg,
                     stride_bse, stride_bsn, stride_bsk, stride_cm, stride_csg, SWIGLU, WEIGHTED, QUANT,
                     STAGES, GROUP_M, False)),
    ], [4], [CONSUMER_REGS])


def descriptors(a: torch.Tensor, b: torch.Tensor, b2: torch.Tensor | None) -> tuple:
    """TMA descriptors of A (64-row boxes: a consumer's half), B and B2 ([E * N, K] views; 64-row boxes for
    SwiGLU, where gate and up share a stage, else 128); B2 = B when absent. Host block shapes: plain ints."""
    E, N, K = b.shape
    block_n = 64 if b2 is not None else 128

    def desc(t: torch.Tensor, rows: int) -> TensorDescriptor:
        return TensorDescriptor.from_tensor(t, [rows, 128], gl.NVMMASharedLayout.get_default_for([rows, 128],
                                                                                                gl.float8e4nv))

    b_desc = desc(b.view(E * N, K), block_n)
    return desc(a, 64), b_desc, b_desc if b2 is None else desc(b2.view(E * N, K), block_n)


def ws_grouped_gemm(a: torch.Tensor, a_scale_t: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                    out: torch.Tensor, block_expert: torch.Tensor, *, b2: torch.Tensor | None = None,
                    b2_scale: torch.Tensor | None = None, out_scale_t: torch.Tensor | None = None,
                    rows: torch.Tensor | None = None, topk_weights: torch.Tensor | None = None,
                    num_pairs: int = 0, group_m: int = 8, num_stages: int = 4,
                    consumer_regs: int = 240) -> torch.Tensor:
    """Launch `_ws_gemm_kernel` into `out` (Hopper only; shapes are the caller's, moe_tma.py, to check).

    a [P, K] FP8 (P = 128 * len(block_expert)); a_scale_t [K/128, P] fp32, contiguous in P; b, b2
    [E, N, K] FP8 with scales [E, N/128, K/128]. With b2: out [P, N] = silu(a b^T) * (a b2^T), fp32, or
    with out_scale_t [N/128, P] (contiguous in P) FP8 quantized per 1x128 group; with rows and
    topk_weights: out [num_pairs, N] (the weighted scatter).
    """
    E, N, K = b.shape
    quant = out_scale_t is not None
    block_n = 64 if b2 is not None else 128  # SwiGLU: gate and up 64 rows each per pipeline stage
    assert N % 128 == 0 and K % 128 == 0 and a.shape[0] == 128 * block_expert.numel()
    assert a_scale_t.stride(1) == 1 and (not quant or (b2 is not None and out_scale_t.stride(1) == 1))
    a_desc, b_desc, b2_desc = descriptors(a, b, b2)
    nil = block_expert  # stands in for the pointers a mode does not use
    grid = (block_expert.numel() * (N // (128 if quant else block_n)),)
    _ws_gemm_kernel[grid](
        a_desc, a_scale_t, b_desc, b2_desc, b_scale, b_scale if b2_scale is None else b2_scale, out,
        out_scale_t if quant else a_scale_t, block_expert, nil if rows is None else rows,
        nil if topk_weights is None else topk_weights, N, K, block_expert.numel(), num_pairs,
        a_scale_t.stride(0), b_scale.stride(0), b_scale.stride(1), b_scale.stride(2), out.stride(0),
        out_scale_t.stride(0) if quant else 0,
        SWIGLU=b2 is not None, WEIGHTED=topk_weights is not None, QUANT=quant, STAGES=num_stages,
        GROUP_M=group_m, CONSUMER_REGS=consumer_regs, num_warps=4,
    )
    return out

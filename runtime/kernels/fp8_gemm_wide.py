"""fp8_gemm_wsp.py's persistent grouped block-FP8 GEMM with 256 weight rows per tile and no promotion
temporaries: the accumulators are rescaled instead.

Same operands, layout and results as fp8_gemm_wsp.py (QUANT gate_up and WEIGHTED down only: the modes
moe_tma.py's fused path uses). Each pipeline stage holds A's 128 rows (two 64-row halves, one per
consumer warpgroup) and 256 B rows as two 128-row sub-tiles: gate and up of the same 128 h columns
(SwiGLU), or 256 consecutive output columns (down). So A crosses from L2 into shared memory once per
256 weight rows instead of once per 128: per K step 48 KB for 2 x 128 x 128 x 128 products against
64 KB in fp8_gemm_wsp.py, the traffic that bounds it (NOTES_ffn.md run 8).

Why no temporaries: the promotion C += (A_k B_k) * s_k (s_k = a_scale[row, k] * b_scale[k], one value per
row and sub-tile) needs the wgmma result apart from C, and two 64 x 128 temporaries next to two 64 x 128
accumulators spilled (NOTES_ffn.md run 8: "wide" tile). Here each wgmma accumulates straight into C, kept
in units of the current step's scale:
    C <- C * (s_{k-1} / s_k) + A_k B_k,   result = C * s_last
(flash attention's running rescale of its output). A step whose scale is 0 (only possible for a zero
weight block; act_quant never gives 0) keeps the previous unit, exactly, since its products are 0. The
ratio trick is exact up to fp32 rounding (~1e-7 relative per step) while the per-row scales of one row
stay within ~1e25 of each other (the accumulator grows by their ratio). Per K step and consumer: rescale
C0 and C1, start both chains, wait for them; the other consumer's chains keep the tensor cores busy
meanwhile (rescaling C1 under C0's chain made ptxas insert a wait there anyway, C7517). 128 accumulator
registers per thread, no spills (ptxas sm_90a, Triton 3.6).
"""

from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

from runtime.kernels.fp8_gemm_ws import ACC_LAYOUT, HALF_M, _halves, _store, _tile, descriptors, smem_ring
from runtime.kernels.fp8_gemm_wsp import _live, sm_count

SUB_ROWS = gl.constexpr(128)  # B rows of one sub-tile (one m64n128 wgmma chain per consumer)


@gluon.jit
def _sub_tiles(tile, block_expert_ptr, N, K, num_m, SWIGLU: gl.constexpr, GROUP_M: gl.constexpr):
    """Tile `tile`'s (first A row, pid_n, expert, K steps, B row of sub-tile 0, of sub-tile 1, whether
    sub-tile 1 is inside N): SwiGLU: gate and up rows of the same 128 h columns (always inside); down:
    columns 256 pid_n + 0 / + 128 (the second past N when N is an odd number of 128s)."""
    TILE_N: gl.constexpr = SUB_ROWS if SWIGLU else 2 * SUB_ROWS
    off_m, off_b, pid_n, expert, k_tiles = _tile(tile, block_expert_ptr, N, K, num_m, TILE_N, GROUP_M)
    if SWIGLU:
        return off_m, pid_n, expert, k_tiles, off_b, off_b, True
    else:
        return off_m, pid_n, expert, k_tiles, off_b, off_b + SUB_ROWS, pid_n * TILE_N + SUB_ROWS < N


@gluon.jit
def _producer(a_desc, b_desc, b2_desc, a_smem, b_smem, ready, empty, block_expert_ptr, rows_ptr, N, K, num_m,
              num_pairs, num_tiles, SWIGLU: gl.constexpr, STAGES: gl.constexpr, GROUP_M: gl.constexpr,
              SKIP: gl.constexpr):
    """Every TMA load of this CTA's tiles through the STAGES-deep ring: A's two halves (the second only
    when live) and both B sub-tiles (a sub-tile past the last expert's rows is zero-filled by TMA; one
    past N inside the tensor is loaded and never stored)."""
    B_BYTES: gl.constexpr = 2 * SUB_ROWS * 128
    step = 0
    for tile in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
        off_m, pid_n, expert, k_tiles, off_b0, off_b1, hi_in = _sub_tiles(tile, block_expert_ptr, N, K, num_m,
                                                                          SWIGLU, GROUP_M)
        live1 = _live(rows_ptr, off_m, 1, num_pairs, SKIP)
        for kb in range(k_tiles):
            k = kb * 128
            s = step % STAGES
            mbarrier.wait(empty.index(s), ((step // STAGES) & 1) ^ 1)  # the first round passes at once
            bar = ready.index(s)
            mbarrier.expect(bar, B_BYTES + 2 * HALF_M * 128, pred=live1)
            mbarrier.expect(bar, B_BYTES + HALF_M * 128, pred=not live1)
            tma.async_copy_global_to_shared(a_desc, [off_m, k], bar, a_smem.index(2 * s))
            tma.async_copy_global_to_shared(a_desc, [off_m + HALF_M, k], bar, a_smem.index(2 * s + 1),
                                            pred=live1)
            b = b_smem.index(s)
            tma.async_copy_global_to_shared(b_desc, [off_b0, k], bar, b.slice(0, SUB_ROWS))
            tma.async_copy_global_to_shared(b2_desc, [off_b1, k], bar, b.slice(SUB_ROWS, SUB_ROWS))
            step += 1


@gluon.jit
def _unit(a_s, b_s, prev):
    """The accumulator's unit for this step, a_s * b_s per row, and the factor that moves C from the previous
    unit to it; a zero scale keeps the previous unit (its products are zero)."""
    unit = a_s * b_s
    unit = gl.where(unit > 0, unit, prev)
    return unit, prev / unit


@gluon.jit
def _k_loop(base, k_tiles, live, a_smem, b_smem, ready, empty, as_ptr, bs0, bs1, offs_m, stride_asg,
            stride_bsk, half: gl.constexpr, STAGES: gl.constexpr):
    """One tile's K loop (global steps base ..): both sub-tiles' products, each accumulated in units of the
    running scale; returns them in real units. Not live: only wait for each stage and release it."""
    acc0 = gl.zeros([HALF_M, 128], gl.float32, ACC_LAYOUT)
    acc1 = acc0
    unit0 = gl.full([HALF_M], 1.0, gl.float32, gl.SliceLayout(1, ACC_LAYOUT))
    unit1 = unit0
    for kb in range(k_tiles):
        step = base + kb
        s = step % STAGES
        if live:
            # the scales first: their L2 latency hides behind the stage wait (NOTES_ffn.md run 7)
            a_s = gl.load(as_ptr + kb * stride_asg + offs_m)
            b0 = gl.load(bs0 + kb * stride_bsk)
            b1 = gl.load(bs1 + kb * stride_bsk)
            mbarrier.wait(ready.index(s), (step // STAGES) & 1)
            a = a_smem.index(2 * s + half)
            b = b_smem.index(s)
            unit0, f0 = _unit(a_s, b0, unit0)
            unit1, f1 = _unit(a_s, b1, unit1)
            acc0 = acc0 * f0[:, None]
            acc1 = acc1 * f1[:, None]
            t0 = warpgroup_mma(a, b.slice(0, SUB_ROWS).permute((1, 0)), acc0, is_async=True)
            t1 = warpgroup_mma(a, b.slice(SUB_ROWS, SUB_ROWS).permute((1, 0)), acc1, is_async=True)
            acc0, acc1 = warpgroup_mma_wait(0, deps=[t0, t1])
        else:
            mbarrier.wait(ready.index(s), (step // STAGES) & 1)
        mbarrier.arrive(empty.index(s), count=1)
    return acc0 * unit0[:, None], acc1 * unit1[:, None]


@gluon.jit
def _consumer(half: gl.constexpr, a_smem, b_smem, ready, empty, as_ptr, bs_ptr, b2s_ptr, c_ptr, cs_ptr,
              block_expert_ptr, rows_ptr, topk_w_ptr, N, K, num_m, num_pairs, num_tiles, stride_asg,
              stride_bse, stride_bsn, stride_bsk, stride_cm, stride_csg, SWIGLU: gl.constexpr,
              STAGES: gl.constexpr, GROUP_M: gl.constexpr, SKIP: gl.constexpr):
    """Rows 64 half .. + 63 of every tile of this CTA: the K loop, then the epilogue (fp8_gemm_ws._store):
    SwiGLU: h = silu(gate) * up, 128 columns = one 1x128 group, quantized; down: w[pair] * row, scattered."""
    step = 0
    for tile in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
        off_m, pid_n, expert, k_tiles, off_b0, off_b1, hi_in = _sub_tiles(tile, block_expert_ptr, N, K, num_m,
                                                                          SWIGLU, GROUP_M)
        live = _live(rows_ptr, off_m, half, num_pairs, SKIP)
        offs_m = off_m + half * HALF_M + gl.arange(0, HALF_M, layout=gl.SliceLayout(1, ACC_LAYOUT))
        scale_row = expert.to(gl.int64) * stride_bse
        if SWIGLU:  # gate's and up's scale rows of these h columns
            bs0 = bs_ptr + scale_row + pid_n * stride_bsn
            bs1 = b2s_ptr + scale_row + pid_n * stride_bsn
        else:  # the two 128-column blocks (the second clamped inside N: its columns are not stored)
            bs0 = bs_ptr + scale_row + 2 * pid_n * stride_bsn
            bs1 = bs_ptr + scale_row + gl.minimum(2 * pid_n + 1, N // 128 - 1) * stride_bsn
        y0, y1 = _k_loop(step, k_tiles, live, a_smem, b_smem, ready, empty, as_ptr, bs0, bs1, offs_m,
                         stride_asg, stride_bsk, half, STAGES)
        step += k_tiles
        if SWIGLU:
            h_lo, h_hi = _halves(y0 / (1.0 + gl.exp(-y0)) * y1)
            h_layout: gl.constexpr = h_lo.type.layout
            _store(h_lo, h_hi, offs_m, pid_n, c_ptr, cs_ptr, rows_ptr, topk_w_ptr, num_pairs, stride_cm,
                   stride_csg, True, False, True, 128, 64, h_layout)
        else:
            _store(y0, y0, offs_m, pid_n, c_ptr, cs_ptr, rows_ptr, topk_w_ptr, num_pairs, stride_cm,
                   stride_csg, False, True, False, 256, 128, ACC_LAYOUT)
            if hi_in:
                _store(y1, y1, offs_m, pid_n, c_ptr + 128, cs_ptr, rows_ptr, topk_w_ptr, num_pairs, stride_cm,
                       stride_csg, False, True, False, 256, 128, ACC_LAYOUT)


@gluon.jit
def _wide_gemm_kernel(a_desc, as_ptr, b_desc, b2_desc, bs_ptr, b2s_ptr, c_ptr, cs_ptr, block_expert_ptr,
                      rows_ptr, topk_w_ptr, N, K, num_m, num_pairs, num_tiles, stride_asg, stride_bse,
                      stride_bsn, stride_bsk, stride_cm, stride_csg,
                      SWIGLU: gl.constexpr, STAGES: gl.constexpr, GROUP_M: gl.constexpr, SKIP: gl.constexpr,
                      CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr):
    a_smem, b_smem, ready, empty = smem_ring(a_desc, b_desc, STAGES, 2 * SUB_ROWS)
    # the argument tuples are spelled out (see fp8_gemm_wsp.py)
    gl.warp_specialize([
        (_consumer, (0, a_smem, b_smem, ready, empty, as_ptr, bs_ptr, b2s_ptr, c_ptr, cs_ptr,
                     block_expert_ptr, rows_ptr, topk_w_ptr, N, K, num_m, num_pairs, num_tiles, stride_asg,
                     stride_bse, stride_bsn, stride_bsk, stride_cm, stride_csg, SWIGLU, STAGES, GROUP_M,
                     SKIP)),
        (_consumer, (1, a_smem, b_smem, ready, empty, as_ptr, bs_ptr, b2s_ptr, c_ptr, cs_ptr,
                     block_expert_ptr, rows_ptr, topk_w_ptr, N, K, num_m, num_pairs, num_tiles, stride_asg,
                     stride_bse, stride_bsn, stride_bsk, stride_cm, stride_csg, SWIGLU, STAGES, GROUP_M,
                     SKIP)),
        (_producer, (a_desc, b_desc, b2_desc, a_smem, b_smem, ready, empty, block_expert_ptr, rows_ptr, N, K,
                     num_m, num_pairs, num_tiles, SWIGLU, STAGES, GROUP_M, SKIP)),
    ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])


def wide_grouped_gemm(a: torch.Tensor, a_scale_t: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                      out: torch.Tensor, block_expert: torch.Tensor, rows: torch.Tensor, num_pairs: int, *,
                      b2: torch.Tensor | None = None, b2_scale: torch.Tensor | None = None,
                      out_scale_t: torch.Tensor | None = None, topk_weights: torch.Tensor | None = None,
                      group_m: int = 8, num_stages: int = 4, skip: bool = True, consumer_regs: int = 240,
                      producer_regs: int = 24) -> torch.Tensor:
    """fp8_gemm_wsp.wsp_grouped_gemm's contract in its two fused modes: gate_up (b2, out_scale_t: h
    quantized) or down (topk_weights: the weighted scatter)."""
    E, N, K = b.shape
    swiglu = b2 is not None
    assert N % 128 == 0 and K % 128 == 0 and a.shape[0] == 128 * block_expert.numel() == rows.numel()
    assert swiglu == (out_scale_t is not None) == (topk_weights is None)  # QUANT gate_up or WEIGHTED down
    assert a_scale_t.stride(1) == 1 and (not swiglu or out_scale_t.stride(1) == 1)
    a_desc, b_desc, b2_desc = descriptors(a, b, b2, block_n=128)
    num_tiles = block_expert.numel() * -(-N // (128 if swiglu else 256))
    _wide_gemm_kernel[(max(1, min(num_tiles, sm_count(a.device))),)](
        a_desc, a_scale_t, b_desc, b2_desc, b_scale, b_scale if b2_scale is None else b2_scale, out,
        out_scale_t if swiglu else a_scale_t, block_expert, rows, a_scale_t if swiglu else topk_weights,
        N, K, block_expert.numel(), num_pairs, num_tiles,
        a_scale_t.stride(0), b_scale.stride(0), b_scale.stride(1), b_scale.stride(2), out.stride(0),
        out_scale_t.stride(0) if swiglu else 0,
        SWIGLU=swiglu, STAGES=num_stages, GROUP_M=group_m, SKIP=skip, CONSUMER_REGS=consumer_regs,
        PRODUCER_REGS=producer_regs, num_warps=4,
    )
    return out

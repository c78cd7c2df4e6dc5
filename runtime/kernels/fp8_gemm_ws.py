"""Grouped block-FP8 GEMM, DeepGEMM-style, in Gluon for Hopper: two consumer warpgroups, fed by TMA,
that promote each 128-K step to fp32 without waiting for each other.

    C[m, n] = sum_kb (A_q[m, kb] @ B_q[e(m), n, kb]^T) * a_scale[kb, m] * b_scale[e(m), n // 128, kb]
A's rows are sorted by expert, each expert's run padded to 128 (moe_tma.py gathers them), so every
operand tile is a plain TMA box: A [P, K] at (m, k) in two 64-row halves, B [E * N, K] at
(expert * N + n, k). `gl.warp_specialize` runs two partitions of 4 warps, consumer 0 and 1 (rows
64c..64c+63 of the tile), synchronized only through per-stage mbarriers (no CTA-wide barrier in the
K loop): per K step each waits for `ready`, runs the wgmma chain into an fp32 temporary, waits for
it, releases the stage (`empty`, count 2), and scales and adds the temporary to its fp32
accumulator (the per-128-K promotion: chained FP8 accumulation inside the tensor core measured 4x
the error, NOTES_ffn.md run 3). Consumer 0 also issues the TMA loads, STAGES - 1 steps ahead, each
once both consumers released that stage. So one consumer's promotion can run while the other's
wgmma keeps the tensor cores busy: the overlap that the pointer-based kernel (fp8_gemm.py: every
warp meets at one barrier per K step) cannot give, and that Triton 3.6's automatic warp
specialization of fp8_gemm_tma.py's loop was meant to give but did not finish on the H200.
A separate producer warp would make 3 warpgroups (ptxas then caps every thread at 168 registers).
Modes:
  SWIGLU   gate and up, 64 columns each (two descriptors): two 64x64 fp32 accumulators per consumer;
           C = silu(gate) * up in fp32 [P, N] (64 columns cannot quantize per 1x128 group:
           moe_tma.py runs act_quant after it). Gate and up at 128 columns each need 2 x 64 + the
           temporaries: ptxas kept two 64-register temporaries and spilled 540 B.
  WEIGHTED the down projection, 128 columns: row m is pair rows[m] (padding: >= num_pairs,
           dropped); stores w[pair] * row at C[pair].
ptxas (sm_90a, Triton 3.6): 255 registers, no spills in either mode, 131-197 KB of shared memory.
Written against Triton 3.6's Gluon API (moe_tma.ws_gemm_usable checks the version). Traffic:
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
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

BLOCK_M, HALF_M = gl.constexpr(128), gl.constexpr(64)


@gluon.jit
def _tile(block_expert_ptr, N, K, num_m, BLOCK_N: gl.constexpr, GROUP_M: gl.constexpr):
    """(first A row, first B row, n tile, expert, K steps) of this program; K steps 0 past the end."""
    pid = gl.program_id(0)
    in_group = GROUP_M * (N // BLOCK_N)
    first_m = (pid // in_group) * GROUP_M
    group_size = gl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % group_size
    pid_n = (pid % in_group) // group_size
    expert = gl.load(block_expert_ptr + pid_m)
    k_tiles = gl.where(expert < 0, 0, K // 128)
    expert = gl.maximum(expert, 0)
    return pid_m * 128, expert * N + pid_n * BLOCK_N, pid_n, expert, k_tiles


@gluon.jit
def _load(step, a_desc, b_desc, b2_desc, a_smem, b_smem, b2_smem, ready, empty, off_m, off_b,
          SWIGLU: gl.constexpr, STAGES: gl.constexpr, BLOCK_N: gl.constexpr):
    """Issue K step `step`'s TMA loads once both consumers released its stage (`empty`, count 2)."""
    s = step % STAGES
    mbarrier.wait(empty.index(s), ((step // STAGES) & 1) ^ 1)  # the first round passes at once
    bar = ready.index(s)
    mbarrier.expect(bar, (BLOCK_M + BLOCK_N * (2 if SWIGLU else 1)) * 128)
    tma.async_copy_global_to_shared(a_desc, [off_m, step * 128], bar, a_smem.index(2 * s))
    tma.async_copy_global_to_shared(a_desc, [off_m + HALF_M, step * 128], bar, a_smem.index(2 * s + 1))
    tma.async_copy_global_to_shared(b_desc, [off_b, step * 128], bar, b_smem.index(s))
    if SWIGLU:
        tma.async_copy_global_to_shared(b2_desc, [off_b, step * 128], bar, b2_smem.index(s))


@gluon.jit
def _promote(acc, a_smem, b_smem, a_s, b_scale_ptr, zero):
    """acc + (A B^T on the tensor cores, waited for) * a_s[:, None] * b_scale."""
    t = warpgroup_mma(a_smem, b_smem.permute((1, 0)), zero, use_acc=False, is_async=True)
    t = warpgroup_mma_wait(0, deps=[t])
    return acc + t * (a_s * gl.load(b_scale_ptr))[:, None]


@gluon.jit
def _consumer(half, a_desc, b_desc, b2_desc, a_smem, b_smem, b2_smem, ready, empty, as_ptr, bs_ptr, b2s_ptr,
              c_ptr, block_expert_ptr, rows_ptr, topk_w_ptr, N, K, num_m, num_pairs, stride_asg, stride_bse,
              stride_bsn, stride_bsk, stride_cm,
              SWIGLU: gl.constexpr, WEIGHTED: gl.constexpr, STAGES: gl.constexpr, GROUP_M: gl.constexpr,
              BLOCK_N: gl.constexpr, LOADER: gl.constexpr):
    layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                     instr_shape=[16, BLOCK_N, 32])
    off_m, off_b, pid_n, expert, k_tiles = _tile(block_expert_ptr, N, K, num_m, BLOCK_N, GROUP_M)
    offs_m = off_m + half * HALF_M + gl.arange(0, HALF_M, layout=gl.SliceLayout(1, layout))
    bs = bs_ptr + expert.to(gl.int64) * stride_bse + (pid_n * BLOCK_N // 128) * stride_bsn
    b2s = b2s_ptr + expert.to(gl.int64) * stride_bse + (pid_n * BLOCK_N // 128) * stride_bsn
    zero = gl.zeros([HALF_M, BLOCK_N], gl.float32, layout)
    acc = gl.zeros([HALF_M, BLOCK_N], gl.float32, layout)
    acc2 = gl.zeros([HALF_M, BLOCK_N], gl.float32, layout)
    if LOADER:
        for step in gl.static_range(STAGES - 1):
            if step < k_tiles:
                _load(step, a_desc, b_desc, b2_desc, a_smem, b_smem, b2_smem, ready, empty, off_m, off_b,
                      SWIGLU, STAGES, BLOCK_N)
    for kb in range(k_tiles):
        s = kb % STAGES
        mbarrier.wait(ready.index(s), (kb // STAGES) & 1)
        a_s = gl.load(as_ptr + kb * stride_asg + offs_m)
        a = a_smem.index(2 * s + half)
        acc = _promote(acc, a, b_smem.index(s), a_s, bs + kb * stride_bsk, zero)
        if SWIGLU:
            acc2 = _promote(acc2, a, b2_smem.index(s), a_s, b2s + kb * stride_bsk, zero)
        mbarrier.arrive(empty.index(s), count=1)
        if LOADER and kb + STAGES - 1 < k_tiles:  # the stage of step kb - 1, once both are past it
            _load(kb + STAGES - 1, a_desc, b_desc, b2_desc, a_smem, b_smem, b2_smem, ready, empty, off_m,
                  off_b, SWIGLU, STAGES, BLOCK_N)
    offs_n = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, layout))
    if SWIGLU:  # h = silu(gate) * up, every row (unused blocks: zeros, so act_quant sees finite rows)
        h = acc / (1.0 + gl.exp(-acc)) * acc2
        c_ptrs = c_ptr + offs_m.to(gl.int64)[:, None] * stride_cm + offs_n[None, :]
        gl.store(c_ptrs, h.to(c_ptr.dtype.element_ty))
    if WEIGHTED:
        pair = gl.load(rows_ptr + offs_m)
        row_ok = pair < num_pairs
        acc = acc * gl.load(topk_w_ptr + pair, mask=row_ok, other=0.0)[:, None]
        c_ptrs = c_ptr + pair.to(gl.int64)[:, None] * stride_cm + offs_n[None, :]
        gl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=row_ok[:, None])


@gluon.jit
def _ws_gemm_kernel(a_desc, as_ptr, b_desc, b2_desc, bs_ptr, b2s_ptr, c_ptr, block_expert_ptr, rows_ptr,
                    topk_w_ptr, N, K, num_m, num_pairs, stride_asg, stride_bse, stride_bsn, stride_bsk,
                    stride_cm,
                    SWIGLU: gl.constexpr, WEIGHTED: gl.constexpr, STAGES: gl.constexpr, GROUP_M: gl.constexpr,
                    BLOCK_N: gl.constexpr, CONSUMER_REGS: gl.constexpr):
    a_smem = gl.allocate_shared_memory(a_desc.dtype, [2 * STAGES, HALF_M, 128], a_desc.layout)
    b_smem = gl.allocate_shared_memory(b_desc.dtype, [STAGES, BLOCK_N, 128], b_desc.layout)
    b2_smem = gl.allocate_shared_memory(b_desc.dtype, [STAGES if SWIGLU else 1, BLOCK_N, 128], b_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=2)  # one arrive per consumer warpgroup
    fence_async_shared()
    # the argument tuples are spelled out: a tuple built by concatenation turns constexprs into tensors
    gl.warp_specialize([
        (_consumer, (0, a_desc, b_desc, b2_desc, a_smem, b_smem, b2_smem, ready, empty, as_ptr, bs_ptr,
                     b2s_ptr, c_ptr, block_expert_ptr, rows_ptr, topk_w_ptr, N, K, num_m, num_pairs,
                     stride_asg, stride_bse, stride_bsn, stride_bsk, stride_cm, SWIGLU, WEIGHTED, STAGES,
                     GROUP_M, BLOCK_N, True)),
        (_consumer, (1, a_desc, b_desc, b2_desc, a_smem, b_smem, b2_smem, ready, empty, as_ptr, bs_ptr,
                     b2s_ptr, c_ptr, block_expert_ptr, rows_ptr, topk_w_ptr, N, K, num_m, num_pairs,
                     stride_asg, stride_bse, stride_bsn, stride_bsk, stride_cm, SWIGLU, WEIGHTED, STAGES,
                     GROUP_M, BLOCK_N, False)),
    ], [4], [CONSUMER_REGS])


def ws_grouped_gemm(a: torch.Tensor, a_scale_t: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                    out: torch.Tensor, block_expert: torch.Tensor, *, b2: torch.Tensor | None = None,
                    b2_scale: torch.Tensor | None = None, rows: torch.Tensor | None = None,
                    topk_weights: torch.Tensor | None = None, num_pairs: int = 0, group_m: int = 8,
                    num_stages: int = 4, consumer_regs: int = 240) -> torch.Tensor:
    """Launch `_ws_gemm_kernel` into `out` (Hopper only; shapes are the caller's, moe_tma.py, to check).

    a [P, K] FP8 (P = 128 * len(block_expert)); a_scale_t [K/128, P] fp32, contiguous in P; b, b2
    [E, N, K] FP8 with scales [E, N/128, K/128]. With b2: out [P, N] = silu(a b^T) * (a b2^T) (fp32,
    64-column tiles); with rows and topk_weights: out [num_pairs, N] (the weighted scatter).
    """
    E, N, K = b.shape
    block_n = 64 if b2 is not None else 128  # SwiGLU: 2 x 64 fp32 accumulators + temporaries
    assert N % 128 == 0 and K % 128 == 0 and a.shape[0] == 128 * block_expert.numel()
    assert a_scale_t.stride(1) == 1
    fp8 = gl.float8e4nv
    desc = lambda t, rows: TensorDescriptor.from_tensor(  # noqa: E731 - four descriptors, one recipe
        t, [rows, 128], gl.NVMMASharedLayout.get_default_for([rows, 128], fp8))
    a_desc, b_desc = desc(a, 64), desc(b.view(E * N, K), block_n)  # host block shapes: plain ints
    b2_desc = b_desc if b2 is None else desc(b2.view(E * N, K), block_n)
    nil = block_expert  # stands in for the pointers a mode does not use
    grid = (block_expert.numel() * (N // block_n),)
    _ws_gemm_kernel[grid](
        a_desc, a_scale_t, b_desc, b2_desc, b_scale, b_scale if b2_scale is None else b2_scale, out,
        block_expert, nil if rows is None else rows, nil if topk_weights is None else topk_weights,
        N, K, block_expert.numel(), num_pairs, a_scale_t.stride(0),
        b_scale.stride(0), b_scale.stride(1), b_scale.stride(2), out.stride(0),
        SWIGLU=b2 is not None, WEIGHTED=topk_weights is not None, STAGES=num_stages, GROUP_M=group_m,
        BLOCK_N=block_n, CONSUMER_REGS=consumer_regs, num_warps=4,
    )
    return out

"""Grouped block-FP8 GEMM over expert-contiguous rows, both operands loaded by TMA (portable Triton).

    C[m, n] = sum_kb (A_q[m, kb] @ B_q[e(m), n, kb]^T) * a_scale[kb, m] * b_scale[e(m), n // 128, kb]
The DeepGEMM layout: A's rows are already sorted by expert and each expert's run padded to BLOCK_M
(moe_tma.py gathers them), so both operands are plain 2-D tiles that the copy engine (TMA) fetches
into shared memory: A [P, K] at (m-block, k), B [E * N, K] at (expert * N + n-tile, k). BLOCK_K is
128, one scale group per K step; each step's FP8 product is finished in an fp32 temporary, scaled,
and added to the fp32 accumulator (the per-128-K promotion; chaining inside the tensor core was 4x
less accurate, NOTES_ffn.md run 3).

The portable version of fp8_gemm_ws.py's Hopper kernel (same layout, same arithmetic): it runs
under the CPU interpreter and on any GPU with TMA, as one software-pipelined loop in which every warp
meets at each K step. Triton 3.6's automatic warp specialization of this loop
(`tl.range(..., warp_specialize=True)`, num_warps=4: a TMA producer and two 64-row consumer
warpgroups) compiled without spills for sm_90a but its first GPU test did not finish in 110 s on the
H200 (NOTES_ffn.md run 6), so it is not used; the Gluon kernel spells the same roles out by hand.

Modes (constexpr):
  SWIGLU    a second weight (up) through its own descriptor: two dots per K step (gate, up; 64 columns
            each at BLOCK_N 64, so both fp32 accumulators and the temporary fit a consumer's
            registers) and C = silu(gate) * up in the epilogue (fp32: a 64-column tile cannot
            quantize per 1x128 group; moe_tma.py runs act_quant after it).
  WEIGHTED  row m is pair rows[m] (padding: rows[m] >= num_pairs, dropped): C[pair] = w[pair] * row.
Traffic: GROUP_M M-blocks sweep the N tiles together, so an expert's weight tile is read from HBM
about once per launch and A tiles are reused from L2.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor


@triton.jit
def _tma_gemm_kernel(
    a_desc, as_ptr, b_desc, b2_desc, bs_ptr, b2s_ptr, c_ptr, block_expert_ptr, rows_ptr, topk_w_ptr,
    N, K, num_m, num_pairs, stride_asg, stride_bse, stride_bsn, stride_bsk, stride_cm,
    SWIGLU: tl.constexpr, WEIGHTED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    in_group = GROUP_M * (N // BLOCK_N)
    first_m = (pid // in_group) * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % group_size
    pid_n = (pid % in_group) // group_size
    expert = tl.load(block_expert_ptr + pid_m)
    # M-blocks past the last expert (-1) run no K step (as in fp8_gemm_ws.py, no early return)
    k_tiles = tl.where(expert < 0, 0, K // 128)
    expert = tl.maximum(expert, 0)
    off_m = pid_m * BLOCK_M
    off_b = expert * N + pid_n * BLOCK_N
    offs_m = off_m + tl.arange(0, BLOCK_M)
    bs_off = expert.to(tl.int64) * stride_bse + (pid_n * BLOCK_N // 128) * stride_bsn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, k_tiles):
        a = a_desc.load([off_m, kb * 128])
        a_s = tl.load(as_ptr + kb * stride_asg + offs_m)[:, None]
        b = b_desc.load([off_b, kb * 128])
        acc += tl.dot(a, b.T) * (a_s * tl.load(bs_ptr + bs_off + kb * stride_bsk))
        if SWIGLU:
            b2 = b2_desc.load([off_b, kb * 128])
            acc2 += tl.dot(a, b2.T) * (a_s * tl.load(b2s_ptr + bs_off + kb * stride_bsk))
    # unused M-blocks store zeros (SWIGLU: h stays finite for act_quant) or nothing (WEIGHTED: their
    # rows are all padding)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if SWIGLU:
        acc = acc * tl.sigmoid(acc) * acc2
    if WEIGHTED:
        pair = tl.load(rows_ptr + offs_m)
        row_ok = pair < num_pairs
        acc = acc * tl.load(topk_w_ptr + pair, mask=row_ok, other=0.0)[:, None]
        c_ptrs = c_ptr + pair.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=row_ok[:, None])
    else:
        c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty))


def tma_gemm_usable(n: int, k: int) -> bool:
    """The TMA kernel takes whole 128 tiles only (the MoE falls back to fp8_gemm.py otherwise)."""
    return n % 128 == 0 and k % 128 == 0


def tma_grouped_gemm(a: torch.Tensor, a_scale_t: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                     out: torch.Tensor, block_expert: torch.Tensor, *, b2: torch.Tensor | None = None,
                     b2_scale: torch.Tensor | None = None, rows: torch.Tensor | None = None,
                     topk_weights: torch.Tensor | None = None, num_pairs: int = 0, block_m: int = 128,
                     block_n: int = 128, group_m: int = 8, num_warps: int = 8,
                     num_stages: int = 3) -> torch.Tensor:
    """Launch `_tma_gemm_kernel` into `out`; shapes are the caller's (moe_tma.py) to check.

    a [P, K] FP8 (P = block_m * len(block_expert)); a_scale_t [K/128, P] fp32, contiguous in P;
    b, b2 [E, N, K] FP8 with scales [E, N/128, K/128]; out [P, N] (b2 given: silu(a b^T) * (a b2^T))
    or [num_pairs, N] (rows and topk_weights given: the weighted scatter).
    """
    E, N, K = b.shape
    P = a.shape[0]
    block_n = 64 if b2 is not None else block_n  # SwiGLU: 2 x 64 fp32 accumulators, as fp8_gemm_ws.py
    assert tma_gemm_usable(N, K) and 128 % block_n == 0 and block_m * block_expert.numel() == P
    assert a_scale_t.stride(1) == 1 and (b2 is None or b2.shape == b.shape)
    a_desc = TensorDescriptor.from_tensor(a, [block_m, 128])
    b_desc = TensorDescriptor.from_tensor(b.view(E * N, K), [block_n, 128])
    b2_desc = b_desc if b2 is None else TensorDescriptor.from_tensor(b2.view(E * N, K), [block_n, 128])
    nil = block_expert  # stands in for the pointers a mode does not use
    grid = (block_expert.numel() * (N // block_n),)
    _tma_gemm_kernel[grid](
        a_desc, a_scale_t, b_desc, b2_desc, b_scale, b_scale if b2_scale is None else b2_scale, out,
        block_expert, nil if rows is None else rows, nil if topk_weights is None else topk_weights,
        N, K, block_expert.numel(), num_pairs, a_scale_t.stride(0),
        b_scale.stride(0), b_scale.stride(1), b_scale.stride(2), out.stride(0),
        SWIGLU=b2 is not None, WEIGHTED=topk_weights is not None, BLOCK_M=block_m, BLOCK_N=block_n,
        GROUP_M=group_m, num_warps=num_warps, num_stages=num_stages,
    )
    return out

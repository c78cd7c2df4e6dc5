"""Block-FP8 GEMM in Triton, dense or grouped by expert: the one matmul kernel of the FFN.

    C[m, n] = sum_kb (A_q[m, kb] @ B_q[e, n, kb]^T) * a_scale[m, kb] * b_scale[e, n // 128, kb]
with A quantized per 1x128 group (act_quant.py) and B per 128x128 block (quant/fp8.py). BLOCK_K is
128, so every K step is one scale group: its FP8 tensor-core product is scaled and added to an fp32
accumulator; the weight scale of a tile's columns is one scalar per K step (a [BLOCK_N] vector for
tiles wider than a 128-block). With scale pointers absent (HAS_SCALES False) the same kernel
multiplies BF16/FP32 operands.

Grouped mode (the MoE) follows vLLM's fused_moe: `rows` lists the (token, slot) pairs sorted by
expert, each expert's run padded to BLOCK_M with the sentinel `num_pairs`; `block_expert[i]` names
the expert of M-block i (-1: past the end, the program exits). Options, fused into one launch:
  GATHER_A   A row of pair p is token p // TOPK (the MoE input); else A row = sorted position.
  SWIGLU     a second weight (up) in the same program: out = silu(A B^T) * (A B2^T).
  QUANT_OUT  quantize the output per 1x128 group in the epilogue (BLOCK_N == 128) -> FP8 + scale.
  WEIGHTED   multiply row p by topk_weights[p] and store it at row p of C ([T*TOPK, N]).
  INTERLEAVE with SWIGLU: gate and up as one dot over interleaved columns (one wgmma chain per step).
  EVEN       K and N divide the tiles: no masks in the K loop (set by the launcher).
Compiled for sm_90 (Triton 3.6 and 3.9, ptxas -v): wgmma with E4M3 operands, 16-byte cp.async
pipelined num_stages - 1 deep; registers and spills per tile in benchmarks/NOTES_ffn.md (run 5).
Traffic per launch: programs run in groups of GROUP_M M-blocks sweeping the N tiles together
(Triton's grouped ordering), so a weight tile comes from HBM about once per group of M-blocks that
need it (once per expert when an expert has <= GROUP_M blocks), and A rows are reused from L2.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from runtime.kernels.act_quant import quantize_rows


@triton.jit
def _load(ptrs, mask, UNMASKED: tl.constexpr):
    """tl.load, masked (zero fill) unless UNMASKED: the EVEN K loop's loads carry no predicates."""
    return tl.load(ptrs) if UNMASKED else tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def _fp8_gemm_kernel(
    a_ptr, as_ptr, b_ptr, bs_ptr, b2_ptr, b2s_ptr, c_ptr, cs_ptr, rows_ptr, block_expert_ptr, topk_w_ptr,
    M, N, K, num_pairs,
    stride_am, stride_ak, stride_asm, stride_ask,
    stride_be, stride_bn, stride_bk, stride_bse, stride_bsn, stride_bsk,
    stride_cm, stride_cn, stride_csm, stride_csn,
    TOPK: tl.constexpr, GROUPED: tl.constexpr, GATHER_A: tl.constexpr, HAS_SCALES: tl.constexpr,
    SWIGLU: tl.constexpr, QUANT_OUT: tl.constexpr, WEIGHTED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN: tl.constexpr, INTERLEAVE: tl.constexpr,
):
    # GROUP_M M-blocks sweep the N tiles together: their weight tiles (one expert's) and their A rows
    # both stay in L2 while in use.
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    in_group = GROUP_M * tl.cdiv(N, BLOCK_N)
    first_m = (pid // in_group) * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % group_size
    pid_n = (pid % in_group) // group_size
    pos = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # sorted positions (grouped) or rows (dense)
    if GROUPED:
        expert = tl.load(block_expert_ptr + pid_m)
        if expert < 0:
            return
        pair = tl.load(rows_ptr + pos)
        row_ok = pair < num_pairs
        a_row = pair // TOPK if GATHER_A else pos
        b_base = expert.to(tl.int64) * stride_be
        bs_base = expert.to(tl.int64) * stride_bse
    else:
        pair = pos
        row_ok = pos < M
        a_row = pos
        b_base = 0
        bs_base = 0
    a_row = tl.where(row_ok, a_row, 0).to(tl.int64)  # padding rows read row 0: in bounds, never stored
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + a_row[:, None] * stride_am + offs_k[None, :] * stride_ak
    as_ptrs = as_ptr + a_row * stride_asm
    if INTERLEAVE:
        # SwiGLU as ONE dot on a [BLOCK_K, 2 BLOCK_N] weight tile: column 2j is gate row n_j, 2j + 1 up
        # row n_j (each a K-contiguous 128-byte run, as before). One wgmma chain per K step instead of
        # two with a wait between; the accumulator's column pairs sit in one thread, so the split
        # after the loop moves no data.
        cols = tl.arange(0, 2 * BLOCK_N)
        w_n = pid_n * BLOCK_N + cols // 2
        is_up = (cols % 2 == 1)[None, :]
        w_off = b_base + w_n[None, :] * stride_bn + offs_k[:, None] * stride_bk
        b_ptrs = tl.where(is_up, b2_ptr + w_off, b_ptr + w_off)
        w_ok = (w_n < N)[None, :]
    else:
        w_off = b_base + offs_n[None, :] * stride_bn + offs_k[:, None] * stride_bk
        b_ptrs = b_ptr + w_off
        w_ok = n_ok[None, :]
    b2_ptrs = b2_ptr + w_off  # the up tile (SWIGLU without INTERLEAVE)
    # weight scales: a tile inside one 128-row block (BLOCK_N <= 128) needs one scalar per K step, not a
    # [BLOCK_N] vector (fewer registers: the 64x256 SwiGLU tile at 4 warps spilled 776 B without this)
    if BLOCK_N <= 128:
        bs_off = bs_base + (pid_n * BLOCK_N // 128) * stride_bsn
    else:
        bs_off = bs_base + (offs_n[None, :] // 128) * stride_bsn  # [1, BLOCK_N]
    # Each K step's FP8 product is finished in its own fp32 tile, scaled, then added: Hopper's FP8 MMA
    # accumulates with reduced precision, so chaining all K steps inside tl.dot (in-place rescaling)
    # measured 4x the error (1.6e-2 vs 4e-3 at K = 7168) and was slower (benchmarks/NOTES_ffn.md).
    # EVEN (K % BLOCK_K == 0 and N % BLOCK_N == 0, the model's shapes): no masks in the K loop, so the
    # loads become plain 16-byte cp.async (no zero-fill predicates).
    acc = tl.zeros((BLOCK_M, 2 * BLOCK_N if INTERLEAVE else BLOCK_N), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        k_ok = offs_k < K - kb * BLOCK_K
        a = _load(a_ptrs, k_ok[None, :], EVEN)
        b = _load(b_ptrs, k_ok[:, None] & w_ok, EVEN)
        if HAS_SCALES:
            a_s = tl.load(as_ptrs + kb * stride_ask)[:, None]
            b_s = _load(bs_ptr + bs_off + kb * stride_bsk, n_ok[None, :], BLOCK_N <= 128)
            if INTERLEAVE:
                b_s = tl.where(is_up, tl.load(b2s_ptr + bs_off + kb * stride_bsk), b_s)
            acc += tl.dot(a, b, out_dtype=tl.float32) * (a_s * b_s)
        else:
            acc = tl.dot(a, b, acc)
        if SWIGLU and not INTERLEAVE:
            b2 = _load(b2_ptrs, k_ok[:, None] & w_ok, EVEN)
            if HAS_SCALES:
                b2_s = _load(b2s_ptr + bs_off + kb * stride_bsk, n_ok[None, :], BLOCK_N <= 128)
                acc2 += tl.dot(a, b2, out_dtype=tl.float32) * (a_s * b2_s)
            else:
                acc2 = tl.dot(a, b2, acc2)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
        b2_ptrs += BLOCK_K * stride_bk

    if INTERLEAVE:
        acc, acc2 = tl.split(tl.reshape(acc, (BLOCK_M, BLOCK_N, 2)))  # (gate, up)
    if SWIGLU:
        acc = acc * tl.sigmoid(acc) * acc2  # silu(gate) * up
    if WEIGHTED:
        acc = acc * tl.load(topk_w_ptr + pair, mask=row_ok, other=0.0)[:, None]
    c_row = (pair if WEIGHTED else pos).to(tl.int64)
    out_ok = row_ok[:, None] & n_ok[None, :]
    if QUANT_OUT:
        acc, s = quantize_rows(acc, n_ok[None, :])
        tl.store(cs_ptr + c_row * stride_csm + pid_n * stride_csn, s, mask=row_ok)
    c_ptrs = c_ptr + c_row[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=out_ok)


def fp8_gemm(a: torch.Tensor, a_scale: torch.Tensor | None, b: torch.Tensor, b_scale: torch.Tensor | None,
             out: torch.Tensor, *, b2: torch.Tensor | None = None, b2_scale: torch.Tensor | None = None,
             out_scale: torch.Tensor | None = None, rows: torch.Tensor | None = None,
             block_expert: torch.Tensor | None = None, topk_weights: torch.Tensor | None = None,
             num_pairs: int = 0, top_k: int = 1, gather_a: bool = False,
             block_m: int = 64, block_n: int = 128, group_m: int = 8, num_warps: int = 4,
             num_stages: int = 3, interleave: bool = False) -> torch.Tensor:
    """Launch `_fp8_gemm_kernel` into `out`. Shapes are checked by the callers (fp8_linear, moe, mlp).

    a [M or T, K]; b, b2 [N, K] or [E, N, K]; scales as their docstring above; grouped when `rows`
    is given (then M = len(rows), a multiple of block_m). `interleave` (with b2, block_n <= 128): gate
    and up as one dot over interleaved columns (the kernel's INTERLEAVE). Returns `out`.
    """
    grouped = rows is not None
    b3 = b if b.dim() == 3 else b.unsqueeze(0)
    K, N = a.shape[1], b3.shape[1]
    M = rows.numel() if grouped else a.shape[0]
    assert (128 % block_n == 0 or block_n % 128 == 0) and (out_scale is None or block_n == 128)
    assert b.shape[-1] == K and out.shape[1] == N and (not interleave or (b2 is not None and block_n <= 128))
    if M == 0:
        return out
    nil = torch.empty(1, 1, 1, dtype=torch.float32, device=a.device)  # stands in for absent operands
    has_scales = a_scale is not None
    a_s = a_scale if has_scales else nil[0]
    b_s = nil if b_scale is None else (b_scale if b_scale.dim() == 3 else b_scale.unsqueeze(0))
    b2s = nil if b2_scale is None else (b2_scale if b2_scale.dim() == 3 else b2_scale.unsqueeze(0))
    b2_ = b3 if b2 is None else (b2 if b2.dim() == 3 else b2.unsqueeze(0))
    c_s = nil[0] if out_scale is None else out_scale
    # software pipelining depth: as many stages as fit in ~200 KB of shared memory (H100/H200: 227 KB)
    per_stage = 128 * (block_m * a.element_size() + block_n * b3.element_size() * (1 if b2 is None else 2))
    num_stages = max(1, min(num_stages, (200 << 10) // per_stage))
    grid = (triton.cdiv(M, block_m) * triton.cdiv(N, block_n),)
    _fp8_gemm_kernel[grid](
        a, a_s, b3, b_s, b2_, b2s, out, c_s,
        rows if grouped else nil, block_expert if grouped else nil,
        nil if topk_weights is None else topk_weights,
        M, N, K, num_pairs,
        a.stride(0), a.stride(1), a_s.stride(0), a_s.stride(1),
        b3.stride(0), b3.stride(1), b3.stride(2), b_s.stride(0), b_s.stride(1), b_s.stride(2),
        out.stride(0), out.stride(1), c_s.stride(0), c_s.stride(1),
        TOPK=top_k, GROUPED=grouped, GATHER_A=gather_a, HAS_SCALES=has_scales,
        SWIGLU=b2 is not None, QUANT_OUT=out_scale is not None, WEIGHTED=topk_weights is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=128, GROUP_M=group_m,
        EVEN=K % 128 == 0 and N % block_n == 0, INTERLEAVE=interleave, num_warps=num_warps,
        num_stages=num_stages,
    )
    return out


def fp8_gemm_ref(a_q: torch.Tensor, a_scale: torch.Tensor, b_q: torch.Tensor,
                 b_scale: torch.Tensor) -> torch.Tensor:
    """fp32 torch reference of the dense case: dequantize both operands and multiply."""
    from quant.fp8 import dequantize_fp8
    from runtime.kernels.act_quant import Fp8Act, act_dequant

    return act_dequant(Fp8Act(a_q, a_scale)) @ dequantize_fp8(b_q, b_scale).t()

"""Routed experts over expert-contiguous rows: DeepGEMM's layout, both GEMM operands loaded by TMA.

    A[p]  = x_q[rows[p] // k]                   gather: pairs sorted by expert, runs padded to 128
    h     = silu(A G_e^T) * (A U_e^T)           fp32, in registers
    h_q   = 1x128 quantization of h             FP8 [P, I] + scales (the format's requantization)
    y[t] += w[t, j] * (h_q D_e^T)[p]            the down GEMM scatters row p to pair rows[p] = t*k + j
The GEMMs: fp8_gemm_ws.py (Gluon, two warp-specialized consumer warpgroups) on Hopper with GLUON_TRITONS
when the config asks for warp specialization, else fp8_gemm_tma.py (portable Triton, also the CPU
interpreter's). With config.fuse_quant the Gluon gate_up quantizes h in its epilogue; otherwise (and
in the portable kernel, whose 64-column tiles cannot see a whole 1x128 group) h goes through memory
in fp32 and act_quant: at 8192 tokens ~1.1 GB more traffic and one more launch (act_quant of h: 0.19 ms
on the H200, NOTES_ffn.md run 7). fp32, not BF16: a BF16 h flips some FP8 roundings. No host synchronization
(align_by_expert sizes everything for the worst case). Traffic beyond fused_moe's gathering kernel:
the gathered A ([P, H] FP8, written once, read by TMA).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from quant.fp8 import FP8_DTYPE
from runtime.kernels.act_quant import Fp8Act, act_quant
from runtime.kernels.fp8_gemm_tma import tma_gemm_usable, tma_grouped_gemm
from runtime.kernels.fp8_linear import cuda_capability, gluon_usable
from runtime.kernels.moe_routing import align_by_expert, pair_buffer


def tma_moe_usable(experts) -> bool:
    """FP8 experts whose widths are whole 128 tiles (TMA boxes, the kernel's unmasked K loop), on a GPU
    with TMA (Hopper and later) or under the CPU interpreter; elsewhere fused_moe's gathering kernel."""
    inter, hidden = experts.gate.shape[1], experts.gate.shape[2]
    device = experts.gate.device
    tma = device.type != "cuda" or cuda_capability(device) >= (9, 0)
    return tma and experts.fp8 and tma_gemm_usable(inter, hidden) and tma_gemm_usable(hidden, inter)


def gather_rows(x: Fp8Act, rows: torch.Tensor, top_k: int,
                kernel: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A [P, H] FP8 and its scales [H/128, P] (contiguous in P): token rows[p] // k. Padding rows (the
    sentinel T * k) are not defined: every GEMM output row depends on its own A row only, and no padding
    row is stored. kernel: one Triton launch (default: on a GPU), which skips them (P is the worst case:
    at 4096 tokens 21,504 rows for 12,288 pairs); torch's where + two index_selects elsewhere (token 0)."""
    pairs = x.q.shape[0] * top_k
    if not (rows.is_cuda if kernel is None else kernel):
        tok = torch.where(rows < pairs, rows // top_k, 0)
        a = x.q.view(torch.uint8).index_select(0, tok).view(FP8_DTYPE)
        return a, x.scale_inv.t().index_select(1, tok)
    (T, H), groups, P = x.q.shape, x.scale_inv.shape[1], rows.numel()
    assert x.q.stride(1) == 1
    a = torch.empty((P, H), dtype=FP8_DTYPE, device=rows.device)
    a_scale_t = torch.empty((groups, P), dtype=torch.float32, device=rows.device)
    if P and T:
        _gather_kernel[(triton.cdiv(P, GATHER_ROWS), triton.cdiv(H, GATHER_COLS))](
            x.q.view(torch.uint8), x.scale_inv, rows, a.view(torch.uint8), a_scale_t, pairs, top_k, P, H,
            groups, x.q.stride(0), x.scale_inv.stride(0), x.scale_inv.stride(1), ROWS=GATHER_ROWS,
            COLS=GATHER_COLS, GROUPS=triton.next_power_of_2(groups))
    return a, a_scale_t


GATHER_ROWS, GATHER_COLS = 16, 1024  # a program's block of A: 16 KB, 32 bytes a thread at 4 warps


@triton.jit
def _gather_kernel(q_ptr, s_ptr, rows_ptr, a_ptr, as_ptr, num_pairs, top_k, P, H, groups, stride_q, stride_st,
                   stride_sg, ROWS: tl.constexpr, COLS: tl.constexpr, GROUPS: tl.constexpr):
    p = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    pair = tl.load(rows_ptr + p, mask=p < P, other=num_pairs)
    real = pair < num_pairs  # padding rows are neither read nor written
    tok = tl.where(real, pair // top_k, 0).to(tl.int64)
    cols = tl.program_id(1) * COLS + tl.arange(0, COLS)
    mask = real[:, None] & (cols < H)[None, :]
    row = tl.load(q_ptr + tok[:, None] * stride_q + cols[None, :], mask=mask)
    tl.store(a_ptr + p.to(tl.int64)[:, None] * H + cols[None, :], row, mask=mask)
    if tl.program_id(1) == 0:  # the row's scales, one per 128 columns, into the transposed [groups, P]
        g = tl.arange(0, GROUPS)
        smask = real[:, None] & (g < groups)[None, :]
        scale = tl.load(s_ptr + tok[:, None] * stride_st + g[None, :] * stride_sg, mask=smask)
        tl.store(as_ptr + g[None, :] * P + p[:, None], scale, mask=smask)


def portable_block_m(block_m: int) -> int:
    """The M-block of the portable Triton kernels for a config's block_m: the same, but 64 for 192 (the
    persistent Gluon kernel's three 64-row consumer parts; Triton's tiles are powers of two)."""
    return block_m if block_m & (block_m - 1) == 0 else 64


def _grouped_gemm(config, device: torch.device):
    """(the kernel of this config, whether it quantizes h itself, the rows of its M-blocks): Gluon's
    warp-specialized one on Hopper (with config.fuse_quant: h leaves the gate_up epilogue as FP8;
    config.persistent: the persistent kernel with its own producer warp, fp8_gemm_wsp.py), else the portable
    Triton one. Every kernel takes rows= and num_pairs= (the pair of each A row; the down GEMM scatters by
    it)."""
    if config.warp_specialize and gluon_usable(device):
        if config.persistent and config.fuse_quant:
            from runtime.kernels.fp8_gemm_wsp import wsp_grouped_gemm  # Gluon: imported where it runs

            tiles = dict(block_m=config.block_m, group_m=config.group_m, skip=config.skip_pad,
                         defer=config.defer)
            return (lambda *args, **kw: wsp_grouped_gemm(*args, **tiles, **kw)), True, config.block_m
        from runtime.kernels.fp8_gemm_ws import ws_grouped_gemm

        return ((lambda *args, **kw: ws_grouped_gemm(*args, group_m=config.group_m, **kw)), config.fuse_quant,
                config.block_m)
    bm = portable_block_m(config.block_m)
    return (lambda *args, **kw: tma_grouped_gemm(*args, block_m=bm, group_m=config.group_m, **kw)), False, bm


def gate_up_quant(a, a_scale_t, experts, block_expert, rows, num_pairs, config) -> Fp8Act:
    """h_q = the format's 1x128 quantization of silu(A G^T) * (A U^T): in the GEMM's epilogue, or through
    an fp32 h and act_quant. Rows of h whose A row is padding (rows >= num_pairs) are not defined."""
    gemm, fused, _ = _grouped_gemm(config, a.device)
    P, inter = a.shape[0], experts.gate.shape[1]
    up = dict(b2=experts.up, b2_scale=experts.up_scale, num_stages=config.stages_gate_up, rows=rows,
              num_pairs=num_pairs)
    if fused:
        hq = torch.empty((P, inter), dtype=FP8_DTYPE, device=a.device)
        hs = torch.empty((inter // 128, P), dtype=torch.float32, device=a.device)
        gemm(a, a_scale_t, experts.gate, experts.gate_scale, hq, block_expert, out_scale_t=hs, **up)
        return Fp8Act(hq, hs.t())
    h = torch.empty((P, inter), dtype=torch.float32, device=a.device)
    gemm(a, a_scale_t, experts.gate, experts.gate_scale, h, block_expert, **up)
    return act_quant(h)


def tma_moe_pairs(x: Fp8Act, weights: torch.Tensor, ids: torch.Tensor, experts, out_dtype: torch.dtype,
                  config) -> torch.Tensor:
    """moe.routed_pairs (same arguments, x already quantized) on the TMA kernels: [T * k, H]."""
    T, k = ids.shape
    gemm, _, bm = _grouped_gemm(config, x.q.device)
    rows, block_expert = align_by_expert(ids, experts.first, experts.num_local, bm)
    a, a_scale_t = gather_rows(x, rows, k)
    hq = gate_up_quant(a, a_scale_t, experts, block_expert, rows, T * k, config)
    partial = pair_buffer(experts, T * k, out_dtype, a.device)
    gemm(hq.q, hq.scale_inv.t(), experts.down, experts.down_scale, partial, block_expert, rows=rows,
         topk_weights=weights.reshape(-1).float(), num_pairs=T * k, num_stages=config.stages_down)
    return partial

"""MFA chunked-prefill / extend attention over the paged KV cache: Triton kernel + torch reference.

A batch of variable-length query chunks; chunk b holds the LAST q_len_b of its seq_lens[b] tokens, whose
K/V are already in the cache (write_kv first), so query i of chunk b sits at position
p = seq_lens[b] - q_len_b + i and attends causally to keys 0..p:
    out[t, h] = softmax_{j <= p}(q[t, h] . K[j] / sqrt(D)) @ V[j]
The H heads share one K/V head, so the queries of a chunk are one [q_len x H, D] matrix (row = token x
H + head) and a program takes BLOCK_M consecutive rows (BLOCK_M / H tokens) against K/V tiles of
BLOCK_N tokens: the same 4 x BLOCK_M x BLOCK_N x D FLOP per 2 x BLOCK_N x D loaded values as flash
attention. Total work is 4 x H x D x sum_b q_len_b x (prefix_b + (q_len_b + 1) / 2) FLOP: at these
intensities prefill is bound by tensor-core rate, not memory.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from runtime.kernels.kv_cache import PagedKVCache, check, dot_kind, gather_kv_ref, load_paged_rows
from runtime.kernels.mfa_decode import LOG2E


@triton.jit
def _attend_tile(q, acc, m_i, l_i, kc_ptr, vc_ptr, bt_row, n, kv_end, row_pos, qk_scale, stride_kb, stride_kt,
                 stride_vb, stride_vt, PAGE: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
                 CAUSAL: tl.constexpr, dot_ty: tl.constexpr):
    """One online-softmax step against keys [n, n + BLOCK_N); CAUSAL masks key > row position."""
    tok = n + tl.arange(0, BLOCK_N)
    valid = tok < kv_end
    k = load_paged_rows(kc_ptr, bt_row, tok, valid, stride_kb, stride_kt, PAGE, D).to(dot_ty)
    v = load_paged_rows(vc_ptr, bt_row, tok, valid, stride_vb, stride_vt, PAGE, D).to(dot_ty)
    scores = tl.dot(q, tl.trans(k)) * qk_scale  # [BLOCK_M, BLOCK_N]
    if CAUSAL:
        scores = tl.where(tok[None, :] <= row_pos[:, None], scores, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(scores - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(dot_ty), v)
    return acc, m_new, l_i


@triton.jit
def _mfa_prefill_kernel(q_ptr, kc_ptr, vc_ptr, bt_ptr, lens_ptr, cu_q_ptr, k_scale_ptr, v_scale_ptr, out_ptr,
                        sm_scale_log2, stride_qt, stride_qh, stride_kb, stride_kt, stride_vb, stride_vt,
                        stride_bt, stride_ot, stride_oh,
                        H: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, DOT: tl.constexpr):
    """Program (row block, chunk b): rows [m0, m0 + BLOCK_M) of chunk b's [q_len x H, D] queries."""
    b = tl.program_id(1)
    q_start = tl.load(cu_q_ptr + b)
    q_len = tl.load(cu_q_ptr + b + 1) - q_start
    m0 = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M  # heaviest (latest) rows first
    dot_ty: tl.constexpr = tl.float16 if DOT == 2 else (tl.bfloat16 if DOT == 1 else tl.float32)  # dot_kind
    prefix = tl.load(lens_ptr + b) - q_len
    rows = m0 + tl.arange(0, BLOCK_M)
    row_ok = rows < q_len * H
    tok = rows // H
    d = tl.arange(0, D)
    q_off = (q_start + tok).to(tl.int64) * stride_qt + (rows % H) * stride_qh
    q = tl.load(q_ptr + q_off[:, None] + d[None, :], mask=row_ok[:, None], other=0.0).to(dot_ty)
    row_pos = prefix + tok  # [BLOCK_M] absolute position of each query row
    qk_scale = sm_scale_log2 * tl.load(k_scale_ptr)
    bt_row = bt_ptr + b.to(tl.int64) * stride_bt
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    active = m0 < q_len * H  # a row block past a short chunk's end runs zero iterations, stores nothing
    full_end = tl.where(active, (prefix + m0 // H + 1) // BLOCK_N * BLOCK_N, 0)  # keys all rows see
    kv_end = tl.where(active, prefix + tl.minimum(m0 + BLOCK_M - 1, q_len * H - 1) // H + 1, 0)
    for n in range(0, full_end, BLOCK_N):
        acc, m_i, l_i = _attend_tile(q, acc, m_i, l_i, kc_ptr, vc_ptr, bt_row, n, kv_end, row_pos,
                                     qk_scale, stride_kb, stride_kt, stride_vb, stride_vt, PAGE, D,
                                     BLOCK_N, False, dot_ty)
    for n in range(full_end, kv_end, BLOCK_N):
        acc, m_i, l_i = _attend_tile(q, acc, m_i, l_i, kc_ptr, vc_ptr, bt_row, n, kv_end, row_pos,
                                     qk_scale, stride_kb, stride_kt, stride_vb, stride_vt, PAGE, D,
                                     BLOCK_N, True, dot_ty)
    l_i = tl.where(l_i > 0, l_i, 1.0)  # an inactive row block saw no keys (and stores nothing)
    o = acc * (tl.load(v_scale_ptr) / l_i)[:, None]
    o_off = (q_start + tok).to(tl.int64) * stride_ot + (rows % H) * stride_oh
    tl.store(out_ptr + o_off[:, None] + d[None, :], o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


def _check_prefill(q: torch.Tensor, cache: PagedKVCache, block_table: torch.Tensor, seq_lens: torch.Tensor,
                   cu_seqlens_q: torch.Tensor) -> None:
    check(q.dim() == 3 and q.shape[2] == cache.head_dim and q.stride(-1) == 1,
          f"mfa_prefill: q must be [tokens, heads, {cache.head_dim}] with contiguous head_dim, "
          f"got {tuple(q.shape)}")
    D = q.shape[2]
    check(D >= 16 and D & (D - 1) == 0, f"mfa_prefill: head_dim must be a power of two >= 16, got {D}")
    B = seq_lens.shape[0] if seq_lens.dim() == 1 else -1
    check(seq_lens.dtype == torch.int32 and B >= 1, f"mfa_prefill: seq_lens must be int32 [batch], got "
                                                    f"{seq_lens.dtype} {tuple(seq_lens.shape)}")
    check(cu_seqlens_q.shape == (B + 1,) and cu_seqlens_q.dtype == torch.int32,
          f"mfa_prefill: cu_seqlens_q must be int32 [{B + 1}] (chunk start offsets in q, then the total)")
    check(block_table.dim() == 2 and block_table.shape[0] == B and block_table.dtype == torch.int32,
          f"mfa_prefill: block_table must be int32 [{B}, max_blocks], got {block_table.dtype} "
          f"{tuple(block_table.shape)}")
    devices = {t.device for t in (q, cache.k, block_table, seq_lens, cu_seqlens_q)}
    check(len(devices) == 1, f"mfa_prefill: tensors must share one device, got {sorted(map(str, devices))}")


def mfa_prefill(q: torch.Tensor, cache: PagedKVCache, block_table: torch.Tensor, seq_lens: torch.Tensor,
                cu_seqlens_q: torch.Tensor, max_q_len: int | None = None, block_m: int | None = None,
                block_n: int | None = None, num_warps: int | None = None,
                num_stages: int | None = None) -> torch.Tensor:
    """q [T, H, D] (chunks packed by cu_seqlens_q, after RoPE) -> out [T, H, D] in q's dtype.

    Needs seq_lens[b] >= q_len_b (the chunk's K/V are cached); pass max_q_len to avoid a host sync.
    """
    _check_prefill(q, cache, block_table, seq_lens, cu_seqlens_q)
    T, H, D = q.shape
    if max_q_len is None:
        max_q_len = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())
    on_gpu = q.is_cuda
    block_m = block_m or (128 if on_gpu else 64)
    block_n = block_n or (64 if on_gpu else 32)
    out = torch.empty_like(q)
    grid = (triton.cdiv(max_q_len * H, block_m), seq_lens.shape[0])
    if T and grid[0]:
        _mfa_prefill_kernel[grid](
            q, cache.k, cache.v, block_table, seq_lens, cu_seqlens_q, cache.k_scale, cache.v_scale, out,
            D ** -0.5 * LOG2E, q.stride(0), q.stride(1), cache.k.stride(0), cache.k.stride(1),
            cache.v.stride(0), cache.v.stride(1), block_table.stride(0), out.stride(0), out.stride(1),
            H=H, D=D, PAGE=cache.block_size, BLOCK_M=block_m, BLOCK_N=block_n, DOT=dot_kind(cache),
            num_warps=num_warps or (8 if on_gpu else 4), num_stages=num_stages or (3 if on_gpu else 2))
    return out


def mfa_prefill_ref(q: torch.Tensor, cache: PagedKVCache, block_table: torch.Tensor, seq_lens: torch.Tensor,
                    cu_seqlens_q: torch.Tensor) -> torch.Tensor:
    """float64 reference: per chunk, gather its sequence from the cache and run causal softmax attention."""
    out = torch.empty(q.shape, dtype=torch.float64, device=q.device)
    for b in range(seq_lens.shape[0]):
        lo, hi, L = int(cu_seqlens_q[b]), int(cu_seqlens_q[b + 1]), int(seq_lens[b])
        k, v = gather_kv_ref(cache, block_table[b], L)  # [L, D]
        scores = torch.einsum("thd,sd->hts", q[lo:hi].double(), k) * q.shape[-1] ** -0.5  # [H, Tq, L]
        q_pos = torch.arange(L - (hi - lo), L, device=q.device)[:, None]
        scores = scores.masked_fill(torch.arange(L, device=q.device)[None, :] > q_pos, float("-inf"))
        out[lo:hi] = torch.einsum("hts,sd->thd", scores.softmax(dim=-1), v)
    return out

"""MFA decode attention over the paged KV cache: split-K Triton kernel + merge, and its torch reference.

    out[b, h] = softmax_t(q[b, h] . K[b, t] / sqrt(D)) @ V[b, :]      t < seq_lens[b]
All H query heads of a sequence share one K/V head, so one program takes the H heads as the rows of
a [H_PAD, D] tile (H_PAD >= 16 for tl.dot, padded rows masked) and reads each K/V row ONCE for all of
them: per sequence the traffic is L x 2 x D x (2 | 1) bytes of cache (the floor), plus q and out.
Long sequences and small batches are cut into `num_splits` slices of the sequence; each writes its
normalized partial output [H, D] (fp32, or fp16 for an FP8 cache: `partial_dtype`) and log2-sum-exp [H],
and `_mfa_merge_kernel` combines them:
    out = sum_s 2^(lse_s - M) o_s / sum_s 2^(lse_s - M)      (times v_scale for fp16 partials)
which costs 2 x H x D x (4 | 2) bytes per split (`mfa_plan._pick_splits` weighs that against filling the
GPU).
With an FP8 cache P V takes fp16 operands (see kv_cache.dot_kind) and q K^T either fp16 ones (qk_fp8 0:
|q| < 65504) or E4M3 ones on the raw K tile, q split per head into hi + lo by a pre-pass (qk_fp8 2).
Measured on an H200 (benchmarks/NOTES_mfa.md, runs 5-7): BF16 256 x 4K at the copy bandwidth, 32 x 4K 68%.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from runtime.kernels.kv_cache import (
    PagedKVCache,
    check,
    dot_kind,
    gather_kv_ref,
    load_page_rows,
    load_paged_rows,
    round_to_e4m3,
)
from runtime.kernels.mfa_plan import DecodePlan, plan_decode, ws_decode_usable

LOG2E = 1.4426950408889634


@triton.jit
def _softmax_step(q, q_lo, acc, m_i, l_i, k, v, valid, qk_scale, dot_ty: tl.constexpr, QK8: tl.constexpr):
    """One online-softmax step of the [H_PAD, D] head tile against K, V [BLOCK_N, D] (invalid rows masked).

    The log2-domain scores are raw * qk_scale [H_PAD] (> 0), so the running max m_i is kept in raw units
    and the scale enters the exponent as one FFMA per score. QK8: q / q_lo are the E4M3 hi / lo parts of
    the split q (`_split_q_fp8`), whose per-head scale qk_scale carries: raw = two E4M3 x E4M3 dots into
    ONE accumulator on the raw cache tile, which the tensor cores read straight from shared memory (no K
    conversion, no round trip). P V stays fp16."""
    v = v.to(dot_ty)  # first: an FP8 V is converted and stored for the wgmma together with K (one barrier)
    if QK8:
        kt = tl.trans(k.to(tl.float32)) if dot_ty == tl.float32 else tl.trans(k)  # CPU: fp32 dots
        raw = tl.dot(q_lo, kt, tl.dot(q, kt))
    else:
        raw = tl.dot(q, tl.trans(k.to(dot_ty)))  # [H_PAD, BLOCK_N]
    raw = tl.where(valid[None, :], raw, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(raw, 1))
    alpha = tl.exp2((m_i - m_new) * qk_scale)
    p = tl.exp2(raw * qk_scale[:, None] - (m_new * qk_scale)[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(dot_ty), v)
    return acc, m_new, l_i


@triton.jit
def _split_q_fp8(q, qk_ty: tl.constexpr):
    """q [H_PAD, D] fp32 -> (hi, lo, s) with q ~= s (hi + lo): hi = e4m3(q / s), lo = e4m3(q / s - hi) in
    qk_ty (E4M3, or fp32 holding E4M3 values for the CPU interpreter), s [H_PAD] = max|q_h| / 448 per head.
    |q/s - hi| <= |q/s| / 16 <= 28 fits E4M3; hi alone carries 3 mantissa bits (2-5% error on scores),
    hi + lo about 7, near bf16's 8; no |q| < 65504 limit as with fp16 dots. Both parts are rounded in fp32
    (`round_to_e4m3`), so the casts to E4M3 are exact: an E4M3 -> fp16 unpack of freshly packed values
    is what ptxas (CUDA 13, Triton 3.6) miscompiled in this kernel's pre-pass (NOTES_mfa.md, run 7)."""
    s = tl.maximum(tl.max(tl.abs(q), 1), 1e-30) / 448.0
    x = q / s[:, None]
    hi = round_to_e4m3(x)
    lo = round_to_e4m3(x - hi)
    return hi.to(qk_ty), lo.to(qk_ty), s


@triton.jit
def _split_q_kernel(q_ptr, q8_ptr, qs_ptr, stride_qb, stride_qh, H: tl.constexpr, H_PAD: tl.constexpr,
                    D: tl.constexpr, PDL: tl.constexpr):
    """qk_fp8 2: sequence b's q split once (`_split_q_fp8`) into q8 [B, 2, H_PAD, D] and qs [B, H_PAD], so
    the decode kernel LOADS hi / lo (the tensor cores then read them from shared memory, as the BF16 path
    reads q). Splitting in the decode kernel instead (run 7's qk_fp8 1, deleted) left them in registers,
    which Triton reloads from shared memory every tile, and was slower."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    b = tl.program_id(0)
    h = tl.arange(0, H_PAD)
    d = tl.arange(0, D)
    q = tl.load(q_ptr + b.to(tl.int64) * stride_qb + h[:, None] * stride_qh + d[None, :],
                mask=h[:, None] < H, other=0.0).to(tl.float32)
    hi, lo, s = _split_q_fp8(q, q8_ptr.dtype.element_ty)
    hd = b.to(tl.int64) * 2 * H_PAD * D + h[:, None] * D + d[None, :]
    tl.store(q8_ptr + hd, hi)
    tl.store(q8_ptr + H_PAD * D + hd, lo)
    tl.store(qs_ptr + b.to(tl.int64) * H_PAD + h, s)


@triton.jit
def _tile_pages(pages, cp, first, tok, BLOCK_N: tl.constexpr, PAGE: tl.constexpr):
    """Page id of each row of a tile of k whole pages that starts at chunk page `first`, from the chunk's ids
    in registers: k scalar picks (compare + sum) and a select per row, instead of the per-row pick over the
    whole chunk. (A tile within one page takes one pick, made in the kernel's loop.)
    """
    sub = tl.arange(0, BLOCK_N) // PAGE  # which page of the tile each row is in
    page = tl.zeros_like(tok)
    for j in tl.static_range(BLOCK_N // PAGE):
        page = tl.where(sub == j, tl.sum(tl.where(cp == first + j, pages, 0), 0), page)
    return page


@triton.jit
def _mfa_decode_kernel(q_ptr, kc_ptr, vc_ptr, bt_ptr, lens_ptr, k_scale_ptr, v_scale_ptr, out_ptr, part_o_ptr,
                       part_lse_ptr, q8_ptr, qs_ptr, sm_scale_log2, tokens_per_split, num_splits,
                       stride_qb, stride_qh, stride_kb, stride_kt, stride_vb, stride_vt, stride_bt,
                       stride_ob, stride_oh,
                       H: tl.constexpr, H_PAD: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr,
                       BLOCK_N: tl.constexpr, CHUNK: tl.constexpr, DIRECT: tl.constexpr,
                       DOT: tl.constexpr, TILE_PAGE: tl.constexpr, PDL: tl.constexpr, QK8: tl.constexpr):
    """Program (split s, sequence b): online softmax over tokens [s * tps, (s + 1) * tps) of b.

    CHUNK > 0: the block-table entries of CHUNK tokens are loaded once per chunk into registers, so the
    K/V addresses of the inner loop depend on no load and Triton's pipeliner can prefetch K/V tiles
    num_stages - 1 ahead; CHUNK == 0 gathers each tile's page ids with the tile (a load-to-load chain).
    TILE_PAGE (needs CHUNK > 0; a tile covers one page or BLOCK_N / PAGE whole pages): the page ids are
    picked as scalars (one per page of the tile), so the K/V row addresses are affine per page, not a
    per-row register gather; 2 also runs the full tiles without masks and peels the sequence's one
    partial tile. PDL (programmatic dependent launch, Hopper): this grid may start before the previous
    kernel in the stream has finished, so it waits for it before reading anything; then it lets the next
    launch (the merge, which waits in turn) start: at once (1) or once its loop is done (2). Each launch
    overlaps the kernel before it instead of following it.
    QK8 (FP8 cache, 2): q K^T as two E4M3 dots on the raw K tile (`_softmax_step`) of the q split that
    `_split_q_kernel` wrote (hi, lo and a scale per head).
    """
    if PDL:
        gdc_wait()  # the previous kernel's writes (q, the cache) are complete and visible
    if PDL == 1:
        gdc_launch_dependents()
    s = tl.program_id(0)
    b = tl.program_id(1)
    seq_len = tl.load(lens_ptr + b)
    start = s * tokens_per_split
    end = tl.minimum(start + tokens_per_split, seq_len)
    # no `if start < end`: an empty split runs zero iterations (the merge skips it anyway)
    dot_ty: tl.constexpr = tl.float16 if DOT == 2 else (tl.bfloat16 if DOT == 1 else tl.float32)  # dot_kind
    h = tl.arange(0, H_PAD)
    d = tl.arange(0, D)
    qk_scale = tl.full([H_PAD], 1.0, tl.float32) * sm_scale_log2 * tl.load(k_scale_ptr)  # FP8 K scale in
    if QK8:  # hi, lo [H_PAD, D] and the per-head scale, as `_split_q_kernel` wrote them
        hd = b.to(tl.int64) * 2 * H_PAD * D + h[:, None] * D + d[None, :]
        q = tl.load(q8_ptr + hd)
        q_lo = tl.load(q8_ptr + H_PAD * D + hd)
        qk_scale = qk_scale * tl.load(qs_ptr + b.to(tl.int64) * H_PAD + h)
    else:
        q = tl.load(q_ptr + b.to(tl.int64) * stride_qb + h[:, None] * stride_qh + d[None, :],
                    mask=h[:, None] < H, other=0.0)  # [H_PAD, D]
        q = q.to(dot_ty)
        q_lo = q  # unused
    bt_row = bt_ptr + b.to(tl.int64) * stride_bt
    m_i = tl.full([H_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([H_PAD], tl.float32)
    acc = tl.zeros([H_PAD, D], tl.float32)
    if CHUNK == 0:
        for n in range(start, end, BLOCK_N):
            tok = n + tl.arange(0, BLOCK_N)
            valid = tok < end
            k = load_paged_rows(kc_ptr, bt_row, tok, valid, stride_kb, stride_kt, PAGE, D)
            v = load_paged_rows(vc_ptr, bt_row, tok, valid, stride_vb, stride_vt, PAGE, D)
            acc, m_i, l_i = _softmax_step(q, q_lo, acc, m_i, l_i, k, v, valid, qk_scale, dot_ty, QK8)
    else:
        cp = tl.arange(0, CHUNK // PAGE)
        full = end  # tiles of [start, full) need no mask when TILE_PAGE == 2; the partial one is peeled
        if TILE_PAGE == 2:
            full = start + tl.maximum(end - start, 0) // BLOCK_N * BLOCK_N
        for c0 in range(start, full, CHUNK):  # c0 is page-aligned: tokens_per_split % CHUNK == 0
            c_end = tl.minimum(c0 + CHUNK, full)
            pages = tl.load(bt_row + c0 // PAGE + cp, mask=c0 + cp * PAGE < c_end, other=0)  # [CHUNK / PAGE]
            for n in range(c0, c_end, BLOCK_N):
                tok = n + tl.arange(0, BLOCK_N)
                valid = tl.full([BLOCK_N], True, tl.int1) if TILE_PAGE == 2 else tok < c_end  # 2: masks fold
                if TILE_PAGE and BLOCK_N <= PAGE:  # one page: a scalar base address, rows affine from it
                    page = tl.sum(tl.where(cp == (n - c0) // PAGE, pages, 0), 0).to(tl.int64)
                    rows = (n % PAGE + tl.arange(0, BLOCK_N))[:, None]
                    k_rows = kc_ptr + page * stride_kb + rows * stride_kt + d[None, :]
                    v_rows = vc_ptr + page * stride_vb + rows * stride_vt + d[None, :]
                    k = tl.load(k_rows, mask=valid[:, None], other=0.0)
                    v = tl.load(v_rows, mask=valid[:, None], other=0.0)
                else:
                    if TILE_PAGE:  # the tile's page ids picked as scalars, one per whole page
                        page = _tile_pages(pages, cp, (n - c0) // PAGE, tok, BLOCK_N, PAGE)
                    else:
                        pick = ((tok - c0) // PAGE)[:, None] == cp[None, :]
                        page = tl.sum(tl.where(pick, pages[None, :], 0), 1)  # [BLOCK_N] register "gather"
                    k = load_page_rows(kc_ptr, page, tok, valid, stride_kb, stride_kt, PAGE, D)
                    v = load_page_rows(vc_ptr, page, tok, valid, stride_vb, stride_vt, PAGE, D)
                acc, m_i, l_i = _softmax_step(q, q_lo, acc, m_i, l_i, k, v, valid, qk_scale, dot_ty, QK8)
        if TILE_PAGE == 2:  # noqa: SIM102 (a static if around a runtime one)
            if full < end:  # the sequence's last, partial tile: masked, its page ids read directly
                tok = full + tl.arange(0, BLOCK_N)
                valid = tok < end
                k = load_paged_rows(kc_ptr, bt_row, tok, valid, stride_kb, stride_kt, PAGE, D)
                v = load_paged_rows(vc_ptr, bt_row, tok, valid, stride_vb, stride_vt, PAGE, D)
                acc, m_i, l_i = _softmax_step(q, q_lo, acc, m_i, l_i, k, v, valid, qk_scale, dot_ty, QK8)
    if PDL == 2:  # the merge launches while this grid stores its partials (`mfa_plan._pick_pdl`)
        gdc_launch_dependents()
    l_i = tl.where(l_i > 0, l_i, 1.0)  # an empty split: o = 0 and lse = -inf, i.e. weight 0 in the merge
    v_scale = tl.load(v_scale_ptr)
    if not DIRECT and part_o_ptr.dtype.element_ty.primitive_bitwidth == 16:
        v_scale = 1.0  # 16-bit partials hold O / l in the cache's units: the merge applies v_scale
    o = acc * (v_scale / l_i)[:, None]
    if DIRECT:
        out = out_ptr + b.to(tl.int64) * stride_ob + h[:, None] * stride_oh + d[None, :]
        tl.store(out, o.to(out_ptr.dtype.element_ty), mask=h[:, None] < H)
    else:  # partials [B, S, H, D] (`partial_dtype`) and [B, S, H]
        row = (b.to(tl.int64) * num_splits + s) * H + h
        tl.store(part_o_ptr + row[:, None] * D + d[None, :], o.to(part_o_ptr.dtype.element_ty),
                 mask=h[:, None] < H)
        tl.store(part_lse_ptr + row, m_i * qk_scale + tl.log2(l_i), mask=h < H)


@triton.jit
def _mfa_merge_kernel(part_o_ptr, part_lse_ptr, v_scale_ptr, out_ptr, num_splits, stride_ob, stride_oh,
                      H: tl.constexpr, D: tl.constexpr, S_PAD: tl.constexpr, D_BLOCK: tl.constexpr,
                      PDL: tl.constexpr):
    """Program (head h, sequence b, dims block): all splits of (b, h) in ONE load of [S_PAD, D_BLOCK];
    16-bit partials are in the cache's units, so the merge applies v_scale (`partial_dtype`).

    One round trip per program instead of a loop over split blocks: at batch 1 the merge is latency,
    not bytes (64 heads x 128 splits x 1 KiB), so it is spread over D / D_BLOCK programs per head. The
    sequence's length is not read (a second round trip before the partials'): a split past it wrote o = 0
    and lse = -inf, weight 0 here.
    PDL: launched before the decode grid finished (programmatic dependent launch): wait for it first.
    """
    if PDL:
        gdc_wait()  # the decode grid has completed and its partials are visible
        gdc_launch_dependents()
    h = tl.program_id(0)
    b = tl.program_id(1)
    d = tl.program_id(2) * D_BLOCK + tl.arange(0, D_BLOCK)
    sp = tl.arange(0, S_PAD)
    row = (b.to(tl.int64) * num_splits + sp) * H + h
    scaled: tl.constexpr = part_o_ptr.dtype.element_ty.primitive_bitwidth == 16
    if scaled:
        v_scale = tl.load(v_scale_ptr)  # beside the partials' loads, not after them
    lse = tl.load(part_lse_ptr + row, mask=sp < num_splits, other=float("-inf"))  # [S_PAD]
    o = tl.load(part_o_ptr + row[:, None] * D + d[None, :], mask=(sp < num_splits)[:, None], other=0.0)
    w = tl.exp2(lse - tl.max(lse, 0))  # [S_PAD], 0 for unused splits
    merged = tl.sum(w[:, None] * o.to(tl.float32), 0) / tl.sum(w, 0)
    if scaled:
        merged = merged * v_scale
    out = out_ptr + b.to(tl.int64) * stride_ob + h * stride_oh + d
    tl.store(out, merged.to(out_ptr.dtype.element_ty))


def _check_decode(q: torch.Tensor, cache: PagedKVCache, block_table: torch.Tensor,
                  seq_lens: torch.Tensor) -> None:
    check(q.dim() == 3 and q.shape[2] == cache.head_dim and q.stride(-1) == 1,
          f"mfa_decode: q must be [batch, heads, {cache.head_dim}] with contiguous head_dim, "
          f"got {tuple(q.shape)}")
    B, H, D = q.shape
    check(q.dtype in (torch.bfloat16, torch.float16, torch.float32),
          f"mfa_decode: q dtype {q.dtype} unsupported (use bfloat16, float16 or float32)")
    check(D >= 16 and D & (D - 1) == 0, f"mfa_decode: head_dim must be a power of two >= 16, got {D}")
    check(block_table.dim() == 2 and block_table.shape[0] == B and block_table.dtype == torch.int32,
          f"mfa_decode: block_table must be int32 [{B}, max_blocks], got {block_table.dtype} "
          f"{tuple(block_table.shape)}")
    check(seq_lens.shape == (B,) and seq_lens.dtype == torch.int32,
          f"mfa_decode: seq_lens must be int32 [{B}], got {seq_lens.dtype} {tuple(seq_lens.shape)}")
    devices = {t.device for t in (q, cache.k, block_table, seq_lens)}
    check(len(devices) == 1, f"mfa_decode: tensors must be on one device, got {sorted(map(str, devices))}")


def _split_q(q: torch.Tensor, h_pad: int, cache: PagedKVCache,
             pdl: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """qk_fp8 2: q's E4M3 hi / lo parts q8 [B, 2, h_pad, D] (fp32 holding E4M3 values off the GPU) and
    per-head scales qs [B, h_pad], by `_split_q_kernel` (a program per sequence, before the decode grid)."""
    B, H, D = q.shape
    q8_dtype = cache.k.dtype if dot_kind(cache) else torch.float32
    q8 = torch.empty((B, 2, h_pad, D), device=q.device, dtype=q8_dtype)
    qs = torch.empty((B, h_pad), device=q.device, dtype=torch.float32)
    _split_q_kernel[(B,)](q, q8, qs, q.stride(0), q.stride(1), H=H, H_PAD=h_pad, D=D, PDL=pdl,
                          num_warps=4, launch_pdl=pdl)
    return q8, qs


def partial_dtype(cache: PagedKVCache, out_dtype: torch.dtype) -> torch.dtype:
    """The split partials' dtype. fp16 for an E4M3 cache and a 16-bit output: they hold O / l in the cache's
    units (the merge applies v_scale), a convex combination of values within +-448, so fp16 keeps 11 bits
    for any v_scale, no fewer than the output, at half fp32's bytes (NOTES_mfa.md run 19). Otherwise fp32,
    holding O v_scale / l: a 16-bit cache's values have no such bound, and an fp32 output wants fp32."""
    return torch.float16 if cache.is_fp8 and out_dtype.itemsize == 2 else torch.float32


def _merge_warps(part_o: torch.Tensor, s_pad: int, d_block: int) -> int:
    """16-bit partials up to 16 splits: warps only along D (one warp's 16-byte loads cover 256 columns), so
    each thread sums its splits itself. With 4 warps over the split rows the fp16 merge waited on the
    shared-memory reduction (ncu: L1 93% busy) and took 4x fp32's time; fp32 keeps 4 warps, which measured
    better at 16 splits (NOTES_mfa.md run 19)."""
    if part_o.element_size() == 2 and s_pad <= 16:
        return max(1, d_block * 2 // 512)
    return 4


def mfa_decode(q: torch.Tensor, cache: PagedKVCache, block_table: torch.Tensor, seq_lens: torch.Tensor,
               max_seq_len: int | None = None, plan: DecodePlan | None = None) -> torch.Tensor:
    """q [B, H, D] (after RoPE) -> out [B, H, D] in q's dtype. Every seq_lens[b] must be in 1..max_seq_len.

    Pass max_seq_len (an upper bound) to avoid a device->host sync, e.g. inside CUDA-graph capture.
    """
    _check_decode(q, cache, block_table, seq_lens)
    B, H, D = q.shape
    max_seq_len = int(seq_lens.max()) if max_seq_len is None else max_seq_len
    check(max_seq_len <= block_table.shape[1] * cache.block_size,
          f"mfa_decode: max_seq_len {max_seq_len} exceeds block_table capacity "
          f"{block_table.shape[1]} x {cache.block_size}")
    plan = plan or plan_decode(B, max_seq_len, D, q.device, cache.k.dtype, cache.block_size)
    assert plan.page == cache.block_size and plan.tokens_per_split % max(plan.chunk, 1) == 0, plan
    out = torch.empty_like(q)
    direct = plan.num_splits == 1
    part_o = out if direct else torch.empty((B, plan.num_splits, H, D), dtype=partial_dtype(cache, q.dtype),
                                            device=q.device)
    part_lse = out if direct else torch.empty((B, plan.num_splits, H), dtype=torch.float32, device=q.device)
    tile_page = plan.tile_page if plan.chunk > 0 else 0
    pdl = plan.pdl if q.is_cuda else 0  # 0 off, 1 or 2: where the decode kernel lets the next launch start
    h_pad = max(16, triton.next_power_of_2(H))
    qk8 = plan.qk_fp8 if cache.is_fp8 else 0
    sm_scale_log2 = D ** -0.5 * LOG2E  # scores in the log2 domain (exp2 in the kernels)
    if qk8 and plan.gluon and ws_decode_usable(q, cache):  # splits q itself: no pre-pass
        from runtime.kernels.mfa_decode_ws import mfa_decode_ws  # Gluon: imported where it runs

        mfa_decode_ws(q, cache, block_table, seq_lens, out, part_o, part_lse, sm_scale_log2,
                      plan.num_splits, plan.tokens_per_split, block_n=plan.block_n, stages=plan.num_stages,
                      vstages=plan.gluon_vstages, vec=plan.gluon_vec, pair=plan.gluon == 2, pdl=pdl)
    else:
        q8, qs = _split_q(q, h_pad, cache, pdl > 0) if qk8 else (out, out)  # (out: never read)
        _mfa_decode_kernel[(plan.num_splits, B)](
            q, cache.k, cache.v, block_table, seq_lens, cache.k_scale, cache.v_scale, out, part_o, part_lse,
            q8, qs, sm_scale_log2, plan.tokens_per_split, plan.num_splits,
            q.stride(0), q.stride(1), cache.k.stride(0), cache.k.stride(1), cache.v.stride(0),
            cache.v.stride(1), block_table.stride(0), out.stride(0), out.stride(1),
            H=H, H_PAD=h_pad, D=D, PAGE=cache.block_size,
            BLOCK_N=plan.block_n, CHUNK=plan.chunk, DIRECT=direct, DOT=dot_kind(cache),
            TILE_PAGE=tile_page, PDL=pdl, QK8=qk8, num_warps=plan.num_warps, num_stages=plan.num_stages,
            launch_pdl=pdl > 0)
    if not direct:
        s_pad = triton.next_power_of_2(plan.num_splits)
        d_block = min(D, max(16, 8192 // s_pad))  # a [S_PAD, D_BLOCK] fp32 tile of <= 32 KiB
        _mfa_merge_kernel[(H, B, D // d_block)](part_o, part_lse, cache.v_scale, out, plan.num_splits,
                                                out.stride(0), out.stride(1), H=H, D=D, S_PAD=s_pad,
                                                D_BLOCK=d_block, PDL=pdl > 0, launch_pdl=pdl > 0,
                                                num_warps=_merge_warps(part_o, s_pad, d_block))
    return out


def mfa_decode_ref(q: torch.Tensor, cache: PagedKVCache, block_table: torch.Tensor,
                   seq_lens: torch.Tensor) -> torch.Tensor:
    """float64 reference: each sequence's cache gathered and dequantized, plain softmax attention."""
    outs = []
    for b in range(q.shape[0]):
        k, v = gather_kv_ref(cache, block_table[b], int(seq_lens[b]))  # [L, D] each
        scores = (q[b].double() @ k.T) * q.shape[-1] ** -0.5  # [H, L]
        outs.append(scores.softmax(dim=-1) @ v)
    return torch.stack(outs)  # [B, H, D] float64

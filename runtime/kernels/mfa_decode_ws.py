"""FP8-KV MFA decode on Hopper in Gluon: warp-specialized, TMA loads, no V conversion in the dot warps.

Same contract as `mfa_decode._mfa_decode_kernel` with qk_fp8 2 (program = (split, sequence), q split into
E4M3 hi + lo and a per-head scale as `mfa_decode._split_q_fp8` does, partials merged by `_mfa_merge_kernel`),
but the work of a tile is spread over three partitions that meet only at mbarriers:
- loader (1 warp, 24 registers): reads the block table and issues every TMA load: per BLOCK_N-token tile K
  and V as [min(page, BLOCK_N), 128] boxes of the cache viewed as [num_blocks * page, D] (each D half its
  own 128-byte-swizzled buffer) into a STAGES ring.
- converter (4 warps): first splits the second half of q's rows (heads), as the consumer does the first, so
  a CTA's first S waits for half the split (NOTES_mfa.md run 18); then V's E4M3 tile -> fp16 into a VSTAGES
  ring (rows past the sequence end zeroed: the cache there may hold anything, NaN codes too), so the dot
  warps never touch V's bytes. Its bank-conflict-free layout (VEC 8) took 13% off the whole kernel
  (NOTES_mfa.md run 9); since then the consumer bounds the loop (run 13: it waits ~9% of a tile, and 8
  converter warps changed nothing).
- consumer (the default partition, 4 warps): reads the first half of q's rows once and splits it into shared
  memory while the first tile's K and V loads fly (two tiles' in a CTA of few tiles), the rest of the stream
  waiting for q (`q_in`; NOTES_mfa.md runs 11, 13 and 21), then S = q_hi K^T + q_lo K^T as E4M3 wgmma chains
  on the raw K tile (K-major as stored), online softmax in registers, O += P V with P fp16 from registers and
  V fp16 from shared memory. Tile n+1's S chains are issued before tile n's softmax and run under it. (Leaving
  tile n's P V in flight across the loop's back edge as well, FA3-style, made ptxas serialize every wgmma of
  the kernel, silently: the in-flight P registers and accumulators are loop-carried. So did a consumer held
  below 256 registers: hence the converter's 152.) PAIR (plan gluon 2): two tiles a loop pass instead. O's
  rescale is lazy (`_softmax`, `_rescale`), and each of the 128 threads releases a K / fp16-V stage itself
  (`gluon_sync.release`): 3-5% off the loop together (NOTES_mfa.md run 14).
The Triton kernel does all of this in each of its warps, one step after the other (NOTES_mfa.md run 7:
445 instructions per warp per 32-token tile, latency-bound at 2 warps per scheduler).
Measured (H200, NOTES_mfa.md run 18): 256 x 4K 151.9 us (BF16 258.9); the library's FP8 launch from 32K
cached tokens per call (`mfa_plan`). Needs Hopper and a Triton of fp8_linear.GLUON_TRITONS
(`mfa_plan.ws_decode_usable`); elsewhere mfa_decode runs the Triton kernel.
"""

from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    warpgroup_mma,
    warpgroup_mma_init,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from runtime.kernels.gluon_api import PUBLIC_REINTERPRET, tma_load
from runtime.kernels.gluon_sync import WARPGROUP_THREADS, release
from runtime.kernels.kv_cache import PagedKVCache

DH = gl.constexpr(128)  # columns of one D half: a 128-byte E4M3 row, the TMA box's and the swizzle's width
QROWS = gl.constexpr(32)  # q rows (heads) a partition splits: the consumer the first, the converter the rest
FEW_TILES = gl.constexpr(16)  # a CTA of up to this many tiles lets two tiles' loads fly beside q's


@gluon.jit
def _gdc(asm: gl.constexpr):
    """A griddepcontrol instruction (programmatic dependent launch), as triton.language.extra.cuda's gdc_*."""
    gl.inline_asm_elementwise(asm, "=r", [], dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def _span(lens_ptr, b, start, tokens_per_split, BLOCK_N: gl.constexpr):
    """The split's end token and its tile count. Each partition reads the length itself, after whatever it can
    issue first (the consumer and the converter: their q rows), rather than the whole CTA waiting for it
    before the partitions start."""
    end = gl.minimum(start + tokens_per_split, gl.load(lens_ptr + b))
    return end, gl.cdiv(gl.maximum(end - start, 0), BLOCK_N)


@gluon.jit
def _tile_bounds(start, end, i, BLOCK_N: gl.constexpr):
    """First token of tile i and its count of valid tokens (BLOCK_N except in the split's last tile)."""
    n = start + i * BLOCK_N
    return n, gl.minimum(end - n, BLOCK_N)


@gluon.jit
def _tile_rows(bt_row, n, end, PAGE: gl.constexpr, BLOCK_N: gl.constexpr, R: gl.constexpr):
    """The cache rows of the tile at token n: one per box of R rows (a box past `end` re-reads the last
    token's page), read from the block table once for K and V."""
    rows = ()
    for j in gl.static_range(BLOCK_N // R):
        t = gl.minimum(n + j * R, end - 1)
        rows = rows + (gl.load(bt_row + t // PAGE) * PAGE + t % PAGE,)
    return rows


@gluon.jit
def _load_tile(desc, smem, ready, empty, s, phase, rows, BLOCK_N: gl.constexpr, R: gl.constexpr,
               NH: gl.constexpr):
    """Once stage s is free, the tile's boxes (`_tile_rows`) of the cache `desc`, R rows per D half."""
    mbarrier.wait(empty.index(s), phase)
    mbarrier.expect(ready.index(s), BLOCK_N * NH * DH)
    for j in gl.static_range(BLOCK_N // R):
        for h in gl.static_range(NH):
            tma_load(desc, [rows[j], h * DH], ready.index(s), smem.index(s * NH + h).slice(j * R, R))


@gluon.jit
def _loader(k_desc, v_desc, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty, q_in, bt_ptr, stride_bt, b,
            lens_ptr, start, tokens_per_split, PAGE: gl.constexpr, BLOCK_N: gl.constexpr,
            STAGES: gl.constexpr, NH: gl.constexpr):
    """Each tile's K and V: BLOCK_N / R boxes of R = min(PAGE, BLOCK_N) rows per D half. A box past the
    sequence end re-reads its last token's page (rows the consumer masks and the converter zeroes), so every
    tile has the same byte count. A tile's page ids are read before its stage is free, once for K and V
    (1-3% off the call, NOTES_mfa.md run 17). The stream waits for q after its first tile, or its second
    in a CTA of <= FEW_TILES tiles: there tile 1 in flight early saves ~0.4 us (2-3% at 4-8 tiles), where
    a CTA of 64+ tiles loses about that much to q's later arrival (NOTES_mfa.md run 21)."""
    R: gl.constexpr = PAGE if PAGE < BLOCK_N else BLOCK_N
    end, n_tiles = _span(lens_ptr, b, start, tokens_per_split, BLOCK_N)
    bt_row = bt_ptr + b.to(gl.int64) * stride_bt
    q_tile = 1 + (n_tiles <= FEW_TILES).to(gl.int32)  # the first tile the stream holds back until q is in
    for i in range(n_tiles):
        s = i % STAGES
        phase = ((i // STAGES) & 1) ^ 1  # the first round passes at once
        n, _ = _tile_bounds(start, end, i, BLOCK_N)
        rows = _tile_rows(bt_row, n, end, PAGE, BLOCK_N, R)
        if i == q_tile:
            mbarrier.wait(q_in, 0)
        _load_tile(k_desc, k_smem, k_ready, k_empty, s, phase, rows, BLOCK_N, R, NH)
        _load_tile(v_desc, v_smem, v_ready, v_empty, s, phase, rows, BLOCK_N, R, NH)


@gluon.jit
def _converter(q_ptr, q_smem, q_in, q_done, qs_smem, stride_qb, stride_qh, v_smem, v16_smem, v_ready, v_empty,
               v16_ready, v16_empty, b, lens_ptr, start, tokens_per_split, H: gl.constexpr,
               BLOCK_N: gl.constexpr, STAGES: gl.constexpr, VSTAGES: gl.constexpr, NH: gl.constexpr,
               VEC: gl.constexpr):
    """First the second half of q's rows (`_split_q_smem`; `q_done` tells the consumer), then each tile's V:
    E4M3 stage -> registers (VEC bytes a thread a row) -> fp16 stage; releases the E4M3 stage as soon as it
    is read. Rows past the sequence end become 0 (P is 0 there, but 0 x NaN is not).
    VEC 8 (16 threads along a 128-column row, 2 rows a warp): the fp16 STS.128 of a warp cover 2 x 256
    bytes of the 128-byte-swizzled tile, conflict-free (gl.bank_conflicts 0); VEC 16, run 8's layout (8
    threads a row, 4 rows a warp), put both 64-column halves on the same banks (ncu: 12.8 wavefronts per
    request where 4 would do)."""
    layout: gl.constexpr = gl.BlockedLayout([1, VEC], [32 * VEC // DH, DH // VEC], [4, 1], [1, 0])
    rows = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, layout))
    x0, x1 = _load_q(q_ptr, b, stride_qb, stride_qh, H, QROWS)
    end, n_tiles = _span(lens_ptr, b, start, tokens_per_split, BLOCK_N)
    _split_q_smem(x0, x1, q_smem, q_in, qs_smem, NH, QROWS)
    mbarrier.arrive(q_done, count=1)
    for i in range(n_tiles):
        s = i % STAGES
        j = i % VSTAGES
        _, valid = _tile_bounds(start, end, i, BLOCK_N)
        mbarrier.wait(v_ready.index(s), (i // STAGES) & 1)
        mbarrier.wait(v16_empty.index(j), ((i // VSTAGES) & 1) ^ 1)
        for h in gl.static_range(NH):
            v = v_smem.index(s * NH + h).load(layout).to(gl.float16)
            if valid < BLOCK_N:
                v = gl.where(rows[:, None] < valid, v, 0.0)
            v16_smem.index(j * NH + h).store(v)
        fence_async_shared()  # the loads before the TMA that refills the stage, the stores before the wgmma
        mbarrier.arrive(v_empty.index(s), count=1)
        mbarrier.arrive(v16_ready.index(j), count=1)


@gluon.jit
def _store_hi_lo(x, r, q_smem, j, NH: gl.constexpr, ROW0: gl.constexpr):
    """x r (one D half of q's rows ROW0 .., bf16 [QROWS, DH]; r = 448 / max|q_h| per head) as E4M3 hi into
    those rows of q_smem j and lo = x r - hi into q_smem NH + j. hi is x r with its mantissa rounded to E4M3's
    3 bits (nearest even) on the fp32 bits, so its cast is exact for E4M3 normals and lo needs no E4M3 -> fp32
    unpack (the pattern ptxas miscompiled in run 7's pre-pass); the hardware cast (nearest even, saturating)
    rounds lo. Below E4M3's normal range the cast re-rounds hi, which lo then misses by <= 2^-10 of the 448
    scale. About 9 instructions an element where act_quant's full rounding of both parts took ~34
    (NOTES_mfa.md run 13)."""
    x = x.to(gl.float32) * r[:, None]
    bits = x.to(gl.int32, bitcast=True)
    hi = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576).to(gl.float32, bitcast=True)  # 0xFFF00000
    q_smem.index(j).slice(ROW0, QROWS).store(hi.to(gl.float8e4nv))
    q_smem.index(NH + j).slice(ROW0, QROWS).store((x - hi).to(gl.float8e4nv))


@gluon.jit
def _load_q(q_ptr, b, stride_qb, stride_qh, H: gl.constexpr, ROW0: gl.constexpr):
    """Rows ROW0 .. ROW0 + QROWS - 1 of sequence b's q [H, D] as two D halves [QROWS, DH] in registers (rows
    from H on zero)."""
    layout: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [4, 1], [1, 0])
    h = ROW0 + gl.arange(0, QROWS, layout=gl.SliceLayout(1, layout))
    d = gl.arange(0, DH, layout=gl.SliceLayout(0, layout))
    ptr = q_ptr + b.to(gl.int64) * stride_qb + h[:, None] * stride_qh + d[None, :]
    mask = (h < H)[:, None]
    return gl.load(ptr, mask=mask, other=0.0), gl.load(ptr + DH, mask=mask, other=0.0)


@gluon.jit
def _split_q_smem(x0, x1, q_smem, q_in, qs_smem, NH: gl.constexpr, ROW0: gl.constexpr):
    """q's rows ROW0 .. ROW0 + QROWS - 1 (x0, x1: `_load_q`) split as `mfa_decode._split_q_fp8` does (the
    same hi for E4M3 normals, see `_store_hi_lo`), q ~= s (hi + lo) with s = max|q_h| / 448 per head: hi's
    D halves into q_smem 0 .. NH - 1, lo's into NH .. 2 NH - 1, s into qs_smem. The consumer splits the
    first half of the rows and the converter, idle until the first V tile lands, the second: a CTA's first
    S waits for the split (NOTES_mfa.md run 18). q is read once, both D halves, and the loader issues only
    a tile or two (`_loader`) before q is in registers (`q_in`: one arrive per partition): behind the whole
    K / V stream q's loads had waited ~4 us (NOTES_mfa.md run 13)."""
    gl.static_assert(NH == 2)
    amax = gl.maximum(gl.max(gl.abs(x0.to(gl.float32)), 1), gl.max(gl.abs(x1.to(gl.float32)), 1))
    mbarrier.arrive(q_in, count=1)  # after the loads (the arrive releases them): the stream may go on
    amax = gl.maximum(amax, 1e-30)
    r = 448.0 / amax
    _store_hi_lo(x0, r, q_smem, 0, NH, ROW0)
    _store_hi_lo(x1, r, q_smem, 1, NH, ROW0)
    qs_smem.slice(ROW0, QROWS).store(amax / 448.0)
    fence_async_shared()  # the stores before the wgmma that reads them


@gluon.jit
def _qk(q_smem, k_smem, k_ready, i, zero, STAGES: gl.constexpr, NH: gl.constexpr):
    """Tile i's raw scores: wait for its K stage, then q_hi K^T + q_lo K^T as 2 x NH E4M3 wgmma chains into
    one fp32 accumulator (not waited for: the caller waits, then releases the stage)."""
    s = i % STAGES
    mbarrier.wait(k_ready.index(s), (i // STAGES) & 1)
    acc = warpgroup_mma_init(zero)
    for j in gl.static_range(2 * NH):
        acc = warpgroup_mma(q_smem.index(j), k_smem.index(s * NH + j % NH).permute((1, 0)), acc,
                            use_acc=j > 0, is_async=True)
    return acc


LAZY = gl.constexpr(8.0)  # log2 units a row's max may grow past its reference before O is rescaled: P <= 2^8
RESCALE_PACK = gl.constexpr(32)  # accumulator elements per `_rescale` asm block (two a thread per D half)


def _rescale_asm(n: int) -> tuple[str, str]:
    """`_rescale`'s PTX for n elements: $0..n-1 out (tied to acc in $n..2n-1), alpha in $2n..3n-1."""
    test = "".join(f"setp.neu.or.f32 p, ${2 * n + i}, 0f3F800000, p; " for i in range(1, 4))
    muls = "".join(f"mul.f32 ${i}, ${n + i}, ${2 * n + i}; " for i in range(n))
    asm = (f"{{ .reg .pred p; setp.neu.f32 p, ${2 * n}, 0f3F800000; {test}"
           f"vote.sync.any.pred p, p, -1; @!p bra.uni SKIP; {muls}SKIP: }}")
    constraints = ",".join(["=f"] * n + [str(i) for i in range(n)] + ["f"] * n)
    return asm, constraints


_RESCALE_ASM, _RESCALE_CONSTRAINTS = (gl.constexpr(x) for x in _rescale_asm(RESCALE_PACK.value))


@gluon.jit
def _softmax(raw, m_i, l_i, qk_scale, valid, BLOCK_N: gl.constexpr, MASK: gl.constexpr):
    """Online-softmax step on raw scores [64, BLOCK_N] (log2 domain: raw * qk_scale; the max kept in raw
    units): P (fp32), the rescale factor of the old sums, the new reference max and sum. Lazy, as FA4: a
    row's reference max moves only when the tile's max passes it by more than 2^LAZY (P <= 256 then, exact
    in fp16 to its 11 bits, and the sums in fp32 never see it), so alpha is exactly 1 on most tiles and
    `_rescale` skips O's 128 multiplies a thread."""
    if MASK:  # the split's last tile: tokens >= valid are -inf
        cols = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, raw.type.layout))
        raw = gl.where(cols[None, :] < valid, raw, float("-inf"))
    m_tile = gl.max(raw, 1)
    moved = (m_tile - m_i) * qk_scale > LAZY  # the first tile: m_i = -inf
    m_new = gl.where(moved, gl.maximum(m_i, m_tile), m_i)
    alpha = gl.where(moved, gl.exp2((m_i - m_new) * qk_scale), 1.0)
    p = gl.exp2(raw * qk_scale[:, None] - (m_new * qk_scale)[:, None])
    l_i = l_i * alpha + gl.sum(p, 1)
    return p, alpha, m_new, l_i


@gluon.jit
def _rescale(acc, a):
    """acc * a (a: alpha broadcast over a row) unless every alpha of the warp is 1: a warp-uniform branch
    around the multiplies (a vote, no barrier: each warp holds its own 16 rows of the wgmma tile). In the
    wgmma accumulator's register order a thread's elements 0-3 cover both of its rows (r, r + 8), so the
    vote reads those 4; the GPU tests catch an order that does not."""
    return gl.inline_asm_elementwise(_RESCALE_ASM, _RESCALE_CONSTRAINTS, [acc, a], dtype=gl.float32,
                                     is_pure=True, pack=RESCALE_PACK)


@gluon.jit
def _pv(p, alpha, acc0, acc1, v16_smem, v16_ready, i, VSTAGES: gl.constexpr, o_layout: gl.constexpr):
    """Rescale O (two [64, 128] halves) by alpha and issue O += P V (P from registers, fp16)."""
    a = gl.broadcast(gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None], acc0)[0]
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    p16 = gl.convert_layout(p.to(gl.float16), p_layout)
    j = i % VSTAGES
    mbarrier.wait(v16_ready.index(j), (i // VSTAGES) & 1)
    acc0 = warpgroup_mma(p16, v16_smem.index(2 * j), _rescale(acc0, a), is_async=True)
    acc1 = warpgroup_mma(p16, v16_smem.index(2 * j + 1), _rescale(acc1, a), is_async=True)
    return p16, acc0, acc1


@gluon.jit
def _tile(bufs, st, qk_scale, zero_s, i, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, VSTAGES: gl.constexpr,
          NH: gl.constexpr, o_layout: gl.constexpr, PEND: gl.constexpr, KEEP: gl.constexpr):
    """Tile i (not the last; its scores in st's raw): issue S(i + 1), softmax(i) under it, then P V(i).
    PEND: P V(i - 1) is still in flight (waited for here, then its V stage released). KEEP: leave P V(i)
    in flight (wait only for S(i + 1), older than it); else wait for both and release V stage i."""
    q_smem, k_smem, k_ready, k_empty, v16_smem, v16_ready, v16_empty = bufs
    raw, m_i, l_i, t0, t1, p16 = st
    nxt = _qk(q_smem, k_smem, k_ready, i + 1, zero_s, STAGES, NH)  # runs under this tile's softmax
    p, alpha, m_i, l_i = _softmax(raw, m_i, l_i, qk_scale, BLOCK_N, BLOCK_N, False)
    if PEND:
        acc0, acc1, p16 = warpgroup_mma_wait(2 * NH, deps=[t0, t1, p16])  # P V(i - 1), not S(i + 1)
        release(v16_empty.index((i - 1) % VSTAGES))
    else:
        acc0, acc1 = warpgroup_mma_wait(2 * NH, deps=[t0, t1])  # done already: only the types change
    p16, t0, t1 = _pv(p, alpha, acc0, acc1, v16_smem, v16_ready, i, VSTAGES, o_layout)
    if KEEP:
        raw = warpgroup_mma_wait(2, deps=[nxt])  # S(i + 1) is older than P V(i): only it
    else:
        raw = warpgroup_mma_wait(0, deps=[nxt])  # and this tile's P V
        release(v16_empty.index(i % VSTAGES))
    release(k_empty.index((i + 1) % STAGES))
    return raw, m_i, l_i, t0, t1, p16


@gluon.jit
def _consumer(q_ptr, q_smem, q_in, q_done, qs_smem, k_smem, v16_smem, k_empty, k_ready, v16_ready, v16_empty,
              k_scale_ptr, v_scale_ptr, out_ptr, part_o_ptr, part_lse_ptr, sm_scale_log2, b, split, lens_ptr,
              start, tokens_per_split, num_splits, stride_qb, stride_qh, stride_ob, stride_oh,
              H: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, VSTAGES: gl.constexpr,
              NH: gl.constexpr, DIRECT: gl.constexpr, PAIR: gl.constexpr, PDL: gl.constexpr):
    """Scores, softmax and P V of every tile (the loop peels the last one, the only one masked), then the
    normalized partial output and its log2-sum-exp (or the output itself when there is one split); PDL 2
    lets the next launch (the merge) start between the two.
    PAIR: the loop body takes two tiles, P V of the first running under the second's softmax (a P V left
    in flight across the loop's back edge instead makes ptxas serialize every wgmma)."""
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 32])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, 128, 16])
    k_scale = gl.load(k_scale_ptr)  # the scales and q first: their round trips overlap the length's
    v_scale = gl.load(v_scale_ptr)
    x0, x1 = _load_q(q_ptr, b, stride_qb, stride_qh, H, 0)
    end, n_tiles = _span(lens_ptr, b, start, tokens_per_split, BLOCK_N)
    _split_q_smem(x0, x1, q_smem, q_in, qs_smem, NH, 0)
    mbarrier.wait(q_done, 0)  # the converter's rows
    qk_scale = sm_scale_log2 * k_scale * qs_smem.load(gl.SliceLayout(1, s_layout))
    m_i = gl.full([64], float("-inf"), gl.float32, gl.SliceLayout(1, s_layout))
    l_i = gl.zeros([64], gl.float32, gl.SliceLayout(1, s_layout))
    zero_s = gl.zeros([64, BLOCK_N], gl.float32, s_layout)
    acc0 = gl.zeros([64, DH], gl.float32, o_layout)
    acc1 = gl.zeros([64, DH], gl.float32, o_layout)
    if n_tiles > 0:
        raw = warpgroup_mma_wait(0, deps=[_qk(q_smem, k_smem, k_ready, 0, zero_s, STAGES, NH)])
        release(k_empty.index(0))
        p16 = gl.zeros([64, BLOCK_N], gl.float16, gl.DotOperandLayout(operand_index=0, parent=o_layout,
                                                                        k_width=2))
        t0 = warpgroup_mma_init(acc0)
        t1 = warpgroup_mma_init(acc1)
        bufs = (q_smem, k_smem, k_ready, k_empty, v16_smem, v16_ready, v16_empty)
        st = (raw, m_i, l_i, t0, t1, p16)
        n_pairs = (n_tiles - 1) // 2 if PAIR else 0
        for k in range(n_pairs):  # tiles 2k, 2k + 1
            st = _tile(bufs, st, qk_scale, zero_s, 2 * k, BLOCK_N, STAGES, VSTAGES, NH, o_layout, False, True)
            st = _tile(bufs, st, qk_scale, zero_s, 2 * k + 1, BLOCK_N, STAGES, VSTAGES, NH, o_layout, True,
                       False)
        for i in range(2 * n_pairs, n_tiles - 1):  # PAIR: at most one tile left before the last
            st = _tile(bufs, st, qk_scale, zero_s, i, BLOCK_N, STAGES, VSTAGES, NH, o_layout, False, False)
        raw, m_i, l_i, t0, t1, p16 = st
        last = n_tiles - 1
        _, valid = _tile_bounds(start, end, last, BLOCK_N)
        p, alpha, m_i, l_i = _softmax(raw, m_i, l_i, qk_scale, valid, BLOCK_N, True)
        acc0, acc1, p16 = warpgroup_mma_wait(0, deps=[t0, t1, p16])
        p16, t0, t1 = _pv(p, alpha, acc0, acc1, v16_smem, v16_ready, last, VSTAGES, o_layout)
        acc0, acc1, p16 = warpgroup_mma_wait(0, deps=[t0, t1, p16])
    if PDL == 2:
        _gdc("griddepcontrol.launch_dependents; // $0")
    _epilogue(acc0, acc1, m_i, l_i, qk_scale, v_scale, q_smem, out_ptr, part_o_ptr, part_lse_ptr, b, split,
              num_splits, stride_ob, stride_oh, H, DIRECT, o_layout)


@gluon.jit
def _store_rows(x, stage, ptr, stride_h, H: gl.constexpr):
    """x [64, DH] (a wgmma accumulator's layout) into rows h < H of ptr (row stride stride_h) through the
    shared stage, so that each thread writes 16 contiguous bytes: from the accumulator's layout a thread holds
    2 adjacent 16-bit columns, and a warp's store wrote 8 rows 16 bytes each, half a sector (2-6% of the
    call at 1K-4K tokens, NOTES_mfa.md run 17). The fp16 partials take the same way (run 19)."""
    VEC: gl.constexpr = 128 // x.dtype.primitive_bitwidth
    layout: gl.constexpr = gl.BlockedLayout([1, VEC], [32 * VEC // DH, DH // VEC], [4, 1], [1, 0])
    stage.store(x)
    y = stage.load(layout)
    h = gl.arange(0, 64, layout=gl.SliceLayout(1, layout))
    d = gl.arange(0, DH, layout=gl.SliceLayout(0, layout))
    gl.store(ptr + h[:, None] * stride_h + d[None, :], y, mask=(h < H)[:, None])


@gluon.jit
def _epilogue(acc0, acc1, m_i, l_i, qk_scale, v_scale, q_smem, out_ptr, part_o_ptr, part_lse_ptr, b, split,
              num_splits, stride_ob, stride_oh, H: gl.constexpr, DIRECT: gl.constexpr,
              o_layout: gl.constexpr):
    """Heads < H, both D halves staged in q's shared memory (no wgmma reads it any more): o = O v_scale / l
    into out (one split), or O / l into the fp16 partials [B, S, H, D] (`mfa_decode.partial_dtype`: the
    merge applies v_scale) and lse into [B, S, H] (an empty split: o = 0, lse = -inf, weight 0 in the
    merge)."""
    l_i = gl.where(l_i > 0, l_i, 1.0)
    if DIRECT:
        ptr = out_ptr + b.to(gl.int64) * stride_ob
        stride_h = stride_oh
    else:
        v_scale = 1.0
        ptr = part_o_ptr + (b.to(gl.int64) * num_splits + split) * H * (2 * DH)
        stride_h = 2 * DH
    dtype: gl.constexpr = ptr.dtype.element_ty
    gl.static_assert(dtype.primitive_bitwidth == 16)  # mfa_plan.ws_decode_usable, mfa_decode.partial_dtype
    stage_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([64, DH], dtype)
    if PUBLIC_REINTERPRET:
        stage = q_smem.reinterpret(dtype, [2, 64, DH], stage_layout)
    else:
        stage = q_smem._reinterpret(dtype, [2, 64, DH], stage_layout)
    inv = gl.convert_layout(v_scale / l_i, gl.SliceLayout(1, o_layout))[:, None]
    _store_rows((acc0 * inv).to(dtype), stage.index(0), ptr, stride_h, H)
    _store_rows((acc1 * inv).to(dtype), stage.index(1), ptr + DH, stride_h, H)
    if not DIRECT:
        hs = gl.arange(0, 64, layout=m_i.type.layout)
        row_s = (b.to(gl.int64) * num_splits + split) * H + hs
        gl.store(part_lse_ptr + row_s, m_i * qk_scale + gl.log2(l_i), mask=hs < H)


@gluon.jit
def _mfa_decode_ws_kernel(q_ptr, k_desc, v_desc, bt_ptr, lens_ptr, k_scale_ptr, v_scale_ptr, out_ptr,
                          part_o_ptr, part_lse_ptr, sm_scale_log2, tokens_per_split, num_splits, stride_qb,
                          stride_qh, stride_bt, stride_ob, stride_oh, H: gl.constexpr, PAGE: gl.constexpr,
                          BLOCK_N: gl.constexpr, STAGES: gl.constexpr, VSTAGES: gl.constexpr,
                          DIRECT: gl.constexpr, CONVERTER_REGS: gl.constexpr, VEC: gl.constexpr,
                          PAIR: gl.constexpr, PDL: gl.constexpr):
    """Program (split, sequence b): tokens [split * tps, min((split + 1) * tps, seq_len)) of b.

    PDL: launched as a programmatic dependent, so the grid's launch and the CTAs' start overlap the kernel
    before it (that wrote q); it waits for it before reading anything, and lets the next launch (the merge,
    which waits in turn) start: at once (1) or once the consumer's loop is done (2; `mfa_plan._pick_pdl`)."""
    NH: gl.constexpr = 2  # D = 256 as two 128-column halves
    if PDL:  # before every global read, the workers' too: they start at warp_specialize, after this
        _gdc("griddepcontrol.wait; // $0")
    if PDL == 1:
        _gdc("griddepcontrol.launch_dependents; // $0")
    split = gl.program_id(0)
    b = gl.program_id(1)
    start = split * tokens_per_split
    kv_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, DH], gl.float8e4nv)
    v16_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, DH], gl.float16)
    q_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([64, DH], gl.float8e4nv)
    q_smem = gl.allocate_shared_memory(gl.float8e4nv, [2 * NH, 64, DH], q_layout)
    k_smem = gl.allocate_shared_memory(gl.float8e4nv, [STAGES * NH, BLOCK_N, DH], kv_layout)
    v_smem = gl.allocate_shared_memory(gl.float8e4nv, [STAGES * NH, BLOCK_N, DH], kv_layout)
    v16_smem = gl.allocate_shared_memory(gl.float16, [VSTAGES * NH, BLOCK_N, DH], v16_layout)
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v16_ready = gl.allocate_shared_memory(gl.int64, [VSTAGES, 1], mbarrier.MBarrierLayout())
    v16_empty = gl.allocate_shared_memory(gl.int64, [VSTAGES, 1], mbarrier.MBarrierLayout())
    qs_smem = gl.allocate_shared_memory(gl.float32, [64], gl.SwizzledSharedLayout(1, 1, 1, order=[0]))
    q_in = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    q_done = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    mbarrier.init(q_in, count=2)  # the consumer's and the converter's q rows are in registers
    mbarrier.init(q_done, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(k_empty.index(i), count=WARPGROUP_THREADS)  # `release`
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(v_empty.index(i), count=1)
    for i in gl.static_range(VSTAGES):
        mbarrier.init(v16_ready.index(i), count=1)
        mbarrier.init(v16_empty.index(i), count=WARPGROUP_THREADS)
    fence_async_shared()
    gl.warp_specialize([
        (_consumer, (q_ptr, q_smem, q_in, q_done, qs_smem, k_smem, v16_smem, k_empty, k_ready, v16_ready,
                     v16_empty, k_scale_ptr, v_scale_ptr, out_ptr, part_o_ptr, part_lse_ptr, sm_scale_log2, b,
                     split, lens_ptr, start, tokens_per_split, num_splits, stride_qb, stride_qh, stride_ob,
                     stride_oh, H, BLOCK_N, STAGES, VSTAGES, NH, DIRECT, PAIR, PDL)),
        (_converter, (q_ptr, q_smem, q_in, q_done, qs_smem, stride_qb, stride_qh, v_smem, v16_smem, v_ready,
                      v_empty, v16_ready, v16_empty, b, lens_ptr, start, tokens_per_split, H, BLOCK_N,
                      STAGES, VSTAGES, NH, VEC)),
        (_loader, (k_desc, v_desc, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty, q_in, bt_ptr,
                   stride_bt, b, lens_ptr, start, tokens_per_split, PAGE, BLOCK_N, STAGES, NH)),
    ], [4, 1], [CONVERTER_REGS, 24])


def _descriptor(t: torch.Tensor, rows: int) -> TensorDescriptor:
    layout = gl.NVMMASharedLayout.get_default_for([rows, 128], gl.float8e4nv)
    return TensorDescriptor.from_tensor(t, [rows, 128], layout)


def mfa_decode_ws(q: torch.Tensor, cache: PagedKVCache, block_table: torch.Tensor, seq_lens: torch.Tensor,
                  out: torch.Tensor, part_o: torch.Tensor, part_lse: torch.Tensor, sm_scale_log2: float,
                  num_splits: int, tokens_per_split: int, block_n: int = 64, stages: int = 3,
                  vstages: int = 2, converter_regs: int = 152, vec: int = 8, pair: bool = False,
                  pdl: int = 0) -> None:
    """The decode grid (num_splits, B) into out (one split) or the partials, which mfa_decode then merges.

    q [B, H <= 64, 256] (each program splits its sequence's q itself); sm_scale_log2 = D^-0.5 log2(e) (scores
    in the log2 domain); tokens_per_split a multiple of block_n.
    vec: the converter's E4M3 bytes per thread per row (8 or 16); pair: two tiles per loop pass (gluon 2);
    pdl: launch as a programmatic dependent (the merge is launched so too), letting the next launch start at
    once (1) or after the loop (2).
    """
    B, H, D = out.shape
    assert q.shape == (B, H, D) and q.stride(2) == 1 and H <= 64 and D == 2 * 128
    pg = cache.block_size
    kv_rows = min(pg, block_n)
    k_desc = _descriptor(cache.k.view(-1, D), kv_rows)
    v_desc = _descriptor(cache.v.view(-1, D), kv_rows)
    _mfa_decode_ws_kernel[(num_splits, B)](
        q, k_desc, v_desc, block_table, seq_lens, cache.k_scale, cache.v_scale, out, part_o, part_lse,
        sm_scale_log2, tokens_per_split, num_splits, q.stride(0), q.stride(1), block_table.stride(0),
        out.stride(0), out.stride(1), num_warps=4, launch_pdl=pdl > 0,
        **kernel_constexprs(H, pg, block_n, stages, vstages, num_splits == 1, converter_regs, vec, pair, pdl))


def kernel_constexprs(heads: int, page: int, block_n: int, stages: int, vstages: int, direct: bool,
                      converter_regs: int = 152, vec: int = 8, pair: bool = False, pdl: int = 0) -> dict:
    """`_mfa_decode_ws_kernel`'s compile-time arguments for a launch (also what tests compile it with)."""
    return dict(H=heads, PAGE=page, BLOCK_N=block_n, STAGES=stages, VSTAGES=vstages, DIRECT=direct,
                CONVERTER_REGS=converter_regs, VEC=vec, PAIR=pair, PDL=pdl)

"""fp8_gemm_ws.py's grouped block-FP8 GEMM as a persistent kernel with its own TMA producer warp.

Same operands, modes (SWIGLU / QUANT / WEIGHTED), arithmetic and epilogues as fp8_gemm_ws.py (its
`_tile`, `_halves`, `_mma` and `_store` are reused); what changes is who waits for what:
- a 1-warp producer partition issues every TMA load (few registers: setmaxnreg), so neither consumer
  issues loads between its wgmma chains. In fp8_gemm_ws.py consumer 0 issues them, and its load for
  step + STAGES - 1 waits until consumer 1 has released step - 1's stage: the two consumers run loosely
  lock-stepped and consumer 0's next wgmma waits behind that. A's per-row scales ride along with each
  part of A (a [1, 64] box), so a consumer reads them from shared memory, not from global memory each K
  step (NOTES_ffn.md run 18).
- the grid is persistent: one CTA per SM loops over the tiles, and the producer runs on into the next
  tile while the consumers are still in this one's epilogue; the non-persistent grid exposed every
  tile's pipeline fill and epilogue.
- the tiles (GROUP_M order) are handed out by an atomic counter, in order as CTAs free up (the producer
  takes the next one and publishes its id to the consumers through a 2-slot shared-memory ring): the
  M-blocks that share a weight tile then start it at about the same time, and it comes from HBM about
  once. A static round robin (tile = program id + i * programs) drifts apart: at 4096 tokens ncu read
  7.4 GB from HBM for gate_up's 3.5 GB of weights (L2 hit rate 44%), in this order 5.0 GB (63%), and
  the layer ran 5-12% faster (NOTES_ffn.md run 9).
- PARTS 64-row parts per tile, one consumer warpgroup each: 2 (128 rows) or 3 (192: an expert with
  129-192 pairs streams its weights once, not twice; 160 registers per consumer, too few for DEFER).
- SKIP: a consumer whose 64 rows are all padding (an expert's run is padded to a whole tile; a run that
  ends early in its last tile leaves the last parts empty) runs no wgmma and no promotion for that tile
  (it still waits `ready` and releases `empty`), and the producer loads no A rows for it. At 2048
  tokens (~128 pairs per expert) about half the experts end in such a 128-row block.
- DEFER: a consumer issues two K steps' wgmma chains before it waits for the first, and promotes that
  one while the second runs, so its promotion also overlaps its own MMA, not only the other consumer's
  (two 64-register temporaries; ptxas: no spills with SKIP, 268 B without, so DEFER goes with SKIP).
Each consumer thread releases a ring stage itself (`gluon_sync.release`: no warpgroup bar.sync a K step;
NOTES_ffn.md run 13).
The consumers' setmaxnreg: the warps are padded to PARTS + 1 warpgroups (ptxas starts every thread at
65536 / their threads registers); the producer's warpgroup gives its registers up and the consumers take
CONSUMER_REGS.
"""

from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    mbarrier,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from runtime.kernels.fp8_gemm_ws import (
    ACC_LAYOUT,
    H_LAYOUT,
    HALF_M,
    _halves,
    _mma,
    _store,
    _tile,
    descriptors,
    load_b,
    promote,
    smem_ring,
    weight_scales,
)
from runtime.kernels.gluon_api import tma_load
from runtime.kernels.gluon_sync import release


@gluon.jit
def _live(rows_ptr, off_m, half, num_pairs, SKIP: gl.constexpr):
    """Whether rows off_m + 64 half .. + 63 hold a pair (padding sits at the end of an expert's run, so
    the first row decides); always True without SKIP."""
    if SKIP:
        return gl.load(rows_ptr + off_m + half * HALF_M) < num_pairs
    else:
        return True


@gluon.jit
def _a_scales(as_smem, s, half: gl.constexpr, PARTS: gl.constexpr):
    """This consumer's 64 row scales of stage s, which the producer's TMA brought with its part of A.
    Loaded from global memory instead (a new 256-byte row segment every K step, an L2 round trip each under
    the GEMM's L2 load) they cost 6-13% of gate_up at 2048 tokens (NOTES_ffn.md run 18)."""
    return as_smem.index(PARTS * s + half).reshape([HALF_M]).load(gl.SliceLayout(1, ACC_LAYOUT))


# a part's row scales of a K step: a [1, 64] TMA box of a_scale_t [K/128, P] (256 bytes: no swizzle)
ROW_SCALES_LAYOUT = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=2)
SLOTS = gl.constexpr(2)  # tile ids in flight from the producer to the consumers
ONE_WARP = gl.constexpr(gl.BlockedLayout([1], [32], [1], [0]))
WARPGROUP = gl.constexpr(gl.BlockedLayout([1], [32], [4], [0]))


@gluon.jit
def _publish(sched, i, tile):
    """Producer: this CTA's i-th tile id into slot i % SLOTS once every consumer has read the slot's
    previous one."""
    tiles, full, free = sched
    s = i % SLOTS
    mbarrier.wait(free.index(s), ((i // SLOTS) & 1) ^ 1)  # the first round passes at once
    tiles.index(s).store(gl.full([1], tile, gl.int32, ONE_WARP))
    mbarrier.arrive(full.index(s), count=1)


@gluon.jit
def _take(sched, i):
    """Consumer: this CTA's i-th tile id, as the producer published it."""
    tiles, full, free = sched
    s = i % SLOTS
    mbarrier.wait(full.index(s), (i // SLOTS) & 1)
    tile = gl.max(tiles.index(s).load(WARPGROUP), axis=0)
    mbarrier.arrive(free.index(s), count=1)
    return tile


@gluon.jit
def _producer(loads, sched, counter_ptr, SWIGLU: gl.constexpr, QUANT: gl.constexpr, STAGES: gl.constexpr,
              GROUP_M: gl.constexpr, SKIP: gl.constexpr, PARTS: gl.constexpr):
    """Every TMA load of this CTA's tiles, through one STAGES-deep ring (global step counter): per step
    wait until every consumer released the stage, then A (PARTS 64-row parts; with SKIP only the live
    ones: padding ends a run, so they are a prefix) and B (SwiGLU: gate rows into the stage's first 64
    rows, up rows into the last 64). loads: the descriptors, the ring and the tile schedule's inputs."""
    (a_desc, b_desc, b2_desc, as_desc, a_smem, b_smem, as_smem, ready, empty, block_expert_ptr, rows_ptr,
     N, K, num_m, num_pairs, num_tiles) = loads
    SUB_N: gl.constexpr = 64 if SWIGLU else 128
    SUB: gl.constexpr = 2 if QUANT else 1
    B_BYTES: gl.constexpr = 128 * 128
    PART_BYTES: gl.constexpr = HALF_M * (128 + 4)  # a part's A rows and their scales
    step = 0
    n = 0
    tile = gl.atomic_add(counter_ptr, 1)
    while tile < num_tiles:
        _publish(sched, n, tile)
        off_m, off_b, pid_n, expert, k_tiles = _tile(tile, block_expert_ptr, N, K, num_m, SUB * SUB_N,
                                                      GROUP_M, PARTS * HALF_M)
        live1 = _live(rows_ptr, off_m, 1, num_pairs, SKIP)
        live2 = _live(rows_ptr, off_m, PARTS - 1, num_pairs, SKIP)  # the last part (the second of two)
        for i in range(SUB * k_tiles):
            j = i // k_tiles
            k = (i - j * k_tiles) * 128
            s = step % STAGES
            mbarrier.wait(empty.index(s), ((step // STAGES) & 1) ^ 1)  # the first round passes at once
            bar = ready.index(s)
            mbarrier.expect(bar, B_BYTES + PARTS * PART_BYTES, pred=live2)
            if PARTS == 3:
                mbarrier.expect(bar, B_BYTES + 2 * PART_BYTES, pred=live1 and not live2)
            mbarrier.expect(bar, B_BYTES + PART_BYTES, pred=not live1)
            for p in gl.static_range(PARTS):
                live = p == 0 or (p == 1 and live1) or (p == 2 and live2)
                tma_load(a_desc, [off_m + p * HALF_M, k], bar, a_smem.index(PARTS * s + p), pred=live)
                tma_load(as_desc, [k // 128, off_m + p * HALF_M], bar, as_smem.index(PARTS * s + p),
                         pred=live)
            load_b(b_desc, b2_desc, b_smem.index(s), bar, off_b, j, k, SWIGLU, SUB_N)
            step += 1
        n += 1
        tile = gl.atomic_add(counter_ptr, 1)
    _publish(sched, n, tile)  # past the end: the consumers stop


@gluon.jit
def _issue(a_smem, b_smem, ready, step, half: gl.constexpr, STAGES: gl.constexpr, PARTS: gl.constexpr, zero):
    """Wait for step's stage, then start its m64n128k128 wgmma chain (not waited for)."""
    s = step % STAGES
    mbarrier.wait(ready.index(s), (step // STAGES) & 1)
    return warpgroup_mma(a_smem.index(PARTS * s + half), b_smem.index(s).permute((1, 0)), zero, use_acc=False,
                         is_async=True)


@gluon.jit
def _step_done(t, step, acc, acc2, empty, as_smem, bs_ptr, b2s_ptr, base, stride_bsk, half: gl.constexpr,
               OUTSTANDING: gl.constexpr, SWIGLU: gl.constexpr, STAGES: gl.constexpr, PARTS: gl.constexpr):
    """Wait until step's chain t is done (OUTSTANDING younger chains may still run), release its stage,
    promote it."""
    b_s, b2_s = weight_scales(bs_ptr, b2s_ptr, step - base, stride_bsk, SWIGLU)
    a_s = _a_scales(as_smem, step % STAGES, half, PARTS)
    t = warpgroup_mma_wait(OUTSTANDING, deps=[t])
    release(empty.index(step % STAGES))
    return promote(t, acc, acc2, a_s, b_s, b2_s, SWIGLU)


@gluon.jit
def _deferred(base, k_tiles, acc, acc2, a_smem, b_smem, as_smem, ready, empty, bs_ptr, b2s_ptr, stride_bsk,
              half: gl.constexpr, SWIGLU: gl.constexpr, STAGES: gl.constexpr,
              PARTS: gl.constexpr, zero):
    """The K loop two steps at a time: both chains issued, then the first promoted while the second runs.
    No chain stays in flight across a loop boundary: a loop-carried copy of a running chain's registers
    makes ptxas serialize every wgmma of the kernel (C7514), as a one-step-skewed loop did."""
    for kb in range(0, k_tiles - 1, 2):
        t0 = _issue(a_smem, b_smem, ready, base + kb, half, STAGES, PARTS, zero)
        t1 = _issue(a_smem, b_smem, ready, base + kb + 1, half, STAGES, PARTS, zero)
        acc, acc2 = _step_done(t0, base + kb, acc, acc2, empty, as_smem, bs_ptr, b2s_ptr, base,
                               stride_bsk, half, 1, SWIGLU, STAGES, PARTS)
        acc, acc2 = _step_done(t1, base + kb + 1, acc, acc2, empty, as_smem, bs_ptr, b2s_ptr, base,
                               stride_bsk, half, 0, SWIGLU, STAGES, PARTS)
    if k_tiles % 2 == 1:
        t0 = _issue(a_smem, b_smem, ready, base + k_tiles - 1, half, STAGES, PARTS, zero)
        acc, acc2 = _step_done(t0, base + k_tiles - 1, acc, acc2, empty, as_smem, bs_ptr, b2s_ptr, base,
                               stride_bsk, half, 0, SWIGLU, STAGES, PARTS)
    return acc, acc2


@gluon.jit
def _k_loop(base, k_tiles, live, a_smem, b_smem, as_smem, ready, empty, bs_ptr, b2s_ptr, stride_bsk,
            half: gl.constexpr, SWIGLU: gl.constexpr, STAGES: gl.constexpr, DEFER: gl.constexpr,
            PARTS: gl.constexpr, layout: gl.constexpr, out_layout: gl.constexpr):
    """One sub-tile's K loop over global steps base .. base + k_tiles - 1 (fp8_gemm_ws._k_loop without the
    loads). DEFER: step k + 1's wgmma chain is issued before step k's promotion (two fp32 temporaries, so
    this warpgroup keeps the tensor cores busy while it promotes); else each chain is waited for at once.
    Not live: only wait for each stage and release it (the accumulator stays zero)."""
    zero = gl.zeros([HALF_M, 128], gl.float32, layout)
    if SWIGLU:
        acc, acc2 = _halves(zero)
    else:
        acc = zero
        acc2 = zero
    if live:
        if DEFER:
            acc, acc2 = _deferred(base, k_tiles, acc, acc2, a_smem, b_smem, as_smem, ready, empty, bs_ptr,
                                  b2s_ptr, stride_bsk, half, SWIGLU, STAGES, PARTS, zero)
        else:
            for kb in range(k_tiles):
                step = base + kb
                s = step % STAGES
                b_s, b2_s = weight_scales(bs_ptr, b2s_ptr, kb, stride_bsk, SWIGLU)
                mbarrier.wait(ready.index(s), (step // STAGES) & 1)
                a_s = _a_scales(as_smem, s, half, PARTS)
                t = _mma(a_smem.index(PARTS * s + half), b_smem.index(s), zero)
                release(empty.index(s))
                acc, acc2 = promote(t, acc, acc2, a_s, b_s, b2_s, SWIGLU)
    else:
        for kb in range(k_tiles):
            step = base + kb
            mbarrier.wait(ready.index(step % STAGES), (step // STAGES) & 1)
            release(empty.index(step % STAGES))
    if SWIGLU:
        acc = gl.convert_layout(acc / (1.0 + gl.exp(-acc)) * acc2, out_layout)
    return acc


@gluon.jit
def _consumer(half: gl.constexpr, bufs, args, sched, SWIGLU: gl.constexpr, WEIGHTED: gl.constexpr,
              QUANT: gl.constexpr, STAGES: gl.constexpr, GROUP_M: gl.constexpr, SKIP: gl.constexpr,
              DEFER: gl.constexpr, PARTS: gl.constexpr):
    """Rows 64 half .. 64 half + 63 of every tile of this CTA: K loop(s), then the epilogue (the producer
    meanwhile fills the stages of the next tile). bufs: the ring; args: the kernel's pointers and sizes."""
    a_smem, b_smem, as_smem, ready, empty = bufs
    (bs_ptr, b2s_ptr, c_ptr, cs_ptr, block_expert_ptr, rows_ptr, topk_w_ptr, N, K, num_m, num_pairs,
     num_tiles, stride_bse, stride_bsn, stride_bsk, stride_cm, stride_csg) = args
    layout: gl.constexpr = ACC_LAYOUT
    out_layout: gl.constexpr = H_LAYOUT
    SUB_N: gl.constexpr = 64 if SWIGLU else 128
    SUB: gl.constexpr = 2 if QUANT else 1
    TILE_N: gl.constexpr = SUB * SUB_N
    lay: gl.constexpr = out_layout if SWIGLU else layout
    step = 0
    n = 0
    tile = _take(sched, n)
    while tile < num_tiles:
        off_m, off_b, pid_n, expert, k_tiles = _tile(tile, block_expert_ptr, N, K, num_m, TILE_N, GROUP_M,
                                                      PARTS * HALF_M)
        live = _live(rows_ptr, off_m, half, num_pairs, SKIP)
        offs_m = off_m + half * HALF_M + gl.arange(0, HALF_M, layout=gl.SliceLayout(1, layout))
        scale_off = expert.to(gl.int64) * stride_bse + (pid_n * TILE_N // 128) * stride_bsn
        bs, b2s = bs_ptr + scale_off, b2s_ptr + scale_off
        acc = _k_loop(step, k_tiles, live, a_smem, b_smem, as_smem, ready, empty, bs, b2s, stride_bsk, half,
                      SWIGLU, STAGES, DEFER, PARTS, layout, out_layout)
        step += k_tiles
        h1 = acc
        if QUANT:  # the second 64 columns of h
            h1 = _k_loop(step, k_tiles, live, a_smem, b_smem, as_smem, ready, empty, bs, b2s, stride_bsk,
                         half, SWIGLU, STAGES, DEFER, PARTS, layout, out_layout)
            step += k_tiles
        _store(acc, h1, offs_m, pid_n, c_ptr, cs_ptr, rows_ptr, topk_w_ptr, num_pairs, stride_cm, stride_csg,
               SWIGLU, WEIGHTED, QUANT, TILE_N, SUB_N, lay)
        n += 1
        tile = _take(sched, n)


@gluon.jit
def _wsp_gemm_kernel(a_desc, as_desc, b_desc, b2_desc, bs_ptr, b2s_ptr, c_ptr, cs_ptr, block_expert_ptr,
                     rows_ptr, topk_w_ptr, counter_ptr, N, K, num_m, num_pairs, num_tiles, stride_bse,
                     stride_bsn, stride_bsk, stride_cm, stride_csg,
                     SWIGLU: gl.constexpr, WEIGHTED: gl.constexpr, QUANT: gl.constexpr, STAGES: gl.constexpr,
                     GROUP_M: gl.constexpr, SKIP: gl.constexpr, DEFER: gl.constexpr, PARTS: gl.constexpr,
                     CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr):
    a_smem, b_smem, ready, empty = smem_ring(a_desc, b_desc, STAGES, PARTS)
    as_smem = gl.allocate_shared_memory(gl.float32, [PARTS * STAGES, 1, HALF_M], as_desc.layout)
    bufs = (a_smem, b_smem, as_smem, ready, empty)
    tile_ids = gl.allocate_shared_memory(gl.int32, [SLOTS, 1], gl.SwizzledSharedLayout(1, 1, 1, order=[0]))
    full = gl.allocate_shared_memory(gl.int64, [SLOTS, 1], mbarrier.MBarrierLayout())
    free = gl.allocate_shared_memory(gl.int64, [SLOTS, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(SLOTS):
        mbarrier.init(full.index(i), count=1)
        mbarrier.init(free.index(i), count=PARTS)  # every consumer warpgroup reads each tile id
    sched = (tile_ids, full, free)
    args = (bs_ptr, b2s_ptr, c_ptr, cs_ptr, block_expert_ptr, rows_ptr, topk_w_ptr, N, K, num_m, num_pairs,
            num_tiles, stride_bse, stride_bsn, stride_bsk, stride_cm, stride_csg)
    # the tuples are written out: the frontend takes no *args, and a tuple built by concatenation turns
    # constexprs into tensors
    loads = (a_desc, b_desc, b2_desc, as_desc, a_smem, b_smem, as_smem, ready, empty, block_expert_ptr,
             rows_ptr, N, K, num_m, num_pairs, num_tiles)
    if PARTS == 2:
        gl.warp_specialize([
            (_consumer, (0, bufs, args, sched, SWIGLU, WEIGHTED, QUANT, STAGES, GROUP_M, SKIP, DEFER, PARTS)),
            (_consumer, (1, bufs, args, sched, SWIGLU, WEIGHTED, QUANT, STAGES, GROUP_M, SKIP, DEFER, PARTS)),
            (_producer, (loads, sched, counter_ptr, SWIGLU, QUANT, STAGES, GROUP_M, SKIP, PARTS)),
        ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])
    else:
        gl.warp_specialize([
            (_consumer, (0, bufs, args, sched, SWIGLU, WEIGHTED, QUANT, STAGES, GROUP_M, SKIP, DEFER, PARTS)),
            (_consumer, (1, bufs, args, sched, SWIGLU, WEIGHTED, QUANT, STAGES, GROUP_M, SKIP, DEFER, PARTS)),
            (_consumer, (2, bufs, args, sched, SWIGLU, WEIGHTED, QUANT, STAGES, GROUP_M, SKIP, DEFER, PARTS)),
            (_producer, (loads, sched, counter_ptr, SWIGLU, QUANT, STAGES, GROUP_M, SKIP, PARTS)),
        ], [4, 4, 1], [CONSUMER_REGS, CONSUMER_REGS, PRODUCER_REGS])


_SMS: dict[int, int] = {}  # multiprocessors per device index (the tests pretend to have fewer)


def sm_count(device: torch.device) -> int:
    """The persistent grid's size: the device's multiprocessor count (one CTA each), asked once."""
    dev = device.index if device.index is not None else torch.cuda.current_device()
    if dev not in _SMS:
        _SMS[dev] = torch.cuda.get_device_properties(dev).multi_processor_count
    return _SMS[dev]


def wsp_grouped_gemm(a: torch.Tensor, a_scale_t: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                     out: torch.Tensor, block_expert: torch.Tensor, rows: torch.Tensor, num_pairs: int, *,
                     b2: torch.Tensor | None = None, b2_scale: torch.Tensor | None = None,
                     out_scale_t: torch.Tensor | None = None, topk_weights: torch.Tensor | None = None,
                     block_m: int = 128, group_m: int = 8, num_stages: int = 4, skip: bool = True,
                     defer: bool = False, producer_regs: int = 24) -> torch.Tensor:
    """fp8_gemm_ws.ws_grouped_gemm's contract (same operands and outputs) on the persistent kernel; rows
    (the pair of each A row, padding >= num_pairs) is needed in every mode here (SKIP reads it).
    block_m 128 or 192: two or three consumer warpgroups of 64 rows; the three share 64K registers with
    the producer's warpgroup, 160 each, too few for defer's two temporaries."""
    E, N, K = b.shape
    quant = out_scale_t is not None
    parts = block_m // 64
    assert block_m in (128, 192) and not (defer and parts == 3)
    assert N % 128 == 0 and K % 128 == 0 and a.shape[0] == block_m * block_expert.numel() == rows.numel()
    assert a_scale_t.stride(1) == 1 and (not quant or (b2 is not None and out_scale_t.stride(1) == 1))
    assert (b2 is None) == (not quant) and (topk_weights is None) == quant  # QUANT gate_up or WEIGHTED down
    a_desc, b_desc, b2_desc = descriptors(a, b, b2)
    as_desc = TensorDescriptor.from_tensor(a_scale_t, [1, 64], ROW_SCALES_LAYOUT)
    num_tiles = block_expert.numel() * (N // 128)
    _wsp_gemm_kernel[(max(1, min(num_tiles, sm_count(a.device))),)](
        a_desc, as_desc, b_desc, b2_desc, b_scale, b_scale if b2_scale is None else b2_scale, out,
        out_scale_t if quant else a_scale_t, block_expert, rows,
        topk_weights if topk_weights is not None else a_scale_t,
        torch.zeros(1, dtype=torch.int32, device=a.device), N, K, block_expert.numel(),
        num_pairs, num_tiles,
        b_scale.stride(0), b_scale.stride(1), b_scale.stride(2), out.stride(0),
        out_scale_t.stride(0) if quant else 0, num_warps=4,
        **kernel_constexprs(quant, topk_weights is not None, block_m, group_m, num_stages, skip, defer,
                            producer_regs),
    )
    return out


def kernel_constexprs(quant: bool, weighted: bool, block_m: int, group_m: int, num_stages: int, skip: bool,
                      defer: bool, producer_regs: int = 24) -> dict:
    """`_wsp_gemm_kernel`'s compile-time arguments for a launch (also what tests compile it with): QUANT is
    the gate_up GEMM (SwiGLU, h quantized), WEIGHTED the down GEMM (weighted scatter)."""
    parts = block_m // 64
    return dict(SWIGLU=quant, WEIGHTED=weighted, QUANT=quant, STAGES=num_stages, GROUP_M=group_m, SKIP=skip,
                DEFER=defer, PARTS=parts, PRODUCER_REGS=producer_regs,
                # the SM's 64K registers over PARTS + 1 warpgroups of 128 threads, in setmaxnreg's steps of 8
                CONSUMER_REGS=(65536 // 128 - producer_regs) // parts // 8 * 8)

"""The Gluon FP8 decode kernel (mfa_decode_ws.py, Hopper + GLUON_TRITONS) vs the float64 reference."""

import pytest
import torch
from paged_inputs import DEVICE, boundary_lengths, random_paged_cache, rel_err

from runtime.kernels.fp8_linear import gluon_usable
from runtime.kernels.kv_cache import FP8_DTYPE
from runtime.kernels.mfa_decode import mfa_decode, mfa_decode_ref
from runtime.kernels.mfa_plan import plan_decode, ws_decode_usable

GLUON_GPU = torch.cuda.is_available() and gluon_usable(torch.device("cuda"))
gluon_gpu = pytest.mark.skipif(not GLUON_GPU, reason="needs Hopper and a Triton of GLUON_TRITONS (Gluon)")
TOL = 1e-2


def _plan(batch, longest, page, **kw):
    kw = dict(block_n=64, num_stages=3, chunk_max=2048, tile_page=2, qk_fp8=2, gluon=1) | kw  # the plan's pdl
    return plan_decode(batch, longest, 256, DEVICE, FP8_DTYPE, page, min_split_tokens=64, **kw)


def _check(q, cache, table, lens, plan):
    """The Gluon launch against float64 and against the Triton kernel with the same q split (qk_fp8 2)."""
    assert plan.gluon in (1, 2) and ws_decode_usable(q, cache)
    out = mfa_decode(q, cache, table, lens, plan=plan)
    ref = mfa_decode_ref(q, cache, table, lens)
    triton_out = mfa_decode(q, cache, table, lens, plan=plan_decode(
        q.shape[0], int(lens.max()), 256, DEVICE, FP8_DTYPE, cache.block_size, qk_fp8=2,
        num_splits=plan.num_splits))
    assert out.isfinite().all()
    assert rel_err(out, ref) < TOL
    assert rel_err(out, triton_out) < 5e-3  # the same split q and E4M3 dots: only summation order differs
    return out


@pytest.mark.gpu
@gluon_gpu
@pytest.mark.parametrize("page, stages, gluon", [(16, 3, 1), (32, 3, 2), (64, 4, 1), (64, 4, 2), (16, 4, 1),
                                                 (16, 4, 2)])
@pytest.mark.parametrize("num_splits", [1, 3, None], ids=["direct", "split3", "auto"])
def test_ws_decode_matches_reference(page, stages, gluon, num_splits):
    """Step-3's 64 heads x 256, random shuffled block tables, lengths 1, page, page + 1, 2 page - 1, random
    ones up to 9 tiles and 9 tiles - 5 (tiles that end mid-tile, mid-page, on a page; empty splits; 1 to 9
    tiles a split, so gluon 2 runs 0 to 4 tile pairs and the odd tile), one split to auto, 3 and 4 stages
    (the library's launch). The 571-token sequence makes 3 splits exist: without it the longest drawn can
    be 193 tokens, 2 splits of 128 (run 8's one failure, gluon 2 at split3-16-4, was this assert)."""
    gen = torch.Generator().manual_seed(page + stages + (num_splits or 0))
    lengths = boundary_lengths(page, 9, gen, longest=9 * 64) + [9 * 64 - 5]
    cache, table, lens = random_paged_cache(lengths, 256, page, FP8_DTYPE, gen)
    q = torch.randn(len(lengths), 64, 256, generator=gen).to(torch.bfloat16).to(DEVICE)
    plan = _plan(len(lengths), max(lengths), page, num_splits=num_splits, num_stages=stages, gluon=gluon)
    assert num_splits is None or plan.num_splits == num_splits
    _check(q, cache, table, lens, plan)



@pytest.mark.gpu
@gluon_gpu
@pytest.mark.parametrize("heads, gluon", [(64, 1), (40, 2)])
def test_ws_decode_ignores_nan_past_the_end(heads, gluon):
    """Rows past each sequence's end (the rest of its last page, which the TMA boxes still read) hold NaN
    codes in K and V: the output must not see them (masked scores, zeroed V rows); 40 heads: padded rows
    dropped."""
    gen = torch.Generator().manual_seed(heads)
    page = 16
    lengths = [1, 17, 64 + 3, 130, 200]
    cache, table, lens = random_paged_cache(lengths, 256, page, FP8_DTYPE, gen)
    for b, n in enumerate(lengths):
        if n % page:
            blk = int(table[b, n // page])
            cache.k[blk, n % page:].view(torch.uint8).fill_(0x7F)  # E4M3 NaN
            cache.v[blk, n % page:].view(torch.uint8).fill_(0xFF)
    q = (torch.randn(len(lengths), heads, 256, generator=gen) * 3).to(torch.bfloat16).to(DEVICE)
    for splits in (1, 2):
        _check(q, cache, table, lens, _plan(len(lengths), max(lengths), page, num_splits=splits, gluon=gluon))


@pytest.mark.gpu
@gluon_gpu
@pytest.mark.parametrize("page", [16, 64])
def test_ws_decode_garbage_table_past_the_end(page):
    """Block-table entries past each sequence's last page hold anything a scheduler may leave there: -1, ids
    far beyond the cache, and a block of NaN codes. A kernel may read them (a tile's boxes past the end) but
    the output must not depend on them."""
    gen = torch.Generator().manual_seed(31 + page)
    lengths = [1, page - 1, page + 1, 70, 129, 640]
    cache, table, lens = random_paged_cache(lengths, 256, page, FP8_DTYPE, gen)
    nan_block, free = int(table[-1, 0]), min(set(range(cache.k.shape[0])) - set(table.flatten().tolist()))
    table[-1, 0] = free  # the longest sequence's first page moves to a block no table entry names ...
    cache.k[free].copy_(cache.k[nan_block])
    cache.v[free].copy_(cache.v[nan_block])
    cache.k[nan_block].view(torch.uint8).fill_(0x7F)  # ... and its old one becomes NaN codes
    cache.v[nan_block].view(torch.uint8).fill_(0xFF)
    junk = torch.tensor([-1, 2**30, nan_block, 10**9], dtype=torch.int32, device=DEVICE)
    for b, n in enumerate(lengths):
        used = -(-n // page)
        table[b, used:] = junk[torch.arange(table.shape[1] - used, device=DEVICE) % 4]
    q = torch.randn(len(lengths), 64, 256, generator=gen).to(torch.bfloat16).to(DEVICE)
    for splits in (1, 3):
        _check(q, cache, table, lens, _plan(len(lengths), max(lengths), page, num_splits=splits))


@pytest.mark.gpu
@gluon_gpu
def test_ws_decode_holds_a_large_v_scale():
    """v_scale 300 puts V at up to 134,400, twice fp16's range: direct and split launches (their partials and
    the merge) must agree with float64."""
    gen = torch.Generator().manual_seed(23)
    lengths = [64, 700, 1, 1500]
    cache, table, lens = random_paged_cache(lengths, 256, 64, FP8_DTYPE, gen)
    cache.v_scale.fill_(300.0)
    q = torch.randn(len(lengths), 64, 256, generator=gen).to(torch.bfloat16).to(DEVICE)
    for splits in (1, 4):
        out = _check(q, cache, table, lens, _plan(len(lengths), max(lengths), 64, num_splits=splits))
        assert out.abs().max() > 65504 / 8


@pytest.mark.gpu
@gluon_gpu
@pytest.mark.parametrize("gluon", [1, 2])
def test_ws_decode_rising_scores(gluon):
    """The lazy rescale (`mfa_decode_ws._softmax`): K rows grow along each sequence (x 0.2 -> 3.2, one falls),
    and q's heads have scales 0.5-4, so the rows' maxima pass their reference by > 2^8 several times deep in
    a split for some heads and never for others, in the same warps (mixed skip / rescale votes)."""
    gen = torch.Generator().manual_seed(11 + gluon)
    lengths = [3000, 1500, 700]
    cache, table, lens = random_paged_cache(lengths, 256, 64, FP8_DTYPE, gen)
    for b, n in enumerate(lengths):
        ramp = torch.linspace(0.2, 3.2, n) if b < 2 else torch.linspace(3.2, 0.2, n)
        for t0 in range(0, n, 64):
            blk, rows = int(table[b, t0 // 64]), min(64, n - t0)
            k = cache.k[blk, :rows].float() * ramp[t0:t0 + rows, None].to(DEVICE)
            cache.k[blk, :rows] = k.clamp(-448, 448).to(FP8_DTYPE)
    head_scale = 0.5 + 3.5 * torch.rand(64, 1, generator=gen)
    q = (torch.randn(len(lengths), 64, 256, generator=gen) * head_scale).to(torch.bfloat16).to(DEVICE)
    for splits in (1, None):
        _check(q, cache, table, lens, _plan(len(lengths), max(lengths), 64, num_splits=splits, gluon=gluon))


@pytest.mark.gpu
@gluon_gpu
@pytest.mark.parametrize("gluon, vec, stages", [(1, 8, 4), (2, 8, 3), (2, 8, 4), (1, 16, 3)])
def test_ws_decode_long_sequences(gluon, vec, stages):
    """Long splits (many pipeline rounds through the stage rings) and a lone long sequence: 2 x 5000 tokens in
    one split each, 1 x 32K with the planner's own split count; 3 K / V + 3 fp16 V stages (the library's
    launch) and 4 + 2, both loop bodies, and run 8's converter layout (vec 16)."""
    gen = torch.Generator().manual_seed(7 + gluon + vec + stages)
    for lengths, splits in (([5000, 4999], 1), ([32768], None)):
        cache, table, lens = random_paged_cache(lengths, 256, 64, FP8_DTYPE, gen)
        q = torch.randn(len(lengths), 64, 256, generator=gen).to(torch.bfloat16).to(DEVICE)
        _check(q, cache, table, lens, _plan(len(lengths), max(lengths), 64, num_stages=stages,
                                            num_splits=splits, gluon=gluon, gluon_vec=vec))


def test_ws_plan_and_guard():
    """gluon holds only with the E4M3 q K^T (qk_fp8 2) on a GPU (the library's FP8 launch from
    QK8_MIN_TOKENS); off Hopper + a Triton of GLUON_TRITONS, or for shapes the kernel does not take
    (head_dim 64, 16 heads; an fp32 q, whose output would not fit the shared memory it is staged in), the
    guard says no and mfa_decode runs the Triton kernel."""
    gpu = torch.device("cuda")
    assert plan_decode(256, 4096, 256, gpu, FP8_DTYPE, 64, num_splits=1).gluon == 2  # tile pairs
    assert plan_decode(8, 2048, 256, gpu, FP8_DTYPE, 64, num_splits=16).gluon == 0  # < QK8_MIN_TOKENS
    assert plan_decode(256, 4096, 256, gpu, torch.bfloat16, 64, num_splits=1, gluon=1).gluon == 0
    assert plan_decode(256, 4096, 256, gpu, FP8_DTYPE, 64, num_splits=1, qk_fp8=2, gluon=1).gluon == 1
    assert plan_decode(256, 4096, 256, gpu, FP8_DTYPE, 64, num_splits=1, qk_fp8=0, gluon=1).gluon == 0
    assert plan_decode(256, 4096, 256, torch.device("cpu"), FP8_DTYPE, 64, qk_fp8=2, gluon=1).gluon == 0
    gen = torch.Generator().manual_seed(3)
    cache, table, lens = random_paged_cache([40, 7], 64, 16, FP8_DTYPE, gen)
    q = torch.randn(2, 16, 64, generator=gen).to(torch.bfloat16).to(DEVICE)
    assert not ws_decode_usable(q, cache)
    cache64, _, _ = random_paged_cache([40, 7], 256, 16, FP8_DTYPE, gen)
    q64 = torch.randn(2, 64, 256, generator=gen).to(DEVICE)
    assert ws_decode_usable(q64.bfloat16(), cache64) == GLUON_GPU
    assert not ws_decode_usable(q64, cache64)
    plan = plan_decode(2, 40, 64, DEVICE, FP8_DTYPE, 16, num_splits=2, qk_fp8=2, gluon=1)
    assert rel_err(mfa_decode(q, cache, table, lens, plan=plan), mfa_decode_ref(q, cache, table, lens)) < TOL

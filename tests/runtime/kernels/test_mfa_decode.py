"""Paged split-K MFA decode kernel vs the float64 reference (and the eager model's attention)."""

import pytest
import torch
from paged_inputs import DEVICE, boundary_lengths, random_paged_cache, rel_err

from converters.errors import Step3Error
from runtime.kernels.kv_cache import FP8_DTYPE, PagedKVCache, write_kv_ref
from runtime.kernels.mfa_decode import _split_q, mfa_decode, mfa_decode_ref, partial_dtype
from runtime.kernels.mfa_plan import MAX_CHUNK_PAGES, QK8_MIN_TOKENS, _pick_splits, plan_decode
from runtime.model import reference

# bf16 q/out: the output's own rounding (the CPU interpreter truncates) dominates; fp32 q on the CPU
# runs the kernel in fp32 throughout, while on the GPU the dots take bf16 operands.
TOL_BF16, TOL_FP32 = 1e-2, (1e-2 if DEVICE.type == "cuda" else 1e-5)


def _run(heads, head_dim, page, dtype, q_dtype, num_splits, seed, count=7, **plan_kw):
    gen = torch.Generator().manual_seed(seed)
    lengths = boundary_lengths(page, count, gen, longest=5 * page)
    cache, block_table, seq_lens = random_paged_cache(lengths, head_dim, page, dtype, gen)
    q = torch.randn(len(lengths), heads, head_dim, generator=gen).to(q_dtype).to(DEVICE)
    plan = plan_decode(len(lengths), max(lengths), head_dim, DEVICE, dtype, page, num_splits=num_splits,
                       block_n=None if num_splits is None else 16, chunk_max=0 if num_splits == 1 else None,
                       min_split_tokens=16, **plan_kw)
    out = mfa_decode(q, cache, block_table, seq_lens, max_seq_len=max(lengths), plan=plan)
    assert out.shape == q.shape and out.dtype == q.dtype
    return rel_err(out, mfa_decode_ref(q, cache, block_table, seq_lens))


@pytest.mark.parametrize("dtype", [torch.bfloat16, FP8_DTYPE], ids=["bf16", "fp8"])
@pytest.mark.parametrize("page", [16, 32, 64])
@pytest.mark.parametrize("num_splits", [1, 3, None], ids=["direct-gather", "split3-chunked", "auto-chunked"])
def test_decode_matches_reference(dtype, page, num_splits):
    err = _run(4, 64, page, dtype, torch.bfloat16, num_splits, seed=page + (num_splits or 0))
    assert err < TOL_BF16


@pytest.mark.parametrize("dtype", [torch.bfloat16, FP8_DTYPE], ids=["bf16", "fp8"])
@pytest.mark.parametrize("page, block_n, tile_page", [(16, 16, 1), (64, 32, 2), (16, 16, 2), (16, 32, 1),
                                                     (16, 32, 2), (16, 64, 2)])
def test_decode_tile_page(dtype, page, block_n, tile_page):
    """Scalar page ids per tile, one per page the tile covers (block_n > page: 2 or 4 whole pages; 2: full
    tiles unmasked, the partial one peeled, its page ids gathered per row): chunks of several
    shuffled pages (tokens_per_split 4 x page, chunk up to 128 tokens), lengths ending mid-tile, mid-page,
    on split boundaries, and shorter than a split's start (empty splits)."""
    gen = torch.Generator().manual_seed(page + block_n)
    lengths = [1, page, page + 1, 3 * page - 1, 8 * page, 8 * page - 5, 4 * page + 1]
    cache, block_table, seq_lens = random_paged_cache(lengths, 64, page, dtype, gen)
    q = torch.randn(len(lengths), 4, 64, generator=gen).to(torch.bfloat16).to(DEVICE)
    plan = plan_decode(len(lengths), 8 * page, 64, DEVICE, dtype, page, num_splits=2, block_n=block_n,
                       chunk_max=128, tile_page=tile_page)
    assert plan.tile_page == tile_page and plan.tokens_per_split == max(4 * page, block_n)
    assert plan.chunk // page >= 2
    out = mfa_decode(q, cache, block_table, seq_lens, plan=plan)
    assert rel_err(out, mfa_decode_ref(q, cache, block_table, seq_lens)) < TOL_BF16


@pytest.mark.parametrize("dtype", [torch.bfloat16, FP8_DTYPE], ids=["bf16", "fp8"])
@pytest.mark.parametrize("num_splits", [1, 2, 5])
@pytest.mark.parametrize("pdl", [1, 2], ids=["trigger-early", "trigger-late"])
def test_decode_pdl(dtype, num_splits, pdl):
    """Both kernels as programmatic dependent launches (GPU; off the GPU the plan drops pdl), the next launch
    let in at the decode's start or after its loop: random lengths incl. 1, page boundaries and empty
    splits, and three calls in a row on one stream, each waiting on the one before, with new lengths each."""
    gen = torch.Generator().manual_seed(200 + num_splits)
    page = 16
    for call in range(3):
        lengths = boundary_lengths(page, 9, gen, longest=16 * page)
        cache, block_table, seq_lens = random_paged_cache(lengths, 64, page, dtype, gen)
        q = torch.randn(len(lengths), 5, 64, generator=gen).to(torch.bfloat16).to(DEVICE)
        plan = plan_decode(len(lengths), max(lengths), 64, DEVICE, dtype, page, num_splits=num_splits,
                           block_n=16, chunk_max=64, tile_page=2 * (call % 2), pdl=pdl)
        assert plan.num_splits <= num_splits and plan.pdl == (pdl if DEVICE.type == "cuda" else 0)
        out = mfa_decode(q, cache, block_table, seq_lens, plan=plan)
        assert rel_err(out, mfa_decode_ref(q, cache, block_table, seq_lens)) < TOL_BF16, call


@pytest.mark.parametrize("page, num_splits", [(16, 1), (32, 3), (64, None)],
                         ids=["direct", "split3", "auto"])
def test_decode_qk_fp8_matches_reference(page, num_splits):
    """FP8 cache, q K^T as E4M3 dots of q split into hi + lo by the pre-pass (on the CPU the split is exact
    E4M3 values, the dots fp32): within bf16's tolerance, where hi alone would be 2-5% off
    (test_split_q_needs_the_lo_part)."""
    err = _run(4, 64, page, FP8_DTYPE, torch.bfloat16, num_splits, seed=3 * page + 2, qk_fp8=2)
    assert err < TOL_BF16


def test_split_q_needs_the_lo_part():
    """The pre-pass's split, per head: q ~= s (hi + lo) to ~2^-8, while hi alone is off by > 1%, so a
    kernel that dropped lo would fail the tolerance above; hi and lo are E4M3 values within +-448 and the
    padded heads are 0. (On the H200 an E4M3 round trip inside this kernel once gave lo garbage.)"""
    gen = torch.Generator().manual_seed(9)
    q = (torch.randn(3, 5, 64, generator=gen) * torch.tensor([1e-3, 1.0, 7.0, 300.0, 1e5]).view(1, 5, 1))
    cache = PagedKVCache.allocate(1, 16, 64, FP8_DTYPE, DEVICE)
    q8, qs = _split_q(q.to(torch.bfloat16).to(DEVICE), 16, cache, pdl=False)
    q8, qs, q = q8.float().cpu(), qs.cpu(), q.to(torch.bfloat16).double()
    hi, lo = q8[:, 0, :5].double(), q8[:, 1, :5].double()
    for part in (hi, lo):  # E4M3 values: exact after a round trip through the FP8 type
        assert part.abs().max() <= 448 and torch.equal(part.to(FP8_DTYPE).double(), part)
    scale = qs[:, :5, None].double()
    for h in range(5):
        assert rel_err(scale[:, h] * (hi[:, h] + lo[:, h]), q[:, h]) < 2 ** -7, h
        assert rel_err(scale[:, h] * hi[:, h], q[:, h]) > 1e-2, h
    assert not q8[:, :, 5:].any()


@pytest.mark.parametrize("qk_fp8", [0, 2])
def test_decode_fp8_split_holds_a_large_v_scale(qk_fp8):
    """With v_scale 300, V reaches 134,400 (twice fp16's range): the fp16 split partials hold O / l in the
    cache's units and the merge applies v_scale, so the output must still be right."""
    gen = torch.Generator().manual_seed(13 + qk_fp8)
    cache, block_table, seq_lens = random_paged_cache([40, 129, 1, 97], 64, 32, FP8_DTYPE, gen)
    cache.v_scale.fill_(300.0)
    assert partial_dtype(cache, torch.bfloat16) == torch.float16
    assert partial_dtype(cache, torch.float32) == torch.float32
    q = torch.randn(4, 4, 64, generator=gen).to(torch.bfloat16).to(DEVICE)
    plan = plan_decode(4, 129, 64, DEVICE, FP8_DTYPE, 32, num_splits=3, qk_fp8=qk_fp8)
    out = mfa_decode(q, cache, block_table, seq_lens, plan=plan)
    ref = mfa_decode_ref(q, cache, block_table, seq_lens)
    assert ref.abs().max() > 65504 / 8 and out.isfinite().all()
    assert rel_err(out, ref) < TOL_BF16


def test_decode_qk_fp8_per_head_scale(qk_fp8=2):
    """Heads whose q spans 1e-3..1e5 (beyond fp16) keep their accuracy: the split scales q per head."""
    gen = torch.Generator().manual_seed(5)
    cache, block_table, seq_lens = random_paged_cache([40, 129, 1], 64, 32, FP8_DTYPE, gen)
    gains = torch.tensor([1e-3, 1.0, 30.0, 1e5]).view(1, 4, 1)
    q = (torch.randn(3, 4, 64, generator=gen) * gains).to(torch.bfloat16).to(DEVICE)
    plan = plan_decode(3, 129, 64, DEVICE, FP8_DTYPE, 32, num_splits=2, qk_fp8=qk_fp8)
    assert plan.qk_fp8 == qk_fp8 and plan.num_splits == 2
    out = mfa_decode(q, cache, block_table, seq_lens, plan=plan)
    ref = mfa_decode_ref(q, cache, block_table, seq_lens)
    for h in range(4):  # per head: a large head's error must not hide a small head's
        assert rel_err(out[:, h], ref[:, h]) < TOL_BF16, h
    assert plan_decode(3, 129, 64, DEVICE, torch.bfloat16, 32, qk_fp8=qk_fp8).qk_fp8 == 0  # BF16: no split


def test_plan_gpu_fp8_launch_by_size():
    """On the GPU an FP8 cache takes the E4M3 q K^T launch (the Gluon kernel) from QK8_MIN_TOKENS cached
    tokens per call and the fp16-dot launch below (its short programs win where a sequence is split into many
    1-4-tile pieces); BF16 never splits q. (num_splits is given so that no GPU is asked for its SM count:
    this runs anywhere.)"""
    gpu = torch.device("cuda")
    big = plan_decode(256, 4096, 256, gpu, FP8_DTYPE, 64, num_splits=1)
    at = plan_decode(8, QK8_MIN_TOKENS // 8, 256, gpu, FP8_DTYPE, 64, num_splits=16)
    below = plan_decode(8, QK8_MIN_TOKENS // 16, 256, gpu, FP8_DTYPE, 64, num_splits=16)
    one = plan_decode(1, QK8_MIN_TOKENS // 2, 256, gpu, FP8_DTYPE, 64, num_splits=64)
    assert (big.qk_fp8, big.tile_page, at.qk_fp8) == (2, 2, 2)
    assert (below.qk_fp8, below.tile_page, one.qk_fp8) == (0, 0, 0)
    assert plan_decode(256, 4096, 256, gpu, torch.bfloat16, 64, num_splits=1).qk_fp8 == 0
    assert plan_decode(8, 1024, 256, gpu, FP8_DTYPE, 64, num_splits=4, qk_fp8=2).qk_fp8 == 2  # override


def test_plan_pdl_trigger():
    """Where PDL lets the next launch in (`mfa_plan._pick_pdl`, NOTES_mfa.md runs 21-22): the Gluon launch
    at once at one split, after its loop at 2-16 splits, not at all beyond; BF16 after its loop at 2-16
    splits, at once elsewhere; the FP8 small-shape launch at once; a pdl given is kept, none on the CPU."""
    gpu = torch.device("cuda")

    def pdl(batch, ctx, dtype, splits, **kw):
        return plan_decode(batch, ctx, 256, gpu, dtype, 64, num_splits=splits, **kw).pdl

    assert {plan_decode(128, 32768, 256, gpu, FP8_DTYPE, 64, num_splits=s).gluon for s in (1, 16, 64)} == {2}
    assert [pdl(128, 32768, FP8_DTYPE, s) for s in (1, 2, 16, 17, 64)] == [1, 2, 2, 0, 0]
    assert [pdl(8, 8192, torch.bfloat16, s) for s in (1, 2, 16, 32, 128)] == [1, 2, 2, 1, 1]
    assert [pdl(8, 1024, FP8_DTYPE, s) for s in (1, 16)] == [1, 1]  # below QK8_MIN_TOKENS: the Triton launch
    assert plan_decode(128, 1024 * 32, 256, gpu, FP8_DTYPE, 64, num_splits=1, pdl=0).pdl == 0
    assert pdl(8, 8192, torch.bfloat16, 4, pdl=1) == 1
    assert plan_decode(128, 1024 * 32, 256, torch.device("cpu"), FP8_DTYPE, 64, num_splits=1).pdl == 0


def test_plan_caps_the_chunk_in_pages():
    cpu = torch.device("cpu")
    assert plan_decode(256, 4096, 256, cpu, page=64, chunk_max=4096).chunk == 4096
    assert plan_decode(256, 4096, 256, cpu, page=16, chunk_max=4096).chunk == 16 * MAX_CHUNK_PAGES


STEP3_LAUNCHES = {"bf16": (torch.bfloat16, None), "fp8": (FP8_DTYPE, None),
                  "bf16-tile-page2": (torch.bfloat16, (32, None, 2)),
                  "fp8-tile-page2": (FP8_DTYPE, (32, None, 2)),
                  "fp8-fp16-dots": (FP8_DTYPE, (32, 3, 0, 0)),
                  "fp8-qk8prepass": (FP8_DTYPE, (32, 3, 2, 2)),
                  "fp8-64-qk8prepass": (FP8_DTYPE, (64, 2, 2, 2))}


@pytest.mark.parametrize("dtype, launch", STEP3_LAUNCHES.values(), ids=STEP3_LAUNCHES.keys())
def test_decode_step3_shape(dtype, launch):
    """The real model's 64 heads x 256 with the launcher's own plan (the tuned GPU launch on a GPU), and
    with forced (block_n, num_stages, tile_page[, qk_fp8]): the FP8 tuning candidates, chunked."""
    gen = torch.Generator().manual_seed(64)
    cache, block_table, seq_lens = random_paged_cache([300, 1, 129], 256, 64, dtype, gen)
    q = torch.randn(3, 64, 256, generator=gen).to(torch.bfloat16).to(DEVICE)
    kw = dict(zip(("block_n", "num_stages", "tile_page", "qk_fp8"), launch or (), strict=False))
    plan = plan_decode(3, 300, 256, DEVICE, dtype, 64, **kw) if launch else None
    out = mfa_decode(q, cache, block_table, seq_lens, plan=plan)
    assert rel_err(out, mfa_decode_ref(q, cache, block_table, seq_lens)) < TOL_BF16


@pytest.mark.parametrize("heads, head_dim", [(5, 32), (20, 64)])  # odd / non-power-of-two head counts
def test_decode_fp32_queries_and_odd_heads(heads, head_dim):
    assert _run(heads, head_dim, 16, torch.bfloat16, torch.float32, None, seed=heads) < TOL_FP32
    assert _run(heads, head_dim, 32, FP8_DTYPE, torch.float32, 2, seed=heads + 1) < TOL_FP32


def test_decode_reference_agrees_with_model_attention():
    """The paged float64 reference equals reference.mfa_attention on the same (contiguous) K/V."""
    gen = torch.Generator().manual_seed(11)
    L, H, D, page = 45, 4, 64, 16
    cache = PagedKVCache.allocate(4, page, D, torch.bfloat16, DEVICE)
    k = torch.randn(L, D, generator=gen).to(DEVICE)
    v = torch.randn(L, D, generator=gen).to(DEVICE)
    write_kv_ref(cache, k, v, torch.arange(L, device=DEVICE))
    table = torch.arange(4, dtype=torch.int32, device=DEVICE)[None]
    lens = torch.tensor([L], dtype=torch.int32, device=DEVICE)
    q = torch.randn(1, H, D, generator=gen).to(DEVICE)
    expected = reference.mfa_attention(q[:, None].double(), cache.k[:3].reshape(1, -1, D)[:, :L].double(),
                                       cache.v[:3].reshape(1, -1, D)[:, :L].double())[:, 0]
    assert rel_err(mfa_decode_ref(q, cache, table, lens), expected) < 1e-6  # the model computes in fp32
    assert rel_err(mfa_decode(q, cache, table, lens), expected) < TOL_FP32


def test_plan_covers_the_sequence_and_fills_the_gpu():
    cpu = torch.device("cpu")
    plan = plan_decode(1, 32768, 256, cpu)  # 4 "SMs" on the CPU, one program each
    assert plan.num_splits == 4 and plan.num_splits * plan.tokens_per_split >= 32768
    assert plan.tokens_per_split % plan.block_n == 0
    assert plan.chunk % plan.page == 0 and plan.tokens_per_split % plan.chunk == 0  # splits start on a page
    assert plan_decode(512, 4096, 256, cpu).num_splits == 1  # batch alone fills the machine
    assert _pick_splits(128, 4096, slots=264, granule=64, max_splits=16) == 2  # 256 programs: one full wave
    assert _pick_splits(1, 1 << 22, slots=4096, granule=64, max_splits=512) == 512  # merge tile cap
    # the H200's 132 SMs (NOTES_mfa.md run 15): a short sequence alone splits down to one page per program,
    # and 8 x 4K stays at 128 programs (256 shared two to an SM ran 7% slower)
    assert _pick_splits(1, 1024, slots=132, granule=64, max_splits=1024 // 64) == 16
    assert _pick_splits(8, 4096, slots=132, granule=64, max_splits=4096 // 64) == 16
    small = plan_decode(3, 5, 64, cpu, num_splits=8)
    assert small.num_splits == 1 and small.tokens_per_split >= 5  # never more splits than tiles


def test_decode_rejects_bad_inputs():
    cache = PagedKVCache.allocate(4, 16, 64, torch.bfloat16, DEVICE)
    q = torch.randn(2, 4, 64, device=DEVICE)
    table = torch.zeros(2, 2, dtype=torch.int32, device=DEVICE)
    lens = torch.ones(2, dtype=torch.int32, device=DEVICE)
    with pytest.raises(Step3Error, match="q must be"):
        mfa_decode(q[..., :32], cache, table, lens)
    with pytest.raises(Step3Error, match="block_table"):
        mfa_decode(q, cache, table.long(), lens)
    with pytest.raises(Step3Error, match="seq_lens"):
        mfa_decode(q, cache, table, lens[:1])
    with pytest.raises(Step3Error, match="capacity"):
        mfa_decode(q, cache, table, lens, max_seq_len=33)

"""Paged split-K MFA decode kernel vs the float64 reference (and the eager model's attention)."""

import pytest
import torch
from paged_inputs import DEVICE, boundary_lengths, random_paged_cache, rel_err

from converters.errors import Step3Error
from runtime.kernels.kv_cache import FP8_DTYPE, PagedKVCache, write_kv_ref
from runtime.kernels.mfa_decode import _pick_splits, mfa_decode, mfa_decode_ref, plan_decode
from runtime.model import reference

# bf16 q/out: the output's own rounding (the CPU interpreter truncates) dominates; fp32 q on the CPU
# runs the kernel in fp32 throughout, while on the GPU the dots take bf16 operands.
TOL_BF16, TOL_FP32 = 1e-2, (1e-2 if DEVICE.type == "cuda" else 1e-5)


def _run(heads, head_dim, page, dtype, q_dtype, num_splits, seed, count=7, qk_fp8=0, lazy=0, tile_page=0,
         q_gain=1.0):
    gen = torch.Generator().manual_seed(seed)
    lengths = boundary_lengths(page, count, gen, longest=5 * page)
    cache, block_table, seq_lens = random_paged_cache(lengths, head_dim, page, dtype, gen)
    q = (torch.randn(len(lengths), heads, head_dim, generator=gen) * q_gain).to(q_dtype).to(DEVICE)
    plan = plan_decode(len(lengths), max(lengths), head_dim, DEVICE, dtype, page, num_splits=num_splits,
                       block_n=None if num_splits is None else 16, chunk_max=0 if num_splits == 1 else None,
                       qk_fp8=qk_fp8, lazy=lazy, tile_page=tile_page, min_split_tokens=16)
    assert plan.tile_page == (tile_page if plan.chunk > 0 and plan.block_n <= page else 0)
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
@pytest.mark.parametrize("page, block_n, tile_page", [(16, 16, 1), (64, 32, 2), (16, 16, 2)])
def test_decode_tile_page(dtype, page, block_n, tile_page):
    """One scalar page id per tile (2: full tiles unmasked, the partial one peeled): chunks of several
    shuffled pages (tokens_per_split 4 x page, chunk up to 128 tokens), lengths ending mid-tile, mid-page,
    on split boundaries, and shorter than a split's start (empty splits)."""
    gen = torch.Generator().manual_seed(page + block_n)
    lengths = [1, page, page + 1, 3 * page - 1, 8 * page, 8 * page - 5, 4 * page + 1]
    cache, block_table, seq_lens = random_paged_cache(lengths, 64, page, dtype, gen)
    q = torch.randn(len(lengths), 4, 64, generator=gen).to(torch.bfloat16).to(DEVICE)
    plan = plan_decode(len(lengths), 8 * page, 64, DEVICE, dtype, page, num_splits=2, block_n=block_n,
                       chunk_max=128, tile_page=tile_page)
    assert plan.tile_page == tile_page and plan.tokens_per_split == 4 * page and plan.chunk // page >= 2
    out = mfa_decode(q, cache, block_table, seq_lens, plan=plan)
    assert rel_err(out, mfa_decode_ref(q, cache, block_table, seq_lens)) < TOL_BF16


@pytest.mark.parametrize("page, num_splits, qk_fp8, lazy", [(16, 1, 1, 0), (32, 3, 2, 0), (64, None, 2, 8)],
                         ids=["regs-direct", "scratch-split3", "scratch-lazy-auto"])
def test_decode_qk_fp8_matches_reference(page, num_splits, qk_fp8, lazy):
    """FP8 cache, q K^T as E4M3 dots of q split into hi + lo (on the CPU the split is exact E4M3 values,
    the dots fp32): within bf16's tolerance, where hi alone would be 2-5% off."""
    err = _run(4, 64, page, FP8_DTYPE, torch.bfloat16, num_splits, seed=3 * page, qk_fp8=qk_fp8, lazy=lazy)
    assert err < TOL_BF16


@pytest.mark.parametrize("dtype", [torch.bfloat16, FP8_DTYPE], ids=["bf16", "fp8"])
def test_decode_lazy_rescale(dtype, lazy=8):
    """Lazy rescaling on scores whose max keeps jumping along the sequence (by more and by less than the
    threshold) and grows past what the dot type holds without rescaling (2^128 for the CPU's fp32 dots,
    2^16 for fp16 P on the GPU): same result as the eager online softmax and the float64 reference."""
    gen = torch.Generator().manual_seed(lazy)
    lengths = [1, 33, 200, 64]
    cache, block_table, seq_lens = random_paged_cache(lengths, 64, 16, dtype, gen)
    gain = 3.0 if DEVICE.type == "cuda" else 40.0  # log2 growth of the max: ~30 on the GPU, ~200 on the CPU
    # fp32 q (fp32 dots on the CPU) holding bf16 values: exact in the GPU's bf16 / fp16 dots too
    q = (torch.randn(len(lengths), 4, 64, generator=gen) * gain).to(torch.bfloat16).float().to(DEVICE)
    ramp = torch.linspace(0.05, 2.0, cache.k.shape[0], device=DEVICE)[:, None, None]  # key norm per block
    cache.k.copy_((cache.k.float() * ramp).clamp(-448, 448).to(dtype))
    plans = [plan_decode(len(lengths), 200, 64, DEVICE, dtype, 16, num_splits=2, block_n=16, lazy=z)
             for z in (0, lazy)]
    eager, lazy_out = (mfa_decode(q, cache, block_table, seq_lens, plan=p) for p in plans)
    ref = mfa_decode_ref(q, cache, block_table, seq_lens)
    assert rel_err(lazy_out, ref) < TOL_FP32 and rel_err(lazy_out, eager) < TOL_FP32


def test_decode_qk_fp8_per_head_scale():
    """Heads whose q spans 1e-3..1e5 (beyond fp16) keep their accuracy: the split scales q per head."""
    gen = torch.Generator().manual_seed(5)
    cache, block_table, seq_lens = random_paged_cache([40, 129, 1], 64, 32, FP8_DTYPE, gen)
    gains = torch.tensor([1e-3, 1.0, 30.0, 1e5]).view(1, 4, 1)
    q = (torch.randn(3, 4, 64, generator=gen) * gains).to(torch.bfloat16).to(DEVICE)
    plan = plan_decode(3, 129, 64, DEVICE, FP8_DTYPE, 32, num_splits=2, qk_fp8=2)
    assert plan.qk_fp8 == 2 and plan.num_splits == 2
    out = mfa_decode(q, cache, block_table, seq_lens, plan=plan)
    ref = mfa_decode_ref(q, cache, block_table, seq_lens)
    for h in range(4):  # per head: a large head's error must not hide a small head's
        assert rel_err(out[:, h], ref[:, h]) < TOL_BF16, h
    assert plan_decode(3, 129, 64, DEVICE, torch.bfloat16, 32, qk_fp8=2).qk_fp8 == 0  # BF16: no split


@pytest.mark.parametrize("dtype, qk_fp8, lazy",
                         [(torch.bfloat16, 0, 0), (FP8_DTYPE, 0, 0), (FP8_DTYPE, 2, 8)],
                         ids=["bf16", "fp8", "fp8-qk8-lazy"])
def test_decode_step3_shape(dtype, qk_fp8, lazy):
    """The real model's 64 heads x 256 with the launcher's own plan (the tuned GPU launch on a GPU)."""
    gen = torch.Generator().manual_seed(64)
    cache, block_table, seq_lens = random_paged_cache([300, 1, 129], 256, 64, dtype, gen)
    q = torch.randn(3, 64, 256, generator=gen).to(torch.bfloat16).to(DEVICE)
    plan = (plan_decode(3, 300, 256, DEVICE, dtype, 64, 64, qk_fp8=qk_fp8, lazy=lazy, tile_page=2)
            if lazy else None)
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
    plan = plan_decode(1, 32768, 256, cpu, min_split_tokens=256)  # 4 "SMs" x 2 programs on the CPU
    assert plan.num_splits == 8 and plan.num_splits * plan.tokens_per_split >= 32768
    assert plan.tokens_per_split % plan.block_n == 0
    assert plan.chunk % plan.page == 0 and plan.tokens_per_split % plan.chunk == 0  # splits start on a page
    assert plan_decode(512, 4096, 256, cpu).num_splits == 1  # batch alone fills the machine
    assert _pick_splits(128, 4096, slots=264, granule=64, max_splits=16) == 2  # 256 programs: one full wave
    assert _pick_splits(1, 1 << 22, slots=4096, granule=64, max_splits=512) == 512  # merge tile cap
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

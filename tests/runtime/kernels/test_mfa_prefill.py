"""Chunked-prefill MFA kernel over the paged cache vs the float64 reference and the eager model."""

import pytest
import torch
from paged_inputs import DEVICE, random_paged_cache, rel_err

from converters.errors import Step3Error
from runtime.kernels.kv_cache import FP8_DTYPE, PagedKVCache, gather_kv_ref, write_kv
from runtime.kernels.mfa_prefill import mfa_prefill, mfa_prefill_ref
from runtime.model import reference

TOL_BF16, TOL_FP32 = 1e-2, (1e-2 if DEVICE.type == "cuda" else 1e-5)


def _chunks(page: int, gen: torch.Generator) -> tuple[list[int], list[int]]:
    """(total lengths, chunk lengths): a 1-token extend, a whole prompt, chunks ending on page edges."""
    q_lens = [1, 2 * page + 3, page, 5, int(torch.randint(1, 3 * page, (1,), generator=gen))]
    prefixes = [3 * page - 1, 0, page, 2 * page + 1, int(torch.randint(0, 2 * page, (1,), generator=gen))]
    return [p + q for p, q in zip(prefixes, q_lens, strict=True)], q_lens


def _run(heads, head_dim, page, dtype, q_dtype, seed, block_m=None):
    gen = torch.Generator().manual_seed(seed)
    lengths, q_lens = _chunks(page, gen)
    cache, block_table, seq_lens = random_paged_cache(lengths, head_dim, page, dtype, gen)
    cu = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0).to(torch.int32).to(DEVICE)
    q = torch.randn(int(cu[-1]), heads, head_dim, generator=gen).to(q_dtype).to(DEVICE)
    out = mfa_prefill(q, cache, block_table, seq_lens, cu, block_m=block_m, block_n=16 if block_m else None)
    assert out.shape == q.shape and out.dtype == q.dtype
    return rel_err(out, mfa_prefill_ref(q, cache, block_table, seq_lens, cu))


@pytest.mark.parametrize("dtype", [torch.bfloat16, FP8_DTYPE], ids=["bf16", "fp8"])
@pytest.mark.parametrize("page", [16, 32, 64])
def test_prefill_matches_reference(dtype, page):
    assert _run(4, 64, page, dtype, torch.bfloat16, seed=page) < TOL_BF16


def test_prefill_step3_shape():
    """64 heads x 256 with the launcher's default tiles: two chunks, one with a cached prefix."""
    gen = torch.Generator().manual_seed(256)
    cache, block_table, seq_lens = random_paged_cache([70, 9], 256, 64, torch.bfloat16, gen)
    cu = torch.tensor([0, 12, 21], dtype=torch.int32, device=DEVICE)
    q = torch.randn(21, 64, 256, generator=gen).to(torch.bfloat16).to(DEVICE)
    out = mfa_prefill(q, cache, block_table, seq_lens, cu)
    assert rel_err(out, mfa_prefill_ref(q, cache, block_table, seq_lens, cu)) < TOL_BF16


@pytest.mark.parametrize("heads, block_m", [(5, 16), (3, 64)])  # rows of a tile span several tokens
def test_prefill_fp32_queries_and_odd_heads(heads, block_m):
    assert _run(heads, 32, 16, torch.bfloat16, torch.float32, seed=heads, block_m=block_m) < TOL_FP32
    assert _run(heads, 32, 32, FP8_DTYPE, torch.float32, seed=heads + 1, block_m=block_m) < TOL_FP32


def test_prefill_after_write_kv_matches_model_attention():
    """Prompt in two chunks through write_kv + mfa_prefill == reference.mfa_attention on the whole prompt."""
    gen = torch.Generator().manual_seed(7)
    L, H, D, page = 40, 4, 64, 16
    k, v = (torch.randn(L, D, generator=gen).to(DEVICE) for _ in range(2))
    q = torch.randn(L, H, D, generator=gen).to(DEVICE)
    cache = PagedKVCache.allocate(6, page, D, torch.bfloat16, DEVICE)
    table = torch.tensor([[4, 1, 5]], dtype=torch.int32, device=DEVICE)
    t = torch.arange(L, device=DEVICE)
    slots = table[0].long()[t // page] * page + t % page
    outs = []
    for lo, hi in ((0, 23), (23, L)):  # chunk 2 attends to chunk 1 through the cache
        write_kv(cache, k[lo:hi], v[lo:hi], slots[lo:hi])
        lens = torch.tensor([hi], dtype=torch.int32, device=DEVICE)
        cu = torch.tensor([0, hi - lo], dtype=torch.int32, device=DEVICE)
        outs.append(mfa_prefill(q[lo:hi], cache, table, lens, cu))
    k_cached, v_cached = gather_kv_ref(cache, table[0], L)  # what write_kv stored (bf16-rounded k, v)
    assert rel_err(k_cached, k) < 1e-2
    expected = reference.mfa_attention(q[None], k_cached.float()[None], v_cached.float()[None])[0]
    assert rel_err(torch.cat(outs), expected) < TOL_FP32


def test_prefill_rejects_bad_inputs():
    cache = PagedKVCache.allocate(4, 16, 64, torch.bfloat16, DEVICE)
    q = torch.randn(3, 4, 64, device=DEVICE)
    table = torch.zeros(1, 2, dtype=torch.int32, device=DEVICE)
    lens = torch.full((1,), 3, dtype=torch.int32, device=DEVICE)
    cu = torch.tensor([0, 3], dtype=torch.int32, device=DEVICE)
    with pytest.raises(Step3Error, match="cu_seqlens_q"):
        mfa_prefill(q, cache, table, lens, cu.long())
    with pytest.raises(Step3Error, match="head_dim"):
        mfa_prefill(q[..., :48].contiguous(), PagedKVCache.allocate(4, 16, 48, torch.bfloat16, DEVICE),
                    table, lens, cu)

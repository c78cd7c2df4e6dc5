"""KV-cache write kernel (RoPE + FP8 quantization) vs its torch reference; cache layout checks."""

import pytest
import torch
from paged_inputs import DEVICE, random_paged_cache

from converters.errors import Step3Error
from runtime.kernels.kv_cache import FP8_DTYPE, PagedKVCache, gather_kv_ref, write_kv, write_kv_ref
from runtime.kernels.rope import rope_cos_sin_table

THETA = 500000.0
# one ulp of the storage format, relative (two roundings of nearly equal fp32 values may land one
# ulp apart; the CPU interpreter truncates fp32 -> bf16); atol covers FP8 subnormals (0.02 x 2^-9)
TOL = {torch.bfloat16: dict(rtol=2**-7, atol=1e-6), FP8_DTYPE: dict(rtol=2**-3, atol=2e-4)}


def _new_tokens(cache: PagedKVCache, count: int, gen: torch.Generator):
    """Random k, v [count, D], distinct random slots (two of them -1: skipped) and positions."""
    D = cache.head_dim
    k = torch.randn(count, D, generator=gen).to(torch.bfloat16)
    v = torch.randn(count, D, generator=gen).to(torch.bfloat16)
    slots = torch.randperm(cache.k.shape[0] * cache.block_size, generator=gen)[:count]
    slots[[1, count - 2]] = -1
    positions = torch.randint(0, 65536, (count,), generator=gen)
    return k.to(DEVICE), v.to(DEVICE), slots.to(DEVICE), positions.to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.bfloat16, FP8_DTYPE])
@pytest.mark.parametrize("page", [16, 32, 64])
@pytest.mark.parametrize("rope", [False, True])
def test_write_kv_matches_reference(dtype, page, rope):
    gen = torch.Generator().manual_seed(page + rope)
    cache, _, _ = random_paged_cache([3 * page], 64, page, dtype, gen)
    k, v, slots, positions = _new_tokens(cache, 37, gen)
    expected = PagedKVCache(cache.k.clone(), cache.v.clone(), cache.k_scale, cache.v_scale)
    before_k = cache.k.clone()
    table = rope_cos_sin_table(65536, 64, THETA, DEVICE) if rope else None
    write_kv(cache, k, v, slots, positions if rope else None, table)
    write_kv_ref(expected, k, v, slots, positions if rope else None, THETA if rope else None)

    written = torch.zeros(cache.k.shape[:2], dtype=torch.bool, device=DEVICE)
    kept = slots[slots >= 0].long()
    written[kept // page, kept % page] = True
    assert torch.equal(cache.k[~written].view(torch.uint8), before_k[~written].view(torch.uint8))
    for got, want, scale in ((cache.k, expected.k, cache.k_scale), (cache.v, expected.v, cache.v_scale)):
        torch.testing.assert_close(got.float() * scale, want.float() * scale, **TOL[dtype])


def test_fp8_write_clamps_and_roundtrips_within_half_ulp():
    gen = torch.Generator().manual_seed(5)
    cache = PagedKVCache.allocate(4, 16, 64, FP8_DTYPE, DEVICE, k_scale=0.01, v_scale=0.01)
    k = torch.randn(8, 64, generator=gen).to(DEVICE)
    v = k.clone()
    v[0, :4] = torch.tensor([100.0, -100.0, 4.4, -4.5])  # beyond 448 x 0.01: saturate at +-4.48
    write_kv(cache, k, v, torch.arange(8, device=DEVICE))
    k_back, v_back = gather_kv_ref(cache, torch.tensor([0], device=DEVICE), 8)
    torch.testing.assert_close(k_back.float(), k, rtol=2**-4, atol=2**-10 * 0.01)
    assert v_back[0, :4].tolist() == pytest.approx([4.48, -4.48, 4.4, -4.48], rel=2**-4)


def test_cache_and_write_reject_bad_inputs():
    with pytest.raises(Step3Error, match="float8_e4m3fn"):
        PagedKVCache.allocate(2, 16, 64, torch.float16)
    cache = PagedKVCache.allocate(2, 16, 64, torch.bfloat16, DEVICE)
    k = torch.randn(3, 64, device=DEVICE)
    with pytest.raises(Step3Error, match="k and v"):
        write_kv(cache, k, k[:, :32], torch.arange(3, device=DEVICE))
    with pytest.raises(Step3Error, match="slot_mapping"):
        write_kv(cache, k, k, torch.arange(2, device=DEVICE))
    with pytest.raises(Step3Error, match="both positions and rope_table"):
        write_kv(cache, k, k, torch.arange(3, device=DEVICE), positions=torch.arange(3, device=DEVICE))

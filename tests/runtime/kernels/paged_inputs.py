"""Random paged-cache inputs shared by the MFA kernel tests (fixed seeds, never zeros)."""

from __future__ import annotations

import torch

from runtime.kernels.kv_cache import PagedKVCache

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def boundary_lengths(page: int, count: int, gen: torch.Generator, longest: int) -> list[int]:
    """Lengths 1, page, page + 1, 2 page - 1, then random ones up to `longest`: `count` of them, shuffled."""
    fixed = [1, page, page + 1, 2 * page - 1]
    extra = torch.randint(1, longest + 1, (max(0, count - len(fixed)),), generator=gen).tolist()
    lengths = (fixed + extra)[:count]
    return [lengths[i] for i in torch.randperm(len(lengths), generator=gen).tolist()]


def random_paged_cache(lengths: list[int], head_dim: int, page: int, dtype: torch.dtype,
                       gen: torch.Generator) -> tuple[PagedKVCache, torch.Tensor, torch.Tensor]:
    """A cache full of random values, a shuffled non-contiguous block table and the int32 lengths.

    Blocks are drawn from a pool twice as large as needed, so neighbouring pages of one sequence are
    scattered; table entries past a sequence's end point at real blocks of other data, so a kernel
    that reads beyond seq_lens gets a wrong answer instead of a lucky one.
    """
    max_blocks = max(-(-n // page) for n in lengths)
    num_blocks = 2 * len(lengths) * max_blocks + 1
    fp8 = dtype == torch.float8_e4m3fn
    cache = PagedKVCache.allocate(num_blocks, page, head_dim, dtype, DEVICE,
                                  k_scale=0.02 if fp8 else 1.0, v_scale=0.01 if fp8 else 1.0)
    k = torch.randn(num_blocks, page, head_dim, generator=gen) / cache.k_scale.cpu()
    v = torch.randn(num_blocks, page, head_dim, generator=gen) / cache.v_scale.cpu()
    limit = 448.0 if fp8 else float("inf")  # torch < 2.13 turns out-of-range values into NaN, not +-448
    cache.k.copy_(k.clamp(-limit, limit).to(dtype))
    cache.v.copy_(v.clamp(-limit, limit).to(dtype))
    perm = torch.randperm(num_blocks, generator=gen)[: len(lengths) * max_blocks]
    block_table = perm.view(len(lengths), max_blocks).to(torch.int32)
    return cache, block_table.to(DEVICE), torch.tensor(lengths, dtype=torch.int32, device=DEVICE)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; NaN anywhere makes it NaN (which fails any `<` check)."""
    diff = out.double().cpu() - ref.double().cpu()
    return float(diff.norm() / ref.double().cpu().norm())

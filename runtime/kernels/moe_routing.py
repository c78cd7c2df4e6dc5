"""MoE routing and grouping: softmax + top-k in fp32, and the (token, slot) pairs sorted by expert.

`align_by_expert` is vLLM's moe_align_block_size with no host synchronization: the output is sized for
the worst case, so a whole MoE layer can be captured in a CUDA graph. On a GPU it is two Triton launches
(count the pairs per expert in chunks, then place them); in torch it took ~25 small kernels (argsort alone
~12, a radix sort over int64 keys), ~0.15 ms of a layer on the H200 (NOTES_ffn.md run 8's profile). The
torch version stays as the CPU path and the kernels' reference. Ties in the router go to torch.topk, as in
runtime/model/reference.route.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def route_topk(logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits [T, E] -> softmax over E in fp32 -> top-k: (weights [T, k] fp32, ids [T, k] int32).

    Tied experts are picked in torch.topk's order, as runtime/model/reference.route does; the weights
    are renormalized to sum to 1 iff norm_expert_weight.
    """
    probs = logits.float().softmax(dim=-1)
    weights, ids = probs.topk(top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids.to(torch.int32)


def align_by_expert(ids: torch.Tensor, first: int, num_local: int, block_m: int,
                    kernel: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [T, k] -> (rows int32 [P], block_expert int32 [P / block_m]); no host synchronization.

    rows lists the pair indices t*k + j routed to local experts, grouped by expert (stable: in pair
    order), each expert's run padded to a multiple of block_m with the sentinel T*k. P is the
    worst case T*k + E_local*(block_m - 1), rounded up; M-blocks past the last expert get -1.
    kernel: the Triton kernels (default: on a GPU; on the CPU the torch ops, as the interpreter is slow).
    """
    pairs = ids.numel()
    capacity = -(-(pairs + num_local * (block_m - 1)) // block_m) * block_m
    if ids.is_cuda if kernel is None else kernel:
        return _align_kernels(ids, first, num_local, block_m, capacity)
    flat = ids.reshape(-1).long() - first
    local = torch.where((flat >= 0) & (flat < num_local), flat, num_local)  # num_local: not on this rank
    # scatter_add, not bincount: CUDA bincount reads max() back to the host, which broke the CUDA-graph
    # capture of the MoE on the H200 (NOTES_ffn.md run 6); with scatter_add the layer captures (run 7)
    counts = torch.zeros(num_local + 1, dtype=torch.long, device=ids.device)
    counts = counts.scatter_add_(0, local, torch.ones_like(local))[:num_local]
    padded = (counts + block_m - 1) // block_m * block_m
    pad_start = torch.cumsum(padded, 0) - padded
    cnt_start = torch.cumsum(counts, 0) - counts
    order = torch.argsort(local, stable=True)
    e_sorted = local[order]
    mine = e_sorted < num_local
    e_safe = e_sorted.clamp(max=num_local - 1)
    rank_in_expert = torch.arange(pairs, device=ids.device) - cnt_start[e_safe]
    dest = torch.where(mine, pad_start[e_safe] + rank_in_expert, capacity)  # capacity: a dump slot
    rows = torch.full((capacity + 1,), pairs, dtype=torch.int32, device=ids.device)
    rows.scatter_(0, dest, order.to(torch.int32))
    starts = torch.arange(0, capacity, block_m, device=ids.device)
    block_expert = torch.searchsorted(torch.cumsum(padded, 0), starts, right=True)
    block_expert = torch.where(block_expert < num_local, block_expert, -1).to(torch.int32)
    return rows[:capacity], block_expert


CHUNK_ELEMENTS = 16384  # pairs x expert bins a program holds at once (its one-hot tile)


def _align_kernels(ids: torch.Tensor, first: int, num_local: int, block_m: int,
                   capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """align_by_expert in two launches over chunks of the pairs: per-chunk counts, then every program
    derives the experts' padded runs from all counts and places its chunk's pairs (and fills a share of
    the M-blocks: expert ids, sentinels)."""
    flat = ids.reshape(-1)
    pairs = flat.numel()
    bins = triton.next_power_of_2(num_local + 1)  # the last bin: pairs of other ranks' experts
    chunk = max(16, CHUNK_ELEMENTS // bins)
    chunks = max(1, triton.cdiv(pairs, chunk))
    counts = torch.empty((chunks, bins), dtype=torch.int32, device=ids.device)
    rows = torch.empty(capacity, dtype=torch.int32, device=ids.device)
    block_expert = torch.empty(capacity // block_m, dtype=torch.int32, device=ids.device)
    geometry = dict(first=first, num_local=num_local, num_pairs=pairs, CHUNK=chunk, BINS=bins)
    _count_kernel[(chunks,)](flat, counts, **geometry)
    _place_kernel[(chunks,)](flat, counts, rows, block_expert, chunks, capacity // block_m, **geometry,
                             BLOCK_M=block_m, BLOCK_M_POW2=triton.next_power_of_2(block_m), CHUNKS_AT_ONCE=32)
    return rows, block_expert


@triton.jit
def _chunk_experts(ids_ptr, c, first, num_local, num_pairs, CHUNK: tl.constexpr, BINS: tl.constexpr):
    """Chunk c's pair indices and their local expert (BINS - 1 for another rank's expert or no pair)."""
    offs = c * CHUNK + tl.arange(0, CHUNK)
    e = tl.load(ids_ptr + offs, mask=offs < num_pairs, other=0).to(tl.int32) - first
    return offs, tl.where((offs < num_pairs) & (e >= 0) & (e < num_local), e, BINS - 1)


@triton.jit
def _count_kernel(ids_ptr, counts_ptr, first, num_local, num_pairs, CHUNK: tl.constexpr, BINS: tl.constexpr):
    c = tl.program_id(0)
    _, e = _chunk_experts(ids_ptr, c, first, num_local, num_pairs, CHUNK, BINS)
    hit = e[:, None] == tl.arange(0, BINS)[None, :]
    tl.store(counts_ptr + c * BINS + tl.arange(0, BINS), tl.sum(hit.to(tl.int32), axis=0))


@triton.jit
def _place_kernel(ids_ptr, counts_ptr, rows_ptr, block_expert_ptr, num_chunks, num_blocks, first, num_local,
                  num_pairs, CHUNK: tl.constexpr, BINS: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_M_POW2: tl.constexpr, CHUNKS_AT_ONCE: tl.constexpr):
    """Program c: each expert's pairs in all chunks and in chunks before c -> the experts' padded runs ->
    rows[run start + earlier pairs + rank in chunk] = pair for c's pairs; then its share of the M-blocks:
    the block's expert (-1 past the last run) and the sentinel num_pairs in rows no pair took."""
    c = tl.program_id(0)
    experts = tl.arange(0, BINS)
    total = tl.zeros([BINS], dtype=tl.int32)
    before = tl.zeros([BINS], dtype=tl.int32)
    for c0 in range(0, num_chunks, CHUNKS_AT_ONCE):
        ch = c0 + tl.arange(0, CHUNKS_AT_ONCE)
        cnt = tl.load(counts_ptr + ch[:, None] * BINS + experts[None, :], mask=ch[:, None] < num_chunks,
                      other=0)
        total += tl.sum(cnt, axis=0)
        before += tl.sum(tl.where(ch[:, None] < c, cnt, 0), axis=0)
    local = experts < num_local
    padded = tl.where(local, (total + BLOCK_M - 1) // BLOCK_M * BLOCK_M, 0)
    end = tl.cumsum(padded, axis=0)
    start = end - padded
    offs, e = _chunk_experts(ids_ptr, c, first, num_local, num_pairs, CHUNK, BINS)
    hit = e[:, None] == experts[None, :]
    rank = tl.sum(tl.where(hit, tl.cumsum(hit.to(tl.int32), axis=0), 0), axis=1) - 1
    dest = tl.sum(tl.where(hit, (start + before)[None, :], 0), axis=1) + rank
    tl.store(rows_ptr + dest, offs.to(tl.int32), mask=e < num_local)
    per = tl.cdiv(num_blocks, tl.num_programs(0))
    r = tl.arange(0, BLOCK_M_POW2)
    for m in range(c * per, tl.minimum(c * per + per, num_blocks)):
        row0 = m * BLOCK_M
        be = tl.sum((local & (end <= row0)).to(tl.int32), axis=0)  # the run that holds row0
        tl.store(block_expert_ptr + m, tl.where(be < num_local, be, -1))
        used = tl.sum(tl.where((experts == be) & local, start + total, 0), axis=0)  # then padding
        tl.store(rows_ptr + row0 + r, num_pairs, mask=(r < BLOCK_M) & (row0 + r >= used))


def pair_buffer(experts, rows: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[rows, H] output of a down GEMM, a row per (token, slot) pair: uninitialized when this rank holds
    every expert (each pair's row gets written), zeros otherwise (pairs routed to other ranks' experts
    contribute nothing). `experts`: moe.ExpertWeights."""
    whole = experts.first == 0 and experts.num_local == experts.num_experts
    return (torch.empty if whole else torch.zeros)((rows, experts.down.shape[1]), dtype=dtype, device=device)

"""MoE routing and grouping: softmax + top-k in fp32, and the (token, slot) pairs sorted by expert.

`align_by_expert` is vLLM's moe_align_block_size in a handful of torch ops, with no host
synchronization: the output is sized for the worst case, so a whole MoE layer can be captured in a
CUDA graph. Ties in the router go to torch.topk, as in runtime/model/reference.route.
"""

from __future__ import annotations

import torch


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


def align_by_expert(ids: torch.Tensor, first: int, num_local: int,
                    block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [T, k] -> (rows int32 [P], block_expert int32 [P / block_m]); no host synchronization.

    rows lists the pair indices t*k + j routed to local experts, grouped by expert (stable: in pair
    order), each expert's run padded to a multiple of block_m with the sentinel T*k. P is the
    worst case T*k + E_local*(block_m - 1), rounded up; M-blocks past the last expert get -1.
    """
    flat = ids.reshape(-1).long() - first
    pairs = flat.numel()
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
    capacity = -(-(pairs + num_local * (block_m - 1)) // block_m) * block_m
    dest = torch.where(mine, pad_start[e_safe] + rank_in_expert, capacity)  # capacity: a dump slot
    rows = torch.full((capacity + 1,), pairs, dtype=torch.int32, device=ids.device)
    rows.scatter_(0, dest, order.to(torch.int32))
    starts = torch.arange(0, capacity, block_m, device=ids.device)
    block_expert = torch.searchsorted(torch.cumsum(padded, 0), starts, right=True)
    block_expert = torch.where(block_expert < num_local, block_expert, -1).to(torch.int32)
    return rows[:capacity], block_expert


def pair_buffer(experts, rows: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[rows, H] output of a down GEMM, a row per (token, slot) pair: uninitialized when this rank holds
    every expert (each pair's row gets written), zeros otherwise (pairs routed to other ranks' experts
    contribute nothing). `experts`: moe.ExpertWeights."""
    whole = experts.first == 0 and experts.num_local == experts.num_experts
    return (torch.empty if whole else torch.zeros)((rows, experts.down.shape[1]), dtype=dtype, device=device)

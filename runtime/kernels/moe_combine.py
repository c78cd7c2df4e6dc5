"""The MoE's weighted combine in one pass: y[t] = sum_j partial[t * k + j] + add[t].

The down GEMMs leave one weighted row per (token, slot) pair; the layer then needs their sum over the k
slots plus the shared expert's output. As two torch ops (`partial.view(T, k, H).sum(1)`, then `+ shared`)
that took 0.29 + 0.08 ms per layer at 8192 tokens on the H200 (NOTES_ffn.md run 8: torch's reduction
over a middle dimension of 3 runs at ~1.6 TB/s); one kernel reads the k + 1 rows once and writes y once,
summing in fp32 and rounding once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024  # columns per program: 8 BF16 elements (16 bytes) per thread at 4 warps


@triton.jit
def _combine_kernel(p_ptr, add_ptr, out_ptr, H, K: tl.constexpr, HAS_ADD: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < H
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for j in tl.static_range(K):
        acc += tl.load(p_ptr + (t * K + j) * H + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_ADD:
        acc += tl.load(add_ptr + t * H + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * H + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)


def combine_pairs(partial: torch.Tensor, top_k: int, add: torch.Tensor | None = None,
                  out_dtype: torch.dtype | None = None, kernel: bool | None = None) -> torch.Tensor:
    """partial [T * k, H] (row t * k + j: slot j of token t) -> [T, H] = sum over j (+ add [T, H]),
    in fp32, rounded once to out_dtype (default partial's dtype). kernel: the Triton kernel (default: on a
    GPU; on the CPU the same arithmetic in torch, as the interpreter would add a minute to the tests)."""
    rows, H = partial.shape
    T = rows // top_k
    assert rows == T * top_k and partial.is_contiguous() and (add is None or (add.shape == (T, H)
                                                                              and add.is_contiguous()))
    out_dtype = out_dtype or partial.dtype
    if not (partial.is_cuda if kernel is None else kernel):
        y = partial.view(T, top_k, H).float().sum(dim=1)
        return (y if add is None else y + add.float()).to(out_dtype)
    out = torch.empty((T, H), dtype=out_dtype, device=partial.device)
    if T:
        _combine_kernel[(T, triton.cdiv(H, BLOCK))](partial, partial if add is None else add, out, H,
                                                    K=top_k, HAS_ADD=add is not None, BLOCK=BLOCK,
                                                    num_warps=4)
    return out

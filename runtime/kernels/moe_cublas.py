"""Routed experts through cuBLAS for large batches: grouped by expert, per-expert blockwise GEMMs.

An alternative to the fused Triton kernel for large batches, where the expert GEMMs are compute-bound
and cuBLAS's blockwise FP8 runs at ~1,350 TFLOP/s on the H200 against the Triton kernel's ~450:
  1. align_by_expert with 16-row runs (cuBLAS wants M in whole 16-row steps), one host
     synchronization for the per-expert row counts;
  2. one gather of the quantized token rows into expert order ([P, H] FP8);
  3. per expert, on a few CUDA streams so that small GEMMs run side by side: gate and up
     `_scaled_mm` (fp32 out), silu_mul_quant, the routing weight folded into the intermediate's
     per-row scales (exact: scales multiply), then down `_scaled_mm` into its slice of [P, H];
  4. one scatter of the rows to their (token, slot) positions and the sum over slots.
Extra traffic against the fused Triton path: the gather (P*H bytes), fp32 gate/up (8 bytes per
intermediate element), and the [P, H] outputs written twice. It cannot be captured in a CUDA graph
(the host reads the counts). Measured on the H200 it LOST at every size (13.7-16.5 ms against
5.2-15.6 ms at 2048-8192 tokens), CPU-bound by inference (about 400 launches per call), so
`default_moe_config` never picks it; it stays as a tested option (MoeConfig.backend = "cublas")
for hosts whose launches are cheaper or for CUDA-graph-free prefill experiments.
"""

from __future__ import annotations

import contextlib
import functools

import torch

from quant.fp8 import FP8_DTYPE
from runtime.kernels.act_quant import Fp8Act
from runtime.kernels.fp8_linear import scaled_mm
from runtime.kernels.mlp import silu_mul_quant
from runtime.kernels.moe_routing import align_by_expert, pair_buffer

ROWS = 16  # per-expert row padding


@functools.lru_cache(maxsize=8)
def side_streams(device_index: int, count: int) -> tuple[torch.cuda.Stream, ...]:
    """A few CUDA streams per device, made once (streams are cheap but not free to create)."""
    return tuple(torch.cuda.Stream(device=device_index) for _ in range(count))


def cublas_moe(x: Fp8Act, weights: torch.Tensor, ids: torch.Tensor, experts, out_dtype: torch.dtype,
               num_streams: int = 4) -> torch.Tensor:
    """Routed experts of this rank (ExpertWeights, FP8) for x [T, H] -> [T, H] partial sum in out_dtype."""
    T, k = ids.shape
    hidden = x.q.shape[1]
    rows, block_expert = align_by_expert(ids, experts.first, experts.num_local, ROWS)
    blocks = torch.bincount(block_expert.long() + 1, minlength=experts.num_local + 1)[1:]
    counts = (blocks * ROWS).tolist()  # the one host synchronization
    total = sum(counts)
    rows = rows[:total].long()
    tok = (rows // k).clamp(max=T - 1)  # padding rows read a real token; their results are dropped
    a_q = x.q.view(torch.uint8).index_select(0, tok).view(FP8_DTYPE)  # [P, H] in expert order
    a_s = x.scale_inv.index_select(0, tok)  # [P, H/128]
    w_rows = weights.reshape(-1).float()[rows.clamp(max=T * k - 1)]  # routing weight of each row
    y = torch.empty((total, hidden), dtype=out_dtype, device=x.q.device)
    gate_s, up_s, down_s = experts.mm_scales
    cuda = x.q.device.type == "cuda"
    streams = side_streams(x.q.device.index or 0, num_streams) if cuda else (None,)
    main = torch.cuda.current_stream() if cuda else None
    for s in streams if cuda else ():
        s.wait_stream(main)
    off = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        s = streams[e % len(streams)]
        with torch.cuda.stream(s) if s is not None else contextlib.nullcontext():
            a = Fp8Act(a_q[off:off + n], a_s[off:off + n].t().contiguous().t())
            g = scaled_mm(a, experts.gate[e], gate_s[e], torch.float32)
            h = silu_mul_quant(g, scaled_mm(a, experts.up[e], up_s[e], torch.float32))
            h_s = h.scale_inv.t().mul(w_rows[None, off:off + n]).t()  # outer-dim-major kept
            h = Fp8Act(h.q, h_s)  # y = w * down(h), exactly: the weight rides on the row scales
            y[off:off + n] = scaled_mm(h, experts.down[e], down_s[e], out_dtype)
        off += n
    for s in streams if cuda else ():
        main.wait_stream(s)
    partial = pair_buffer(experts, T * k + 1, out_dtype, y.device)
    partial.index_copy_(0, torch.where(rows < T * k, rows, T * k), y)  # row T*k: padding's dump
    return partial[: T * k].view(T, k, hidden).sum(dim=1)

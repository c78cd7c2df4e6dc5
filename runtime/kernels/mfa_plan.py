"""Launch plans of the MFA decode kernel (`mfa_decode`): the tuned launch table and the split of the sequence.

`plan_decode` picks everything in one place; every field can be overridden (the benchmark's tuning passes do).
The table holds what the committed H200 runs picked (benchmarks/NOTES_mfa.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from runtime.kernels.fp8_linear import gluon_usable


@dataclass(frozen=True)
class DecodePlan:
    """Launch choices, picked in one place (`plan_decode`); every field can be overridden for tuning."""

    num_splits: int
    tokens_per_split: int
    block_n: int
    num_warps: int
    num_stages: int
    chunk: int  # tokens whose page ids are loaded at once (0: per tile); divides tokens_per_split
    page: int
    tile_page: int = 0  # chunked: 1 scalar page ids per tile (one per page it covers), 2 also unmasked tiles
    pdl: int = 0  # GPU: programmatic dependent launches, the next started early (1) or late (2): _pick_pdl
    qk_fp8: int = 0  # FP8 cache, 2: q K^T as E4M3 dots of q split in hi + lo (Triton: a pre-pass; 1: deleted)
    gluon: int = 0  # FP8 with qk_fp8 2 on Hopper (GLUON_TRITONS): mfa_decode_ws's Gluon kernel, 2: tile pairs
    gluon_vec: int = 8  # Gluon: V converter's E4M3 bytes per thread per row (16: run 8's, bank-conflicted)
    gluon_vstages: int = 3  # Gluon: fp16 V stages (num_stages is the E4M3 K / V ring's)


# (block_n, num_warps, num_stages, chunk_max, tile_page, pdl, qk_fp8, gluon) for head_dim >= 128 on the GPU,
# by KV bytes per value: the launches the committed H200 runs picked (results/mfa_attention_*h200.json,
# NOTES_mfa.md runs 7-13). FP8 takes the E4M3 q K^T (qk_fp8 2) in the Gluon kernel (64-token tiles, 3 stages
# (below), two tiles per loop pass (gluon 2: 174.1-174.5 us at 256 x 4K in run 11's three calls, one tile a
# pass 181.6-182.8), PDL where `_pick_pdl` says; the Triton kernel where Gluon cannot run) from QK8_MIN_TOKENS
# cached tokens per call; below, run 6's fp16-dot launch, whose short programs win where a sequence is split
# into many 1-4-tile pieces (run 15, `results/mfa_small_shapes_run15_h200.json`: 1 x 8K 11.8 us against
# Gluon's 13.2, 8 x 1K 12.9 against 13.2; from 32K tokens Gluon wins: 1 x 32K 17.6 against 19.5, 8 x 4K 18.1
# against 20.6, 32 x 1K 18.0 against 19.5).
# Since the Gluon CTA's prologue went from ~12.5 to ~5.5 us (run 13), 3 E4M3 K / V stages and 3 fp16 V
# stages beat 4 + 2 at all 12 shapes of an interleaved A/B, by 0.4-4% (32 x 4K 34.0 against 35.4 us, 128 x
# 64K 1200.9 against 1217.4).
_GPU_LAUNCH = {2: (32, 4, 4, 4096, 2, 1, 0, 0), 1: (64, 4, 3, 2048, 2, 0, 2, 2)}
_GPU_LAUNCH_FP8_SMALL = (32, 4, 3, 512, 0, 1, 0, 0)
QK8_MIN_TOKENS = 32 * 1024
_CPU_LAUNCH = (32, 4, 2, 128, 0, 0, 0, 0)
MAX_SPLITS = 512
MAX_CHUNK_PAGES = 64  # page ids held in registers per chunk: chunk_max 4096 tokens at page 64, 1024 at 16
SPLIT_COST_TOKENS = 128  # a split's q load + partial write + merge read, in cached-token equivalents
MIN_SPLIT_TOKENS = 64  # a split's least tokens: one page (run 15: 1 x 1K 13.0 -> 8.4 us from 256's 4 splits)
PDL_LATE_MAX_SPLITS = 16  # up to this many splits a decode lets its merge launch only once its loop is done


def _chunk(tokens: int, granule: int, chunk_max: int) -> int:
    """The largest granule x 2^k <= max(chunk_max, granule) that divides tokens (0 if chunk_max is 0)."""
    if chunk_max == 0:
        return 0
    chunk = granule
    while tokens % (2 * chunk) == 0 and 2 * chunk <= chunk_max:
        chunk *= 2
    return chunk


def _split_tokens(max_seq_len: int, splits: int, granule: int) -> int:
    return triton.cdiv(triton.cdiv(max_seq_len, splits), granule) * granule


def _pick_splits(batch: int, max_seq_len: int, slots: int, granule: int, max_splits: int) -> int:
    """Fewest waves x (split length + per-split cost), preferring splits that fill >= 3/4 of the slots.

    slots = the SMs: a wave is one program per SM. (Counting two per SM where two fit in shared memory made
    the FP8 launch split 8 x 4K and 1 x 32K twice as finely, 7-14% slower on the H200: two programs on one
    SM share its pipes; NOTES_mfa.md run 15.)
    """
    def cost(s: int) -> tuple[bool, int]:
        tokens = _split_tokens(max_seq_len, s, granule)
        waves = triton.cdiv(batch * triton.cdiv(max_seq_len, tokens), slots)
        return batch * s < 0.75 * slots, waves * (tokens + (SPLIT_COST_TOKENS if s > 1 else 0))

    return min(range(1, max_splits + 1), key=cost)


def _pick_pdl(num_splits: int, gluon: int, tuned_pdl: int, kv_bytes: int) -> int:
    """0: plain launches; 1: programmatic dependents, each decode letting the next launch start at once; 2:
    only once its loop is done. Timed in turns on the H200 (NOTES_mfa.md runs 18, 21, 22):
    - one split (no merge): 1 pays (Gluon 0.97x at 128 x 1K; both triggers alike).
    - 2-16 splits: trigger 2 is 0.91-0.98x the best of the others for the Gluon launch (8 x 4K 12.4 against
      13.7 us, 8 x 8K 16.8 against 18.2) and 0.96-0.99x trigger 1 for BF16, where trigger 1 makes the Gluon
      launch 1.03-1.08x slower than none; the FP8 small-shape launch keeps 1 (2: 1.04x at 8 x 1K).
    - more splits (batch 1, 32K-64K tokens): trigger 1 for BF16 (2 is 1.01-1.03x), none for Gluon (1 is
      1.16-1.21x, 2 1.02x at 1 x 32K)."""
    late = 1 < num_splits <= PDL_LATE_MAX_SPLITS
    if gluon:
        return 1 if num_splits == 1 else 2 if late else 0
    return 2 if tuned_pdl and late and kv_bytes == 2 else tuned_pdl


def plan_decode(batch: int, max_seq_len: int, head_dim: int, device: torch.device,
                kv_dtype: torch.dtype = torch.bfloat16, page: int = 64,
                num_splits: int | None = None, block_n: int | None = None, num_warps: int | None = None,
                num_stages: int | None = None, chunk_max: int | None = None, tile_page: int | None = None,
                pdl: int | None = None, qk_fp8: int | None = None, gluon: int | None = None,
                gluon_vec: int = 8, gluon_vstages: int | None = None,
                min_split_tokens: int = MIN_SPLIT_TOKENS) -> DecodePlan:
    """Launch parameters (tuned table) and the split of the sequence (`_pick_splits`), in one place."""
    on_gpu = device.type == "cuda"
    kv_bytes = torch.empty(0, dtype=kv_dtype).element_size()
    tuned = _CPU_LAUNCH
    if on_gpu and head_dim >= 128:
        tokens = batch * max_seq_len
        small_fp8 = kv_bytes == 1 and tokens < QK8_MIN_TOKENS
        tuned = _GPU_LAUNCH_FP8_SMALL if small_fp8 else _GPU_LAUNCH[kv_bytes]
    block_n, num_warps, num_stages = block_n or tuned[0], num_warps or tuned[1], num_stages or tuned[2]
    chunk_max = min(tuned[3] if chunk_max is None else chunk_max, MAX_CHUNK_PAGES * page)
    tile_page = int(tuned[4] if tile_page is None else tile_page) if chunk_max > 0 else 0
    granule = max(block_n, page) if chunk_max else block_n  # splits start on a page when chunking
    qk_fp8 = int(tuned[6] if qk_fp8 is None else qk_fp8) if kv_bytes == 1 else 0
    gluon = int(tuned[7] if gluon is None else gluon) if qk_fp8 == 2 and on_gpu else 0
    if num_splits is None:
        slots = torch.cuda.get_device_properties(device).multi_processor_count if on_gpu else 4
        max_splits = max(1, min(MAX_SPLITS, max_seq_len // max(min_split_tokens, granule)))
        num_splits = _pick_splits(batch, max_seq_len, slots, granule, max_splits)
    tokens = _split_tokens(max_seq_len, num_splits, granule)
    num_splits = triton.cdiv(max_seq_len, tokens)
    if pdl is None:
        pdl = _pick_pdl(num_splits, gluon, tuned[5], kv_bytes)
    pdl = int(pdl) if on_gpu else 0
    if gluon_vstages is None:  # the fp16 V ring takes the shared memory the K / V ring leaves (~224 KB)
        gluon_vstages = 3 if num_stages <= 3 else 2
    return DecodePlan(num_splits=num_splits, tokens_per_split=tokens, block_n=block_n,
                      num_warps=num_warps, num_stages=num_stages, chunk=_chunk(tokens, granule, chunk_max),
                      page=page, tile_page=tile_page, pdl=pdl, qk_fp8=qk_fp8, gluon=gluon,
                      gluon_vec=gluon_vec, gluon_vstages=gluon_vstages)


def ws_decode_usable(q: torch.Tensor, cache) -> bool:
    """Whether mfa_decode_ws's Gluon kernel can run: Hopper, a Triton of GLUON_TRITONS (its Gluon API;
    no interpreter), an FP8 cache whose [num_blocks * page, 256] view is a TMA tensor (contiguous), pages of
    >= 8 rows (the swizzle atom), 33..64 heads (one 64-row wgmma tile) and a 16-bit q (the output's two D
    halves are staged in q's 32 KB of shared memory)."""
    return (gluon_usable(q.device) and cache.is_fp8 and cache.head_dim == 256 and cache.block_size >= 8
            and 32 < q.shape[1] <= 64 and q.dtype in (torch.bfloat16, torch.float16)
            and cache.k.is_contiguous() and cache.v.is_contiguous())

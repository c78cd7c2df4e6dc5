"""The paged MFA KV cache: layout, the write (RoPE + quantize) kernel, and the paged-tile loader.

Layout (one layer; MFA has ONE shared K head and ONE V head):
    k, v         [num_blocks, block_size, head_dim]   bfloat16, or float8_e4m3fn; block_size a power of two
    k_scale, v_scale  float32 [1]                      stored = value / scale (1.0 for BF16)
    block_table  [batch, max_blocks] int32             sequence b's token t lives in block
                                                       block_table[b, t // block_size], row t % block_size
    seq_lens     [batch] int32                         cached tokens per sequence (>= 1 when attending)
    slot_mapping [tokens] int64                        slot = block * block_size + row; < 0 skips the token

One cached token costs 2 x head_dim x (2 | 1) bytes: 1 KiB in BF16, 512 B in FP8 at head_dim 256.
`write_kv` traffic: read T x 2 x D new values (+ a D x 4 B RoPE table row per token), write them once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from converters.errors import Step3Error
from quant.fp8 import FP8_DTYPE, FP8_MAX
from runtime.kernels.rope import rope_rotate

CACHE_DTYPES = (torch.bfloat16, FP8_DTYPE)


def check(ok: bool, message: str) -> None:
    """Raise a Step3Error naming the kernel argument at fault (launchers' input checks)."""
    if not ok:
        raise Step3Error(message)


@dataclass
class PagedKVCache:
    """One layer's paged K/V cache (see the module docstring for the layout)."""

    k: torch.Tensor
    v: torch.Tensor
    k_scale: torch.Tensor
    v_scale: torch.Tensor

    def __post_init__(self) -> None:
        check(self.k.dim() == 3 and self.k.shape == self.v.shape,
              f"PagedKVCache: k and v must both be [num_blocks, block_size, head_dim], got "
              f"{tuple(self.k.shape)} and {tuple(self.v.shape)}")
        check(self.k.dtype == self.v.dtype and self.k.dtype in CACHE_DTYPES,
              f"PagedKVCache: dtype must be bfloat16 or float8_e4m3fn for both k and v, got {self.k.dtype} "
              f"and {self.v.dtype}")
        check(self.k.stride(-1) == 1 and self.v.stride(-1) == 1, "PagedKVCache: head_dim must be contiguous")
        page = self.k.shape[1]
        check(page & (page - 1) == 0, f"PagedKVCache: block_size must be a power of two, got {page}")
        for name in ("k_scale", "v_scale"):
            s = getattr(self, name)
            check(s.dtype == torch.float32 and s.numel() == 1 and s.device == self.k.device,
                  f"PagedKVCache: {name} must be a float32 tensor with one element on {self.k.device}")

    @classmethod
    def allocate(cls, num_blocks: int, block_size: int, head_dim: int, dtype: torch.dtype = torch.bfloat16,
                 device: torch.device | str = "cpu", k_scale: float = 1.0,
                 v_scale: float = 1.0) -> PagedKVCache:
        """An uninitialised cache. For FP8, pick scales so |K| / k_scale and |V| / v_scale stay <= 448."""
        check(dtype in CACHE_DTYPES, f"KV cache dtype must be bfloat16 or float8_e4m3fn, got {dtype} "
                                     f"(use --kv-cache-dtype bf16 or fp8)")
        check(num_blocks > 0 and block_size > 0 and head_dim > 0,
              f"KV cache: num_blocks, block_size, head_dim must be positive, got {num_blocks}, {block_size}, "
              f"{head_dim}")
        check(k_scale > 0 and v_scale > 0, f"KV cache: scales must be positive, got {k_scale}, {v_scale}")
        shape = (num_blocks, block_size, head_dim)
        scale = lambda s: torch.tensor([s if dtype == FP8_DTYPE else 1.0], dtype=torch.float32, device=device)
        empty = lambda: torch.empty(shape, dtype=dtype, device=device)
        return cls(empty(), empty(), scale(k_scale), scale(v_scale))

    @property
    def block_size(self) -> int:
        return self.k.shape[1]

    @property
    def head_dim(self) -> int:
        return self.k.shape[2]

    @property
    def is_fp8(self) -> bool:
        return self.k.dtype == FP8_DTYPE


def dot_kind(cache: PagedKVCache) -> int:
    """Operand type of the attention kernels' tl.dot: 0 fp32 (CPU interpreter: it gets bf16 wrong),
    1 bf16 (BF16 cache), 2 fp16 (FP8 cache: E4M3 -> fp16 is one cvt per value pair, E4M3 -> bf16 two
    more instructions per value, which made FP8 decode instruction-bound; q must fit fp16, |q| < 65504)."""
    if not cache.k.is_cuda:
        return 0
    return 2 if cache.is_fp8 else 1


@triton.jit
def load_page_rows(cache_ptr, page, tok, mask, stride_blk, stride_tok, PAGE: tl.constexpr, D: tl.constexpr):
    """Cache rows [N, D] of tokens `tok` [N] that live in blocks `page` [N]; masked rows are 0."""
    row = page.to(tl.int64) * stride_blk + (tok % PAGE) * stride_tok
    return tl.load(cache_ptr + row[:, None] + tl.arange(0, D)[None, :], mask=mask[:, None], other=0.0)


@triton.jit
def load_paged_rows(cache_ptr, block_row_ptr, tok, mask, stride_blk, stride_tok,
                    PAGE: tl.constexpr, D: tl.constexpr):
    """Gather cache rows for token indices `tok` [N] of one sequence: [N, D], masked rows are 0."""
    page = tl.load(block_row_ptr + tok // PAGE, mask=mask, other=0)
    return load_page_rows(cache_ptr, page, tok, mask, stride_blk, stride_tok, PAGE, D)


@triton.jit
def round_to_e4m3(x):
    """x (fp32, |x| <= 448) rounded to the nearest E4M3 value, ties to even, still as fp32.

    Done by hand so the final fp32 -> fp8 cast is exact on every backend: Triton's CPU interpreter
    mis-rounds that cast when the mantissa carries into the exponent (127.9 -> 64 instead of 128).
    """
    exp = ((x.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    exp = tl.maximum(exp, -6)  # below 2^-6 E4M3 is subnormal with a fixed step of 2^-9
    step = ((exp - 3 + 127) << 23).to(tl.float32, bitcast=True)  # 3 mantissa bits
    magic = 12582912.0  # 1.5 x 2^23: adding and subtracting it rounds |y| < 2^22 to an integer, ties to even
    r = ((x / step + magic) - magic) * step
    return tl.where(r == 0.0, x * 0.0, r)  # keep the sign of values that round to zero, as a cast does


@triton.jit
def _write_kv_kernel(k_ptr, v_ptr, slot_ptr, pos_ptr, table_ptr, kc_ptr, vc_ptr, k_scale_ptr, v_scale_ptr,
                     stride_k, stride_v, stride_table, stride_kc_blk, stride_kc_tok, stride_vc_blk,
                     stride_vc_tok,
                     PAGE: tl.constexpr, HALF: tl.constexpr, ROPE: tl.constexpr, QUANT: tl.constexpr):
    """One program per new token: (rotate K), (scale + clamp to E4M3), store into its cache slot."""
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:
        d = tl.arange(0, HALF)[None, :]
        k1 = tl.load(k_ptr + t * stride_k + d).to(tl.float32)
        k2 = tl.load(k_ptr + t * stride_k + HALF + d).to(tl.float32)
        v1 = tl.load(v_ptr + t * stride_v + d).to(tl.float32)
        v2 = tl.load(v_ptr + t * stride_v + HALF + d).to(tl.float32)
        if ROPE:
            pos = tl.load(pos_ptr + t).to(tl.int64)
            k1, k2 = rope_rotate(k1, k2, table_ptr + pos * stride_table, HALF)
        if QUANT:
            k_inv = 1.0 / tl.load(k_scale_ptr)
            v_inv = 1.0 / tl.load(v_scale_ptr)
            k1 = round_to_e4m3(tl.clamp(k1 * k_inv, -448.0, 448.0))
            k2 = round_to_e4m3(tl.clamp(k2 * k_inv, -448.0, 448.0))
            v1 = round_to_e4m3(tl.clamp(v1 * v_inv, -448.0, 448.0))
            v2 = round_to_e4m3(tl.clamp(v2 * v_inv, -448.0, 448.0))
        kc = kc_ptr + (slot // PAGE) * stride_kc_blk + (slot % PAGE) * stride_kc_tok + d
        vc = vc_ptr + (slot // PAGE) * stride_vc_blk + (slot % PAGE) * stride_vc_tok + d
        tl.store(kc, k1.to(kc_ptr.dtype.element_ty))
        tl.store(kc + HALF, k2.to(kc_ptr.dtype.element_ty))
        tl.store(vc, v1.to(vc_ptr.dtype.element_ty))
        tl.store(vc + HALF, v2.to(vc_ptr.dtype.element_ty))


def write_kv(cache: PagedKVCache, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor,
             positions: torch.Tensor | None = None, rope_table: torch.Tensor | None = None) -> None:
    """Write new k, v [T, D] into their slots; RoPE on k first when positions + rope_table are given."""
    T, D = k.shape if k.dim() == 2 else (-1, -1)
    check(k.dim() == 2 and v.shape == k.shape and cache.head_dim == D,
          f"write_kv: k and v must be [tokens, {cache.head_dim}], got {tuple(k.shape)} and {tuple(v.shape)}")
    check(k.stride(-1) == 1 and v.stride(-1) == 1 and D & (D - 1) == 0,
          "write_kv: head_dim must be a power of two and contiguous in k and v")
    check(slot_mapping.shape == (T,) and slot_mapping.dtype in (torch.int32, torch.int64),
          f"write_kv: slot_mapping must be int32/int64 [{T}], got {slot_mapping.dtype} "
          f"{tuple(slot_mapping.shape)}")
    rope = rope_table is not None
    check(rope == (positions is not None), "write_kv: pass both positions and rope_table, or neither")
    if rope:
        check(positions.shape == (T,) and rope_table.shape[1:] == (D,) and rope_table.dtype == torch.float32,
              f"write_kv: positions must be [{T}] and rope_table float32 [max_positions, {D}]")
    devices = {t.device for t in (k, v, slot_mapping, cache.k) + ((positions, rope_table) if rope else ())}
    check(len(devices) == 1, f"write_kv: all tensors must be on one device, got {sorted(map(str, devices))}")
    if T == 0:
        return
    dummy = slot_mapping  # never read when ROPE is off
    _write_kv_kernel[(T,)](
        k, v, slot_mapping, positions if rope else dummy, rope_table if rope else dummy, cache.k, cache.v,
        cache.k_scale, cache.v_scale, k.stride(0), v.stride(0), rope_table.stride(0) if rope else 0,
        cache.k.stride(0), cache.k.stride(1), cache.v.stride(0), cache.v.stride(1),
        PAGE=cache.block_size, HALF=D // 2, ROPE=rope, QUANT=cache.is_fp8, num_warps=1 if D <= 128 else 2)


def write_kv_ref(cache: PagedKVCache, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor,
                 positions: torch.Tensor | None = None, theta: float | None = None) -> None:
    """Torch reference of `write_kv` (RoPE through rope.apply_rope_ref, in float64)."""
    from runtime.kernels.rope import apply_rope_ref

    k32 = apply_rope_ref(k, positions, theta).float().to(k.device) if positions is not None else k.float()
    v32 = v.float()
    if cache.is_fp8:
        k32 = (k32 / cache.k_scale).clamp(-FP8_MAX, FP8_MAX)
        v32 = (v32 / cache.v_scale).clamp(-FP8_MAX, FP8_MAX)
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    blk, row = slots // cache.block_size, slots % cache.block_size
    cache.k[blk, row] = k32[keep].to(cache.k.dtype)
    cache.v[blk, row] = v32[keep].to(cache.v.dtype)


def gather_kv_ref(cache: PagedKVCache, block_table: torch.Tensor,
                  seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence's first seq_len cached tokens, dequantized to float64: (k [L, D], v [L, D])."""
    t = torch.arange(seq_len, device=block_table.device)
    blk, row = block_table[t // cache.block_size].long(), t % cache.block_size
    k = cache.k[blk, row].double() * cache.k_scale.double()
    v = cache.v[blk, row].double() * cache.v_scale.double()
    return k, v

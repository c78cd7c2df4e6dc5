"""RoPE, NeoX rotate-half over all head_dim dims (STEP3.md section 3), as a Triton kernel.

For dim pair (i, i + D/2) at position p, with f_i = theta^(-2i/D):
    out_i       = x_i * cos(p f_i) - x_{i+D/2} * sin(p f_i)
    out_{i+D/2} = x_{i+D/2} * cos(p f_i) + x_i * sin(p f_i)
The angles p * f_i reach 65536 rad, where a float32 angle is off by up to 4e-3 rad, so cos/sin are
computed ONCE in float64 (like runtime/model/reference.apply_rope) into a table [max_positions, D]
(cos in the first D/2 columns, sin in the last D/2) that kernels gather rows of.

Memory traffic of `apply_rope`: read x and write x (T x heads x D values each way) plus one table row
(D x 4 bytes) per token. The K side of RoPE is fused into the KV-cache write (kv_cache.write_kv): K is
rotated in registers on its way into the cache, so it never makes a separate trip through memory.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from converters.errors import Step3Error


def rope_cos_sin_table(max_positions: int, head_dim: int, theta: float,
                       device: torch.device | str = "cpu") -> torch.Tensor:
    """[max_positions, head_dim] float32: cos(p f_i) | sin(p f_i), computed in float64."""
    if head_dim % 2 or max_positions <= 0 or theta <= 0:
        raise Step3Error(f"rope table: need an even head_dim, positive max_positions and theta; got "
                         f"head_dim={head_dim}, max_positions={max_positions}, theta={theta}")
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))  # [D/2]
    angles = torch.arange(max_positions, dtype=torch.float64)[:, None] * inv_freq[None, :]  # [P, D/2]
    return torch.cat([angles.cos(), angles.sin()], dim=-1).float().to(device)


@triton.jit
def rope_rotate(x1, x2, table_row_ptr, HALF: tl.constexpr):
    """Rotate the halves x1, x2 ([..., HALF] fp32) by one table row; returns the two rotated halves."""
    offs = tl.arange(0, HALF)
    cos = tl.load(table_row_ptr + offs)[None, :]
    sin = tl.load(table_row_ptr + HALF + offs)[None, :]
    return x1 * cos - x2 * sin, x2 * cos + x1 * sin


@triton.jit
def _rope_kernel(x_ptr, out_ptr, pos_ptr, table_ptr, stride_xt, stride_xh, stride_ot, stride_oh,
                 stride_table, NH: tl.constexpr, NH_PAD: tl.constexpr, HALF: tl.constexpr):
    """One program per token: all heads of that token, [NH_PAD, 2 * HALF], rotated in fp32."""
    t = tl.program_id(0)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    h = tl.arange(0, NH_PAD)[:, None]
    d = tl.arange(0, HALF)[None, :]
    mask = h < NH
    x_row = x_ptr + t.to(tl.int64) * stride_xt + h * stride_xh + d
    x1 = tl.load(x_row, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_row + HALF, mask=mask, other=0.0).to(tl.float32)
    y1, y2 = rope_rotate(x1, x2, table_ptr + pos * stride_table, HALF)
    o_row = out_ptr + t.to(tl.int64) * stride_ot + h * stride_oh + d
    tl.store(o_row, y1.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(o_row + HALF, y2.to(out_ptr.dtype.element_ty), mask=mask)


def _as_3d(x: torch.Tensor, name: str) -> torch.Tensor:
    """[T, D] -> [T, 1, D]; [T, heads, D] unchanged; anything else is a caller error."""
    if x.dim() == 2:
        return x.unsqueeze(1)
    if x.dim() != 3:
        raise Step3Error(f"apply_rope: '{name}' must be [tokens, head_dim] or [tokens, heads, head_dim], "
                         f"got shape {tuple(x.shape)}")
    return x


def apply_rope(x: torch.Tensor, positions: torch.Tensor, table: torch.Tensor,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """Rotate x [T, (heads,) D] at positions [T] using `rope_cos_sin_table`; `out=x` works in place."""
    x3 = _as_3d(x, "x")
    T, NH, D = x3.shape
    if tuple(table.shape[1:]) != (D,) or table.dtype != torch.float32:
        raise Step3Error(f"apply_rope: table must be float32 [max_positions, {D}] (rope_cos_sin_table), got "
                         f"{table.dtype} {tuple(table.shape)}")
    if positions.shape != (T,) or positions.dtype not in (torch.int32, torch.int64):
        raise Step3Error(f"apply_rope: positions must be int32/int64 [{T}], got {positions.dtype} "
                         f"{tuple(positions.shape)}")
    if D & (D - 1) or x3.stride(-1) != 1:
        raise Step3Error(f"apply_rope: head_dim must be a power of two with unit stride, got D={D}, "
                         f"stride {x3.stride(-1)}")
    out = torch.empty_like(x) if out is None else out
    o3 = _as_3d(out, "out")
    if o3.shape != x3.shape or o3.stride(-1) != 1:
        raise Step3Error(f"apply_rope: out must match x's shape {tuple(x.shape)} with unit last stride")
    if T:
        _rope_kernel[(T,)](x3, o3, positions, table, x3.stride(0), x3.stride(1), o3.stride(0), o3.stride(1),
                           table.stride(0), NH=NH, NH_PAD=triton.next_power_of_2(NH), HALF=D // 2,
                           num_warps=4)
    return out


def apply_rope_ref(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """float64 torch reference: x [T, (heads,) D] at positions [T] -> float64, same shape."""
    D = x.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    angles = positions.double().cpu()[:, None] * inv_freq[None, :]  # [T, D/2]
    shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (D // 2,)
    cos, sin = angles.cos().view(shape), angles.sin().view(shape)
    x64 = x.double().cpu()
    x1, x2 = x64[..., : D // 2], x64[..., D // 2:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

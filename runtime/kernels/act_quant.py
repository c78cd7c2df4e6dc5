"""Activation quantization: [T, K] (BF16/FP32) -> FP8 E4M3 + one float32 scale per 1x128 group.

Same arithmetic as the weight format (quant/fp8.py, STEP3.md section 4), on 1x128 groups:
    amax = max|x| over the group;  scale = 448 / amax (1 when amax == 0);
    q = e4m3(x * scale) (round to nearest even);  scale_inv = 1 / scale, so x ~= q * scale_inv.
Scales are stored "outer-dim-major" (a [K/128, T] buffer viewed as [T, K/128]), the layout that
`torch._scaled_mm` wants for 1x128 blockwise scaling; the Triton GEMMs take any strides.
Memory traffic: read T*K inputs, write T*K bytes + T*K/128 scales: one pass.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from converters.errors import Step3Error
from quant.fp8 import FP8_DTYPE, FP8_MAX

GROUP = 128


class Fp8Act(NamedTuple):
    """Activations quantized per 1x128 group: q [T, K] float8_e4m3fn, scale_inv [T, ceil(K/128)] fp32."""

    q: torch.Tensor
    scale_inv: torch.Tensor


@triton.jit
def round_to_e4m3(x):
    """Round fp32 to the nearest-even E4M3 value, in fp32, so the cast to fp8 that follows is exact.

    The Triton interpreter's fp8 cast drops the carry into the exponent (7.9 -> 4.0), so rounding is
    done here explicitly: normals keep 3 mantissa bits (integer RNE on the fp32 bits), subnormals
    (|x| < 2^-6) round to multiples of 2^-9 by adding and subtracting 1.5 * 2^14.
    """
    bits = x.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576  # -1048576 == 0xFFF00000
    normal = bits.to(tl.float32, bitcast=True)
    subnormal = (x + 24576.0) - 24576.0
    y = tl.where(tl.abs(x) < 0.015625, subnormal, normal)
    return tl.minimum(tl.maximum(y, -448.0), 448.0)


# On a GPU the fp32 -> E4M3 cast itself (cvt.rn.satfinite.e4m3x2.f32, sm_89+) rounds to nearest even and
# saturates at 448, as torch's cast does, so only the interpreter needs round_to_e4m3 before it.
# Skipping it cuts act_quant from ~23 to ~11 PTX instructions per element: at 8192 x 18432 the issue
# time (~0.10 ms at one instruction per lane and clock) was as long as the memory time (NOTES_ffn.md).
_INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")


@triton.jit
def pre_cast_e4m3(x):
    """x (already scaled into [-448, 448]) made ready for `.to(float8e4nv)`: rounded in fp32 only
    under the interpreter; on a GPU the cast rounds. The result is NOT fp8-exact on a GPU."""
    if _INTERPRETED:
        x = round_to_e4m3(x)
    return x


@triton.jit
def quantize_rows(x, valid_cols):
    """x [R, 128] fp32 (masked columns = 0) -> (values to cast to fp8, scale_inv [R]) per row."""
    amax = tl.max(tl.abs(tl.where(valid_cols, x, 0.0)), axis=1)
    amax = tl.where(amax > 0, amax, 1.0)
    scale = tl.math.div_rn(tl.full(amax.shape, 448.0, tl.float32), amax)  # IEEE division, as torch does
    return pre_cast_e4m3(x * scale[:, None]), tl.math.div_rn(tl.full(amax.shape, 1.0, tl.float32), scale)


@triton.jit
def _act_quant_kernel(x_ptr, q_ptr, s_ptr, T, K, stride_xt, stride_qt, stride_st, stride_sg,
                      BLOCK_T: tl.constexpr, GROUPS: tl.constexpr):
    # a [BLOCK_T, GROUPS, 128] tile: each row contributes GROUPS * 128 contiguous inputs (long bursts)
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    gidx = tl.program_id(1) * GROUPS + tl.arange(0, GROUPS)
    cols = gidx[None, :, None] * 128 + tl.arange(0, 128)[None, None, :]
    mask = (rows[:, None, None] < T) & (cols < K)
    x = tl.load(x_ptr + rows[:, None, None] * stride_xt + cols, mask=mask, other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(x), axis=2)  # [BLOCK_T, GROUPS]; masked columns are 0
    amax = tl.where(amax > 0, amax, 1.0)
    scale = tl.math.div_rn(tl.full(amax.shape, 448.0, tl.float32), amax)  # IEEE division, as torch does
    q = pre_cast_e4m3(x * scale[:, :, None])
    tl.store(q_ptr + rows[:, None, None] * stride_qt + cols, q.to(q_ptr.dtype.element_ty), mask=mask)
    s = tl.math.div_rn(tl.full(scale.shape, 1.0, tl.float32), scale)
    s_mask = (rows[:, None] < T) & (gidx[None, :] * 128 < K)
    tl.store(s_ptr + rows[:, None] * stride_st + gidx[None, :] * stride_sg, s, mask=s_mask)


def act_quant(x: torch.Tensor) -> Fp8Act:
    """x [T, K] (row-major, BF16/FP16/FP32) -> Fp8Act. Scales come back outer-dim-major."""
    if x.dim() != 2 or x.stride(1) != 1:
        raise Step3Error(f"act_quant: need a row-major [tokens, K] tensor, got shape {tuple(x.shape)} "
                         f"strides {x.stride()}; call .contiguous() first")
    T, K = x.shape
    groups = triton.cdiv(K, GROUP)
    q = torch.empty((T, K), dtype=FP8_DTYPE, device=x.device)
    s = torch.empty((groups, T), dtype=torch.float32, device=x.device).t()  # [T, groups], stride (1, T)
    if T:
        block_t, per_prog = 4, 8  # 4 rows x 1024 columns per program
        _act_quant_kernel[(triton.cdiv(T, block_t), triton.cdiv(groups, per_prog))](
            x, q, s, T, K, x.stride(0), q.stride(0), s.stride(0), s.stride(1),
            BLOCK_T=block_t, GROUPS=per_prog, num_warps=4)
    return Fp8Act(q, s)


def act_quant_ref(x: torch.Tensor) -> Fp8Act:
    """Torch reference of `act_quant` (same formula, quant/fp8.py's IEEE-division convention)."""
    T, K = x.shape
    pad = -K % GROUP
    g = torch.nn.functional.pad(x.float(), (0, pad)).view(T, -1, GROUP)  # [T, groups, 128]
    amax = g.abs().amax(dim=-1)
    amax = torch.where(amax > 0, amax, torch.ones_like(amax))
    scale = torch.full_like(amax, FP8_MAX) / amax  # [T, groups]
    q = (g * scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).view(T, -1)[:, :K]
    return Fp8Act(q.contiguous(), 1.0 / scale)


def act_dequant(a: Fp8Act) -> torch.Tensor:
    """Fp8Act -> fp32 [T, K]: q * scale_inv of its group."""
    K = a.q.shape[1]
    return a.q.float() * a.scale_inv.repeat_interleave(GROUP, dim=1)[:, :K]

"""SwiGLU MLP in block FP8: the dense layers' MLP and the MoE's shared expert, whole or as a 1/F slice.

    y = down(q(silu(gate x) * up x)),  q = 1x128 activation quantization (act_quant.py)
First half, two ways: (a) "fused": one Triton program computes a gate tile AND the matching up tile
from the same FP8 activation tile, applies silu-and-mul and quantizes the result per 1x128 group in
its epilogue (fp8_gemm.py, SWIGLU + QUANT_OUT), so the [T, I] intermediate crosses memory once, as
FP8; (b) "scaled_mm": ONE cuBLAS blockwise GEMM over [gate; up] (fp32 out, N = 2I: MlpWeights keeps
gate and up as the two halves of one tensor), then one pass of `silu_mul_quant` (reads 8 bytes, writes
~1 byte per intermediate element): faster wherever cuBLAS serves fp8_matmul (from 64 tokens): the MLP
alone 0.57-0.94x the fused kernel's time at 64-2048 tokens, the MoE layer 0.95-0.99x at 64-1024
(benchmarks/NOTES_ffn.md runs 15-16); the one GEMM instead of two, bit-equal, takes the shared expert's
first half to 0.60x at 128 tokens, 0.79x at 512, 0.84x at 1024 and 0.97-0.99x from 2048 (run 19: fewer
launches, and a grid of 2I / tile columns fills the SMs' last wave better). "auto" picks it there.
Second half: the down projection through fp8_matmul (cuBLAS blockwise on Hopper).
Tensor parallelism: rank r of F holds rows [r I/F, (r+1) I/F) of gate/up and those columns of down.
With I/F a multiple of 128 every quantization group stays whole, so the F partial outputs sum to the
unsliced output (up to fp32 summation order).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from converters.errors import Step3Error
from quant.fp8 import FP8_DTYPE, dequantize_fp8
from runtime.kernels.act_quant import Fp8Act, act_dequant, act_quant, act_quant_ref, quantize_rows
from runtime.kernels.fp8_gemm import fp8_gemm
from runtime.kernels.fp8_linear import (
    SCALED_MM_MIN_TOKENS,
    fp8_matmul,
    scaled_mm_usable,
    scaled_mm_weight_scale,
)


@dataclass(frozen=True)
class MlpWeights:
    """gate/up [I, H] and down [H, I] in FP8 with their [ceil(out/128), ceil(in/128)] scales.

    With I a multiple of 128 (whole scale blocks), gate and up are stored as the two halves of one [2I, H]
    tensor (`gate_up`; packed here, one copy, unless they already are), so cuBLAS's first half is one GEMM.
    """

    gate: torch.Tensor
    gate_scale: torch.Tensor
    up: torch.Tensor
    up_scale: torch.Tensor
    down: torch.Tensor
    down_scale: torch.Tensor
    name: str = "mlp"

    def __post_init__(self) -> None:
        inter, hidden = self.gate.shape
        expected = (("gate_proj", self.gate, (inter, hidden)), ("up_proj", self.up, (inter, hidden)),
                    ("down_proj", self.down, (hidden, inter)))
        for label, w, shape in expected:
            if w.dtype != FP8_DTYPE or tuple(w.shape) != shape:
                raise Step3Error(f"{self.name}.{label}: expected float8_e4m3fn {shape}, got {w.dtype} "
                                 f"{tuple(w.shape)}")
        if inter % 128 == 0:  # whole scale blocks: [gate; up]'s scales are the two stacked
            for suffix in ("", "_scale"):
                gate, up = getattr(self, "gate" + suffix), getattr(self, "up" + suffix)
                if _halves_of_one(gate, up) is None:
                    packed = torch.cat([gate, up])
                    object.__setattr__(self, "gate" + suffix, packed[: len(gate)])
                    object.__setattr__(self, "up" + suffix, packed[len(gate):])

    @property
    def intermediate(self) -> int:
        return self.gate.shape[0]

    @property
    def gate_up(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """[gate; up] [2I, H] and its scales (views of gate's and up's storage); None unless packed."""
        w, s = _halves_of_one(self.gate, self.up), _halves_of_one(self.gate_scale, self.up_scale)
        return None if w is None or s is None else (w, s)

    @cached_property
    def mm_scales(self) -> tuple[torch.Tensor, torch.Tensor]:
        """[gate; up]'s and down's scales in torch._scaled_mm's layout, made once (not at every call)."""
        return scaled_mm_weight_scale(self.gate_up[1]), scaled_mm_weight_scale(self.down_scale)


def _halves_of_one(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor | None:
    """The contiguous tensor whose first and second halves (along dim 0) are a and b, if there is one."""
    if not (a.is_contiguous() and b.is_contiguous() and a.shape == b.shape and a.dtype == b.dtype
            and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
            and b.storage_offset() == a.storage_offset() + a.numel()):
        return None
    return a.new_empty(0).set_(a.untyped_storage(), a.storage_offset(), (2 * a.shape[0], *a.shape[1:]))


def mlp_tp_slice(w: MlpWeights, rank: int, world: int) -> MlpWeights:
    """Rank `rank` of `world`'s slice of the intermediate dimension (rows of gate/up, columns of down)."""
    inter = w.intermediate
    part = inter // world
    if not 0 <= rank < world or inter % world or (world > 1 and part % 128):
        raise Step3Error(f"{w.name}: cannot split intermediate size {inter} into {world} slices on "
                         f"128-column FP8 block boundaries (rank {rank}); use a world size that divides "
                         f"{inter // 128} blocks")
    rows = slice(rank * part, (rank + 1) * part)
    blocks = slice(rank * part // 128, -(-(rank + 1) * part // 128))
    return MlpWeights(w.gate[rows], w.gate_scale[blocks], w.up[rows], w.up_scale[blocks],
                      w.down[:, rows], w.down_scale[:, blocks], name=f"{w.name}[tp {rank}/{world}]")


@triton.jit
def _silu_mul_quant_kernel(g_ptr, u_ptr, q_ptr, s_ptr, T, N, stride_g, stride_u, stride_q,
                           stride_st, stride_sg, BLOCK_T: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * 128 + tl.arange(0, 128)
    mask = (rows[:, None] < T) & (cols[None, :] < N)
    g = tl.load(g_ptr + rows[:, None] * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + rows[:, None] * stride_u + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    q, s = quantize_rows(g * tl.sigmoid(g) * u, cols[None, :] < N)
    tl.store(q_ptr + rows[:, None] * stride_q + cols[None, :], q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + rows * stride_st + tl.program_id(1) * stride_sg, s, mask=rows < T)


def silu_mul_quant(gate: torch.Tensor, up: torch.Tensor) -> Fp8Act:
    """q(silu(gate) * up) per 1x128 group: [T, I] BF16/FP32 pair -> Fp8Act (scales outer-dim-major)."""
    T, inter = gate.shape
    q = torch.empty((T, inter), dtype=FP8_DTYPE, device=gate.device)
    s = torch.empty((-(-inter // 128), T), dtype=torch.float32, device=gate.device).t()
    if T:
        _silu_mul_quant_kernel[(triton.cdiv(T, 32), triton.cdiv(inter, 128))](
            gate, up, q, s, T, inter, gate.stride(0), up.stride(0), q.stride(0), s.stride(0), s.stride(1),
            BLOCK_T=32, num_warps=4)
    return Fp8Act(q, s)


def swiglu_quant(x: Fp8Act, w: MlpWeights, block_m: int = 64, num_warps: int = 4,
                 num_stages: int = 3) -> Fp8Act:
    """The fused first half: q(silu(x gate^T) * (x up^T)) -> Fp8Act [T, I]."""
    T, inter = x.q.shape[0], w.intermediate
    q = torch.empty((T, inter), dtype=FP8_DTYPE, device=x.q.device)
    s = torch.empty((-(-inter // 128), T), dtype=torch.float32, device=x.q.device).t()  # outer-dim-major
    fp8_gemm(x.q, x.scale_inv, w.gate, w.gate_scale, q, b2=w.up, b2_scale=w.up_scale, out_scale=s,
             block_m=block_m, block_n=128, num_warps=num_warps, num_stages=num_stages)
    return Fp8Act(q, s)


def swiglu_mlp(x: torch.Tensor | Fp8Act, w: MlpWeights, out_dtype: torch.dtype | None = None,
               first_half: str = "auto") -> torch.Tensor:
    """x [T, H] (BF16/FP32, or already quantized) -> [T, H] in out_dtype (default: x's dtype / BF16).

    first_half: "fused" (Triton), "scaled_mm" (cuBLAS + silu_mul_quant, Hopper only) or "auto".
    """
    if not isinstance(x, Fp8Act):
        out_dtype = out_dtype or x.dtype
        x = act_quant(x)
    T, hidden = x.q.shape
    if hidden != w.gate.shape[1]:
        raise Step3Error(f"{w.name}: input width {hidden} != hidden size {w.gate.shape[1]}")
    cublas = scaled_mm_usable(x.q.device, w.intermediate, hidden)
    if first_half == "auto":
        first_half = "scaled_mm" if cublas and T >= SCALED_MM_MIN_TOKENS else "fused"
    if first_half == "scaled_mm":
        # fp32 out: a BF16 rounding here would flip ~5% of the FP8 roundings that follow (~1.3% error)
        gate_up = fp8_matmul(x, *w.gate_up, torch.float32, mm_scale=w.mm_scales[0],
                             name=f"{w.name}.gate_proj+up_proj")
        h = silu_mul_quant(gate_up[:, : w.intermediate], gate_up[:, w.intermediate:])
    else:
        h = swiglu_quant(x, w, block_m=16 if T <= 16 else 64)
    return fp8_matmul(h, w.down, w.down_scale, out_dtype=out_dtype or torch.bfloat16,
                      mm_scale=w.mm_scales[1] if cublas else None, name=f"{w.name}.down_proj")


def swiglu_mlp_ref(x: torch.Tensor, w: MlpWeights) -> torch.Tensor:
    """fp32 reference: dequantized weights, the same two activation quantizations, fp32 arithmetic."""
    xd = act_dequant(act_quant_ref(x.float()))
    g = xd @ dequantize_fp8(w.gate, w.gate_scale).t()
    u = xd @ dequantize_fp8(w.up, w.up_scale).t()
    h = act_dequant(act_quant_ref(F.silu(g) * u))
    return h @ dequantize_fp8(w.down, w.down_scale).t()

"""FP8 linear: y = x @ W^T with W block-FP8 (128x128 scales) and x quantized per 1x128 group.

Two back ends for the matmul, one formula:
    y[t, n] = sum_kb (x_q[t, kb] . W_q[n, kb]) * x_scale[t, kb] * w_scale[n // 128, kb]
- Hopper (sm_90+, CUDA), T >= 64: `torch._scaled_mm` with blockwise scales (cuBLAS). It infers the
  (BlockWise1x128, BlockWise128x128) recipe from the scale shapes; the activation scales must be
  outer-dim-major ([T, K/128], stride (1, T): what act_quant returns) and the weight scales are
  passed as [K/128, N/128] with stride (1, L4), L4 = K/128 rounded up to 4 (the padded buffer that
  `scaled_mm_weight_scale` builds once per weight). Seen on an H200 with torch 2.11: cuBLAS refuses
  (NOT_SUPPORTED / "invalid scaling configuration") T = 1, 37, 70 and K = 384, so T is padded to a
  multiple of 16 (16-byte-aligned scale strides) and K must hold a multiple of 4 blocks.
- Elsewhere (CPU interpreter, few tokens, odd shapes): the Triton block-FP8 GEMM of fp8_gemm.py.
Traffic: x read twice (quantize, then the GEMM reads T*K bytes of FP8), W read once, y written once.
"""

from __future__ import annotations

import functools
import warnings

import torch
import triton

from converters.errors import Step3Error
from quant.fp8 import FP8_DTYPE, dequantize_fp8
from runtime.kernels.act_quant import Fp8Act, act_dequant, act_quant, act_quant_ref
from runtime.kernels.fp8_gemm import fp8_gemm

SCALED_MM_MIN_TOKENS = 64  # below this the (weight-bandwidth-bound) Triton GEMM serves
_PAD_M = 16


@functools.lru_cache(maxsize=16)
def _capability(device_index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


def cuda_capability(device: torch.device) -> tuple[int, int]:
    """(major, minor) of a CUDA device, (0, 0) for any other; cached, since every linear and MoE call asks."""
    if device.type != "cuda":
        return (0, 0)
    return _capability(device.index if device.index is not None else torch.cuda.current_device())


# The Tritons our Gluon kernels (fp8_gemm_ws*.py, mfa_decode_ws.py) run on, each checked on the H200 (GPU
# tests, ptxas, benchmarks/gluon_tritons.py): 3.6 (torch 2.10-2.11), 3.7 (2.12-2.13), 3.8 (2.14), 3.9 (2.15).
# gluon_api.py spells what moved between them. Elsewhere the portable Triton kernels serve.
GLUON_TRITONS = ("3.6.", "3.7.", "3.8.", "3.9.")


def gluon_usable(device: torch.device) -> bool:
    """Hopper with a Triton of GLUON_TRITONS; never the CPU interpreter. Hopper with another Triton warns
    once: the portable kernels then serve, slower, and that should not go unnoticed."""
    if cuda_capability(device)[0] != 9:
        return False
    if triton.__version__.startswith(GLUON_TRITONS):
        return True
    _warn_other_triton()
    return False


@functools.cache
def _warn_other_triton() -> None:
    known = ", ".join(v.rstrip(".") for v in GLUON_TRITONS)
    warnings.warn(f"Triton {triton.__version__}: step3's Hopper Gluon kernels run on Triton {known}; the "
                  "portable Triton kernels serve instead, slower", RuntimeWarning, stacklevel=3)


def scaled_mm_usable(device: torch.device, n: int, k: int) -> bool:
    """cuBLAS blockwise FP8 needs sm_90+, whole 128-blocks along N and 4 whole blocks along K."""
    return (n % 128 == 0 and k % 512 == 0 and hasattr(torch, "_scaled_mm")
            and cuda_capability(device) >= (9, 0))


def pad_rows(x: Fp8Act) -> Fp8Act:
    """Pad T to a multiple of 16 rows (zeros, scale 1) for cuBLAS; the extra output rows are dropped."""
    T, K = x.q.shape
    pad = -T % _PAD_M
    if not pad:
        return x
    q = torch.zeros((T + pad, K), dtype=torch.uint8, device=x.q.device)
    q[:T] = x.q.view(torch.uint8)
    s = torch.ones((x.scale_inv.shape[1], T + pad), dtype=torch.float32, device=x.q.device).t()
    s[:T] = x.scale_inv
    return Fp8Act(q.view(FP8_DTYPE), s)


def scaled_mm_weight_scale(scale_inv: torch.Tensor) -> torch.Tensor:
    """[..., N/128, K/128] weight scales -> [..., K/128, N/128] views, stride (1, L4), for _scaled_mm."""
    *lead, nb, kb = scale_inv.shape
    padded = torch.zeros((*lead, nb, -(-kb // 4) * 4), dtype=torch.float32, device=scale_inv.device)
    padded[..., :kb] = scale_inv
    return padded[..., :kb].transpose(-1, -2)


def scaled_mm(x: Fp8Act, w: torch.Tensor, mm_scale: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """torch._scaled_mm with 1x128 x 128x128 scales, rows padded for cuBLAS: [T, K] x [N, K]^T -> [T, N]."""
    xp = pad_rows(x)
    y = torch._scaled_mm(xp.q, w.t(), scale_a=xp.scale_inv, scale_b=mm_scale, out_dtype=out_dtype)
    return y[: x.q.shape[0]] if xp is not x else y


def _check(x: Fp8Act, w: torch.Tensor, w_scale: torch.Tensor, name: str) -> None:
    if w.dtype != FP8_DTYPE or w.dim() != 2:
        raise Step3Error(f"{name}: expected a 2-D float8_e4m3fn weight, got {w.dtype} {tuple(w.shape)}")
    if x.q.shape[1] != w.shape[1]:
        raise Step3Error(f"{name}: input width {x.q.shape[1]} does not match the weight's {w.shape[1]} "
                         f"(weight shape {tuple(w.shape)}, [out, in])")
    expected = (triton.cdiv(w.shape[0], 128), triton.cdiv(w.shape[1], 128))
    if tuple(w_scale.shape) != expected:
        raise Step3Error(f"{name}: weight_scale_inv has shape {tuple(w_scale.shape)}, expected {expected}")


def fp8_matmul(x: Fp8Act, w: torch.Tensor, w_scale: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16,
               mm_scale: torch.Tensor | None = None, name: str = "fp8 linear") -> torch.Tensor:
    """Quantized x [T, K] times block-FP8 W [N, K]^T -> [T, N] in out_dtype.

    `mm_scale` is `scaled_mm_weight_scale(w_scale)`, precomputed by Fp8Linear; given or not, the
    cuBLAS path is taken whenever `scaled_mm_usable` says so.
    """
    _check(x, w, w_scale, name)
    T, (N, K) = x.q.shape[0], w.shape
    if scaled_mm_usable(x.q.device, N, K) and T >= SCALED_MM_MIN_TOKENS:
        b_scale = mm_scale if mm_scale is not None else scaled_mm_weight_scale(w_scale)
        return scaled_mm(x, w, b_scale, out_dtype)
    out = torch.empty((T, N), dtype=out_dtype, device=x.q.device)
    block_m = 16 if T <= 16 else 64
    return fp8_gemm(x.q, x.scale_inv, w, w_scale, out, block_m=block_m, block_n=128)


def fp8_linear(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
               mm_scale: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] (BF16/FP32) -> act_quant -> FP8 matmul -> [..., N] in x's dtype."""
    lead = x.shape[:-1]
    y = fp8_matmul(act_quant(x.reshape(-1, x.shape[-1])), w, w_scale, out_dtype=x.dtype, mm_scale=mm_scale)
    return y.reshape(*lead, w.shape[0])


def fp8_linear_ref(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """fp32 reference: the same 1x128 activation rounding, dequantized weights, fp32 arithmetic."""
    x2 = x.reshape(-1, x.shape[-1])
    y = act_dequant(act_quant_ref(x2)) @ dequantize_fp8(w, w_scale).t()
    return y.reshape(*x.shape[:-1], w.shape[0])


class Fp8Linear(torch.nn.Module):
    """A block-FP8 linear layer (no bias): the weight and its scale, plus the cuBLAS scale layout."""

    def __init__(self, weight: torch.Tensor, scale_inv: torch.Tensor, name: str = "fp8 linear"):
        super().__init__()
        _check(Fp8Act(weight.new_empty((0, weight.shape[1])), scale_inv), weight, scale_inv, name)
        self.register_buffer("weight", weight)
        self.register_buffer("scale_inv", scale_inv)
        self.register_buffer("mm_scale", scaled_mm_weight_scale(scale_inv))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight, self.scale_inv, self.mm_scale)

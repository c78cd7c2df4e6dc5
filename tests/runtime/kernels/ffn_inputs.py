"""Random FP8 weights and activations shared by the FFN kernel tests (fixed seeds, never zeros)."""

from __future__ import annotations

import torch

from quant.fp8 import quantize_fp8

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# fp32 arithmetic everywhere on the CPU interpreter; on a GPU the FP8 tensor-core products are exact
# and accumulate in fp32 per 128-wide K step, while fp32 operands go through TF32.
EXACT_TOL = 1e-5 if DEVICE.type == "cpu" else 2e-3
# A re-quantized intermediate (MLP, MoE) turns the GPU's tiny differences (FP8 MMA accumulation,
# fast sigmoid) into occasional one-step flips of FP8 rounding: ~4e-3 seen on an H200.
REQUANT_TOL = 1e-5 if DEVICE.type == "cpu" else 1e-2
FP32_TOL = 1e-5 if DEVICE.type == "cpu" else 5e-3
# One 1x128 E4M3 activation quantization costs ~2.6% rms relative error (3 mantissa bits); a GEMM on
# few tokens scatters around that, hence 4e-2 for one quantized GEMM against unquantized activations.
FP8_ACT_TOL = 4e-2


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double().cpu(), ref.double().cpu()
    assert torch.isfinite(out).all()
    return ((out - ref).norm() / ref.norm()).item()


def randn(shape: tuple[int, ...], gen: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    """Gaussian values with rows of varying magnitude (so 1x128 scales differ), on DEVICE."""
    x = torch.randn(shape, generator=gen) * scale
    x = x * torch.rand(shape[:-1] + (1,), generator=gen).add(0.1)
    return x.to(DEVICE)


def fp8_weight(shape: tuple[int, ...], gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A random [..., out, in] weight (std 1/sqrt(in)) quantized to block FP8: (q, scale_inv) on DEVICE."""
    w = torch.randn(shape, generator=gen) / shape[-1] ** 0.5
    q, s = quantize_fp8(w)
    return q.to(DEVICE), s.to(DEVICE)

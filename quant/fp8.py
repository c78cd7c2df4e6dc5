"""Block FP8 (E4M3, one float32 scale per 128x128 tile): the step3-fp8 / DeepSeek-V3 weight format.

Arithmetic (STEP3.md section 4), identical to Transformer Engine's Float8BlockQuantizer with
power-of-2 scales off and amax_epsilon 0, so both backends produce the same bytes:
    amax = max|w| over the block (fp32);  scale = 448 / amax  (IEEE division);
    q = e4m3(w * scale)  (round to nearest even, clamped to +-448);  scale_inv = 1 / scale.
Like TE: an all-zero block gets scale 1, and a scale that overflows fp32 (amax below ~1.3e-36)
becomes FLT_MAX. Leading dims (experts) each get their own scale grid.
"""

from __future__ import annotations

import torch

from converters.errors import Step3Error

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
BLOCK = 128


def scale_grid_shape(shape: tuple[int, ...] | torch.Size, block: int = BLOCK) -> tuple[int, ...]:
    """[..., R, C] -> [..., ceil(R/b), ceil(C/b)]: one scale per tile, leading (expert) dims kept."""
    *lead, rows, cols = shape
    return (*lead, -(-rows // block), -(-cols // block))


def check_quantizable(w: torch.Tensor, name: str = "tensor") -> None:
    """Refuse what no backend can quantize faithfully: vectors and non-finite values (named)."""
    if w.dim() < 2:
        raise Step3Error(f"{name}: FP8 block quantization needs a matrix, got shape {tuple(w.shape)}; "
                         f"leave it out with --skip")
    if w.is_floating_point() and not torch.isfinite(w).all():
        bad = int((~torch.isfinite(w)).sum())
        raise Step3Error(f"{name}: contains {bad} NaN/Inf value(s); refusing to quantize it "
                         f"(fix the source checkpoint, or leave it out with --skip)")


def _pad_to_blocks(w: torch.Tensor, block: int) -> torch.Tensor:
    """Zero-pad the last two dims up to multiples of `block` (zeros never raise a block's amax)."""
    rows, cols = w.shape[-2:]
    pad_r, pad_c = -rows % block, -cols % block
    return torch.nn.functional.pad(w, (0, pad_c, 0, pad_r)) if pad_r or pad_c else w


def _blocked(w: torch.Tensor, block: int) -> torch.Tensor:
    """[..., R, C] (multiples of block) -> [..., R/b, b, C/b, b]."""
    *lead, rows, cols = w.shape
    return w.reshape(*lead, rows // block, block, cols // block, block)


def scale_from_amax(amax: torch.Tensor) -> torch.Tensor:
    """TE's compute_scale_from_amax (pow-2 off, epsilon 0): 448/amax, 1 for zero, FLT_MAX on overflow."""
    scale = torch.full_like(amax, FP8_MAX) / amax  # IEEE division; `448.0 / amax` rounds differently
    scale = torch.where(torch.isinf(scale), torch.finfo(torch.float32).max, scale)
    return torch.where(amax > 0, scale, torch.ones_like(scale))


def quantize_fp8(w: torch.Tensor, block: int = BLOCK,
                 name: str = "tensor") -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., R, C] -> (q float8_e4m3fn [..., R, C], scale_inv float32 [..., ceil(R/b), ceil(C/b)])."""
    check_quantizable(w, name)
    rows, cols = w.shape[-2:]
    blocks = _blocked(_pad_to_blocks(w.float(), block), block)  # [..., R/b, b, C/b, b]
    scale = scale_from_amax(blocks.abs().amax(dim=(-3, -1)))  # [..., R/b, C/b]
    scaled = blocks * scale[..., :, None, :, None]
    q = scaled.clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    q = q.reshape(*w.shape[:-2], scale.shape[-2] * block, scale.shape[-1] * block)[..., :rows, :cols]
    return q.contiguous(), torch.reciprocal(scale)


def dequantize_fp8(q: torch.Tensor, scale_inv: torch.Tensor, block: int = BLOCK,
                   dtype: torch.dtype = torch.float32, name: str = "tensor") -> torch.Tensor:
    """W = q * scale_inv[block] -> dtype. Shapes as `quantize_fp8` returns them."""
    rows, cols = q.shape[-2:]
    expected = scale_grid_shape(q.shape, block)
    if tuple(scale_inv.shape) != expected:
        raise Step3Error(f"{name}: weight_scale_inv has shape {tuple(scale_inv.shape)}, expected {expected} "
                         f"for an FP8 weight of shape {tuple(q.shape)} with {block}x{block} blocks")
    blocks = _blocked(_pad_to_blocks(q.float(), block), block)
    w = (blocks * scale_inv.float()[..., :, None, :, None]).reshape(
        *q.shape[:-2], expected[-2] * block, expected[-1] * block)
    return w[..., :rows, :cols].to(dtype)

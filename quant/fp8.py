"""Block FP8 (E4M3, one float32 scale per 128x128 tile): the step3-fp8 / DeepSeek-V3 weight format.

Arithmetic (STEP3.md section 4), identical to Transformer Engine's Float8BlockQuantizer with
power-of-2 scales off, so both backends produce the same bytes:
    amax = max|w| over the block (fp32);  scale = 448 / amax  (IEEE division);
    q = e4m3(w * scale)  (round to nearest even, clamped to +-448);  scale_inv = 1 / scale.
An all-zero block gets scale 1 (finite). Leading dims (experts) each get their own scale grid.
"""

from __future__ import annotations

import torch

from converters.errors import Step3Error

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
BLOCK = 128


def _pad_to_blocks(w: torch.Tensor, block: int) -> torch.Tensor:
    """Zero-pad the last two dims up to multiples of `block` (zeros never raise a block's amax)."""
    rows, cols = w.shape[-2:]
    pad_r, pad_c = -rows % block, -cols % block
    return torch.nn.functional.pad(w, (0, pad_c, 0, pad_r)) if pad_r or pad_c else w


def _blocked(w: torch.Tensor, block: int) -> torch.Tensor:
    """[..., R, C] (multiples of block) -> [..., R/b, b, C/b, b]."""
    *lead, rows, cols = w.shape
    return w.reshape(*lead, rows // block, block, cols // block, block)


def block_amax(w: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """max|w| per block x block tile of the last two dims, fp32, shape [..., ceil(R/b), ceil(C/b)]."""
    blocks = _blocked(_pad_to_blocks(w.float(), block), block)
    return blocks.abs().amax(dim=(-3, -1))


def quantize_fp8(w: torch.Tensor, block: int = BLOCK, name: str = "tensor") -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., R, C] -> (q float8_e4m3fn [..., R, C], scale_inv float32 [..., ceil(R/b), ceil(C/b)])."""
    if w.dim() < 2:
        raise Step3Error(f"{name}: FP8 block quantization needs a matrix, got shape {tuple(w.shape)}")
    w32 = w.float()
    if not torch.isfinite(w32).all():
        raise Step3Error(f"{name}: contains NaN or Inf; refusing to quantize it")
    amax = block_amax(w32, block)
    amax = torch.where(amax > 0, amax, torch.ones_like(amax))  # all-zero block: any finite scale works
    scale = torch.full_like(amax, FP8_MAX) / amax  # IEEE division; `448.0 / amax` rounds differently
    rows, cols = w.shape[-2:]
    expanded = scale.repeat_interleave(block, dim=-2).repeat_interleave(block, dim=-1)[..., :rows, :cols]
    q = (w32 * expanded).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, 1.0 / scale


def dequantize_fp8(q: torch.Tensor, scale_inv: torch.Tensor, block: int = BLOCK,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W = q * scale_inv[block] -> dtype. Shapes as `quantize_fp8` returns them."""
    rows, cols = q.shape[-2:]
    expected = (*q.shape[:-2], -(-rows // block), -(-cols // block))
    if tuple(scale_inv.shape) != expected:
        raise Step3Error(f"weight_scale_inv has shape {tuple(scale_inv.shape)}, expected {expected} "
                         f"for an FP8 weight of shape {tuple(q.shape)} with {block}x{block} blocks")
    s = scale_inv.float().repeat_interleave(block, dim=-2).repeat_interleave(block, dim=-1)[..., :rows, :cols]
    return (q.float() * s).to(dtype)

"""The Transformer Engine backend: TE's Float8BlockQuantizer (128x128 tiles, E4M3, pow-2 scales off).

Imported only when asked for: TE is an optional extra (`pip install step3[te]`, CUDA machines only).
TE flattens every leading dim into the rows, so a 3-D expert tensor is quantized one expert at a
time (a tile must never straddle two experts). TE pads the scale grid's last dim to a multiple of
4 for its GEMMs with uninitialised values; that padding is sliced off here.
"""

from __future__ import annotations

from functools import cache

import torch

from converters.errors import Step3Error
from quant.fp8 import BLOCK, FP8_DTYPE, check_quantizable, scale_grid_shape


@cache
def te_import_error() -> str | None:
    """Why TE cannot be used here (None when it can): it must import and CUDA must be there."""
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception as e:  # ImportError, or TE's own load errors (missing libcudnn, ...)
        return f"transformer_engine.pytorch does not import ({type(e).__name__}: {str(e)[:200]})"
    if not torch.cuda.is_available():
        return "Transformer Engine needs a CUDA GPU and none is visible"
    return None


def te_version() -> str:
    import transformer_engine

    return getattr(transformer_engine, "__version__", "unknown")


@cache
def _quantizer():
    from transformer_engine.pytorch import Float8BlockQuantizer
    from transformer_engine.pytorch.constants import DType

    q = Float8BlockQuantizer(DType.kFloat8E4M3, rowwise=True, columnwise=False, amax_epsilon=0.0,
                             force_pow_2_scales=False, block_scaling_dim=2)
    q.internal = True  # plain storage object, no autograd wrapper
    return q


def _quantize_2d(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One [R, C] matrix on the GPU -> (q float8_e4m3fn [R, C], scale_inv [ceil(R/128), ceil(C/128)])."""
    rows, cols = w.shape
    out = _quantizer()(w.contiguous())
    q = out._rowwise_data.view(FP8_DTYPE).reshape(rows, cols)
    grid = scale_grid_shape(w.shape)
    scale_inv = out._rowwise_scale_inv[: grid[0], : grid[1]]  # drop TE's GEMM padding
    return q, scale_inv.float().contiguous()


def te_quantize_fp8(w: torch.Tensor, block: int = BLOCK, name: str = "tensor",
                    device: torch.device | str = "cuda") -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as quant.fp8.quantize_fp8; results come back on the input's device."""
    if block != BLOCK:
        raise Step3Error(f"{name}: the Transformer Engine backend only does {BLOCK}x{BLOCK} blocks "
                         f"(asked for {block}); use --backend torch")
    why = te_import_error()
    if why is not None:
        raise Step3Error(f"--backend te: {why}. Install it with the `te` extra (README, FP8 section) "
                         f"or use --backend torch")
    check_quantizable(w, name)
    if w.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        w = w.float()
    src = w.to(device)
    lead = src.shape[:-2]
    flat = src.reshape(-1, *src.shape[-2:])
    parts = [_quantize_2d(m) for m in flat]  # one TE call per expert matrix
    q = torch.stack([p[0] for p in parts]).reshape(src.shape)
    scale_inv = torch.stack([p[1] for p in parts]).reshape(*lead, *scale_grid_shape(src.shape)[-2:])
    return q.to(w.device), scale_inv.to(w.device)

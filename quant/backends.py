"""One entry point for block-FP8 quantization, whichever backend does the arithmetic.

`torch` (quant/fp8.py) runs everywhere, on CPU or CUDA; `te` (quant/te_backend.py) calls Transformer
Engine's Float8BlockQuantizer. Both yield the same bytes (tests/quant/test_backends.py checks it where
TE imports). `auto` picks `te` when TE imports and CUDA is available, else `torch`.
"""

from __future__ import annotations

from typing import Literal

import torch

from converters.errors import Step3Error
from quant.fp8 import BLOCK, FP8_DTYPE, quantize_fp8, scale_grid_shape

BACKENDS = ("auto", "torch", "te")


def resolve_backend(backend: str) -> Literal["torch", "te"]:
    """`auto` -> `te` where TE is usable, else `torch`; `te` where it is not usable is an error."""
    if backend not in BACKENDS:
        raise Step3Error(f"--backend {backend!r} is not one of {', '.join(BACKENDS)}")
    if backend == "torch":
        return "torch"
    from quant.te_backend import te_import_error

    why = te_import_error()
    if backend == "te" and why is not None:
        raise Step3Error(f"--backend te: {why}. Install the `te` extra on a CUDA machine (README, FP8 "
                         f"section) or use --backend torch")
    return "te" if why is None else "torch"


def resolve_device(device: str | None) -> torch.device:
    """`--device`: None/cpu, or cuda[:N] which must exist (named error otherwise)."""
    if device in (None, "", "cpu"):
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise Step3Error(f"--device {device!r} is not a device name (use cpu or cuda)") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise Step3Error(f"--device {device}: no CUDA GPU is visible here; use --device cpu")
    return dev


def quantize_weight(w: torch.Tensor, backend: Literal["torch", "te"] = "torch", *, name: str = "tensor",
                    device: torch.device | str = "cpu", block: int = BLOCK
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(q float8_e4m3fn, scale_inv float32) on the CPU, computed on `device` by `backend`.

    `backend` must already be resolved (see resolve_backend). The te backend always computes on a GPU
    (`device` if it is one, else cuda).
    """
    if w.dim() > 2:  # experts one at a time: temporaries stay the size of one matrix
        q = torch.empty(w.shape, dtype=FP8_DTYPE)
        s = torch.empty(scale_grid_shape(w.shape, block), dtype=torch.float32)
        for i in range(w.shape[0]):
            q[i], s[i] = quantize_weight(w[i], backend, name=f"{name}[{i}]", device=device, block=block)
        return q, s
    if backend == "te":
        from quant.te_backend import te_quantize_fp8

        gpu = device if torch.device(device).type == "cuda" else "cuda"
        q, s = te_quantize_fp8(w, block, name, device=gpu)
    else:
        q, s = quantize_fp8(w.to(device), block, name)
    return q.cpu(), s.cpu()

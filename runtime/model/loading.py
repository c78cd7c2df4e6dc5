"""Where the reference model's weights come from: an HF checkpoint, an AFD layout, or a {name: tensor} dict.

`Step3Reference._load` reads any WeightSource tensor by tensor; FP8 weights arrive dequantized.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import torch

from converters.config import Step3Config
from converters.errors import CheckpointError
from converters.names import is_scale_name, scale_name
from quant.fp8 import FP8_DTYPE, dequantize_fp8


class WeightSource(Protocol):
    """What `_load` reads: an HF checkpoint (converters.hf.HFCheckpoint), an AFD layout, or a dict."""

    config: Step3Config

    def names(self) -> list[str]: ...

    def get_weight(self, name: str, dtype: torch.dtype) -> torch.Tensor: ...


class TensorDict:
    """A plain {name: tensor} mapping as a WeightSource; FP8 weights with a `_scale_inv` are dequantized."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], config: Step3Config | None = None):
        self.tensors, self.config, self.path = tensors, config, "<tensors>"

    def names(self) -> list[str]:
        return [n for n in self.tensors if not is_scale_name(n)]

    def get_weight(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        w = self.tensors[name]
        if w.dtype == FP8_DTYPE:
            if scale_name(name) not in self.tensors:
                raise CheckpointError(f"{name} is FP8 but {scale_name(name)} is missing; cannot dequantize")
            return dequantize_fp8(w, self.tensors[scale_name(name)], dtype=dtype, name=name)
        return w.to(dtype)


def open_weights(path: str | Path) -> WeightSource:
    """The weight source for a checkpoint directory (one line per supported layout)."""
    from converters.afd import AFDLayout, is_afd_layout
    from converters.hf import HFCheckpoint

    return AFDLayout(path).hf_view() if is_afd_layout(path) else HFCheckpoint(path)

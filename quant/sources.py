"""The input of `step3 quantize`, HF checkpoint or AFD layout, seen one way: stored pieces read on demand.

An HF checkpoint is a layout whose pieces are whole tensors keyed by their HF name; an AFD layout's
pieces are its manifest entries (keys `name` or `ffn/rank-K:name`, with slices). Either way a piece
is read alone (converters/slices.py: plain reads, no mmap), so memory holds one piece at a time.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from math import prod
from pathlib import Path
from typing import Any

import torch

from converters.afd import AFDLayout, is_afd_layout
from converters.config import Step3Config
from converters.convert import extra_files
from converters.hf import INDEX_FILE, HFCheckpoint
from converters.layout import CONFIG, MANIFEST, SourceTensor, ordered_tensors
from converters.names import is_scale_name
from converters.safetensors_io import DTYPE_BYTES
from converters.slices import read_tensor
from quant.report import REPORT_FILE


@dataclass(frozen=True)
class InPiece:
    """One stored input tensor (or slice): where it sits in the plan and how to read it."""

    key: str
    source: str  # HF name
    dtype: str  # safetensors dtype string
    shape: tuple[int, ...]
    slice: tuple[tuple[int, int, int], ...]
    read: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return prod(self.shape) * DTYPE_BYTES[self.dtype]


@dataclass
class QuantSource:
    """What the quantize pass needs of its input."""

    kind: str  # "hf" or "afd"
    path: Path
    cfg: Step3Config
    config: dict[str, Any]  # config.json as a dict (written back with the new quantization record)
    has_vision: bool
    tensors: list[SourceTensor]  # HF-level tensors (full shapes) in naming-table order, scale after weight
    pieces: dict[str, InPiece]
    copies: list[str]  # top-level files copied verbatim (tokenizer, generation config)
    inputs: list[Path]  # files whose size/mtime fingerprint the run (for --resume)
    ffn_ranks: int = 1
    attn_ranks: int = 1

    @property
    def is_fp8(self) -> bool:
        return any(is_scale_name(t.name) for t in self.tensors)


def _open_hf(path: Path) -> QuantSource:
    with HFCheckpoint(path) as ckpt:
        ckpt.validate()  # every problem listed at once, before anything is written
        infos = {n: ckpt.info(n) for n in ckpt.names()}
        shard = {n: ckpt.path / i.file for n, i in infos.items()}
        facts = {n: (i.dtype, i.shape) for n, i in infos.items()}
        tensors = ordered_tensors(ckpt.config, ckpt.has_vision, facts)
        pieces = {t.name: InPiece(t.name, t.name, t.dtype, t.shape, (),
                                  partial(read_tensor, shard[t.name], t.name)) for t in tensors}
        return QuantSource("hf", path, ckpt.config, json.loads((path / CONFIG).read_text()), ckpt.has_vision,
                           tensors, pieces, extra_files(path, (CONFIG, INDEX_FILE, REPORT_FILE)),
                           [*set(shard.values()), path / CONFIG])


def _open_afd(path: Path) -> QuantSource:
    layout = AFDLayout(path)
    view = layout.hf_view()
    vision = any(p.file.startswith("vision/") for p in layout.pieces.values())
    tensors = ordered_tensors(layout.config, vision, {n: (i.dtype, i.shape) for n in view.names()
                                                      for i in [view.info(n)]})
    pieces = {p.key: InPiece(p.key, p.source, p.dtype, p.shape, p.slice, partial(layout.read, p.key))
              for p in layout.pieces.values()}
    copies = sorted(rel for rel in layout.files if "/" not in rel and rel not in (CONFIG, REPORT_FILE))
    return QuantSource("afd", path, layout.config, dict(layout.manifest["config"]), vision, tensors, pieces,
                       copies, [path / MANIFEST, *(path / rel for rel in layout.files)],
                       layout.ffn_ranks, layout.attn_ranks)


def open_source(path: str | Path) -> QuantSource:
    """An AFD layout (has manifest.json) or else an HF checkpoint; errors name what is wrong."""
    path = Path(path)
    return _open_afd(path) if is_afd_layout(path) else _open_hf(path)

"""Read an AFD layout (`step3 convert` output): its manifest, each rank's tensors, and an HF-name view.

`AFDLayout(path)` parses and checks `manifest.json`; `pieces(part)` lists what one attention or
FFN rank loads; `read(key)` reads one AFD tensor. `hf_view()` presents the layout with the HF
checkpoint interface (`.config`, `.names()`, `.info()`, `.get(name)`, `.get_weight(name, dtype)`):
`get` reassembles a full HF tensor from its slices (expert ranges, TP slices) exactly, so the
reference model, `convert --to hf` and `verify` read a layout like the checkpoint it came from.
`read_array` / `get_array` give the same bits as numpy arrays: `convert --to hf` needs no torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from math import prod
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

import numpy as np

from converters.config import Step3Config
from converters.errors import CheckpointError, Step3Error
from converters.layout import FORMAT, MANIFEST, VERSION, Piece
from converters.names import is_scale_name, scale_name
from converters.safetensors_io import DTYPE_BYTES
from converters.slices import BITS, as_tensor, read_array
from converters.writer import JOURNAL

if TYPE_CHECKING:
    import torch


def is_afd_layout(path: str | Path) -> bool:
    """A directory holding an AFD manifest, or the journal of an interrupted `step3 convert` into it."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        return True
    journal = path / JOURNAL
    return journal.is_file() and "hf->afd" in journal.read_text(errors="replace")


def _piece(key: str, d: object, where: Path) -> Piece:
    try:
        assert isinstance(d, dict)
        shape = tuple(int(x) for x in d["shape"])
        slc = tuple((int(a), int(b), int(c)) for a, b, c in d["slice"])
        return Piece(key, str(d["file"]), str(d["source"]), str(d["dtype"]), shape, slc)
    except (AssertionError, KeyError, TypeError, ValueError):
        raise CheckpointError(f"{where}: tensors[{key!r}] is malformed (needs file, dtype, shape, source and "
                              f"slice as [[dim, start, stop], ...]); re-run step3 convert") from None


def _why_no_manifest(path: Path) -> str:
    try:
        done = len(json.loads((path / JOURNAL).read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return "not an AFD layout (run step3 convert first)"
    return (f"the layout is INCOMPLETE: an interrupted step3 convert finished {done} file(s) so far; "
            f"re-run the same command with --resume to complete it")


class AFDLayout:
    """A complete AFD layout directory. Raises CheckpointError naming the problem when it is not one."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        file = self.path / MANIFEST
        if not file.is_file():
            raise CheckpointError(f"{file}: missing; " + _why_no_manifest(self.path))
        try:
            m = json.loads(file.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise CheckpointError(f"{file}: not readable JSON ({e}); re-run step3 convert") from None
        if not isinstance(m, dict) or m.get("format") != FORMAT or m.get("version") != VERSION:
            raise CheckpointError(f"{file}: not a {FORMAT} version {VERSION} manifest")
        for key in ("config", "plan", "tensors", "files"):
            if not isinstance(m.get(key), dict):
                raise CheckpointError(f"{file}: field '{key}' is missing or not an object")
        self.manifest = m
        self.config = Step3Config.from_hf_dict(m["config"], source=f"{file} (config)")
        self.pieces = {k: _piece(k, v, file) for k, v in m["tensors"].items()}
        self.files: dict[str, dict] = m["files"]
        self.quantization: dict | None = m.get("quantization")

    @property
    def ffn_ranks(self) -> int:
        return int(self.manifest["plan"]["ffn"]["ranks"])

    @property
    def attn_ranks(self) -> int:
        return int(self.manifest["plan"]["attention"]["ranks"])

    def part_of(self, piece: Piece) -> str:
        """'attention', 'vision' or 'ffn/rank-K': the directory its file lives in."""
        return piece.file.rsplit("/", 1)[0]

    def pieces_of(self, part: str) -> list[Piece]:
        return [p for p in self.pieces.values() if self.part_of(p) == part]

    def read_array(self, key: str) -> np.ndarray:
        p = self.pieces[key]
        return read_array(self.path / p.file, p.source)

    def read(self, key: str) -> torch.Tensor:
        return as_tensor(self.read_array(key), self.pieces[key].dtype)

    def hf_view(self) -> HFView:
        return HFView(self)


@dataclass(frozen=True)
class HFInfo:
    """Like converters.hf.TensorInfo, for a tensor reassembled from AFD pieces."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: str  # where its (first) piece is stored


class HFView:
    """The layout under HF tensor names: what the reference model and `convert --to hf` read."""

    def __init__(self, layout: AFDLayout):
        self.layout, self.config, self.path = layout, layout.config, layout.path
        self._by_source: dict[str, list[Piece]] = {}
        for p in layout.pieces.values():
            self._by_source.setdefault(p.source, []).append(p)

    def __enter__(self) -> HFView:
        return self

    def __exit__(self, typ: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Nothing stays open (every read opens and closes its file); here for the checkpoint interface."""

    def names(self) -> list[str]:
        return list(self._by_source)

    @property
    def is_fp8(self) -> bool:
        return any(is_scale_name(n) for n in self._by_source)

    def _cut(self, name: str) -> tuple[int | None, list[Piece]]:
        """The dim the pieces of `name` are cut along (None: one whole piece), pieces in order."""
        pieces = self._by_source.get(name)
        if pieces is None:
            raise CheckpointError(f"{self.path}: no tensor {name} in this layout")
        if len(pieces) == 1 and not pieces[0].slice:
            return None, pieces
        dims = {s[0] for p in pieces for s in p.slice}
        if len(dims) != 1 or any(len(p.slice) != 1 for p in pieces):
            raise CheckpointError(f"{self.path / MANIFEST}: the slices of {name} are not cut along one dim")
        pieces = sorted(pieces, key=lambda p: p.slice[0][1])
        edges = [(p.slice[0][1], p.slice[0][2]) for p in pieces]
        if edges[0][0] != 0 or any(a[1] != b[0] for a, b in zip(edges, edges[1:], strict=False)):
            raise CheckpointError(f"{self.path / MANIFEST}: the slices of {name} do not tile it: {edges}")
        return dims.pop(), pieces

    def info(self, name: str) -> HFInfo:
        dim, pieces = self._cut(name)
        shape = list(pieces[0].shape)
        if dim is not None:
            shape[dim] = pieces[-1].slice[0][2]
        return HFInfo(name, pieces[0].dtype, tuple(shape), pieces[0].file)

    def get_array(self, name: str) -> np.ndarray:
        """The full HF tensor's bits: its pieces copied into place along their cut dim, one at a time."""
        dim, pieces = self._cut(name)
        if dim is None:
            return self.layout.read_array(pieces[0].key)
        info = self.info(name)
        full = np.empty(info.shape, dtype=BITS[DTYPE_BYTES[info.dtype]])
        index = [slice(None)] * full.ndim
        for p in pieces:
            index[dim] = slice(*p.slice[0][1:])
            full[tuple(index)] = self.layout.read_array(p.key)
        return full

    def get(self, name: str) -> torch.Tensor:
        """The full HF tensor, bit for bit."""
        return as_tensor(self.get_array(name), self.info(name).dtype)

    def get_weight(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """`name` in `dtype` (default float32), dequantized from block FP8 when stored with a `_scale_inv`."""
        import torch

        from quant.fp8 import FP8_DTYPE, dequantize_fp8

        dtype = dtype or torch.float32
        t = self.get(name)
        if t.dtype != FP8_DTYPE:
            return t.to(dtype)
        if scale_name(name) not in self._by_source:
            raise CheckpointError(f"{self.path}: {name} is FP8 but {scale_name(name)} is missing")
        return dequantize_fp8(t, self.get(scale_name(name)), dtype=dtype, name=name)



def rank_summary(layout: AFDLayout, batch: int, context: int) -> dict:
    """What each rank loads (files, bytes, parameters; FP8 scales count as bytes, not parameters), and
    the memory an attention rank needs: its weights (+ vision) plus a KV cache of batch x context tokens."""
    if batch <= 0 or context <= 0:
        raise Step3Error(f"--batch ({batch}) and --context ({context}) must be positive")
    parts: dict[str, dict] = {}
    for p in layout.pieces.values():
        acc = parts.setdefault(layout.part_of(p), {"files": set(), "bytes": 0, "params": 0})
        acc["files"].add(p.file)
        acc["bytes"] += p.nbytes
        acc["params"] += 0 if is_scale_name(p.source) else prod(p.shape)
    parts = {k: {**v, "files": len(v["files"])} for k, v in parts.items()}
    attention, vision = parts.get("attention", {"files": 0, "bytes": 0, "params": 0}), parts.get("vision")
    weights = attention["bytes"] + (vision["bytes"] if vision else 0)
    kv = {d: layout.config.kv_bytes_per_token(d) * batch * context for d in ("bf16", "fp8")}
    ranges = {r["rank"]: r for r in layout.manifest["plan"]["ffn"].get("rank_ranges", [])}
    ffn = [{**ranges.get(k, {"rank": k}), **parts.get(f"ffn/rank-{k}", {"files": 0, "bytes": 0, "params": 0})}
           for k in range(layout.ffn_ranks)]
    mode = layout.manifest["plan"]["attention"].get("mode")
    return {"batch": batch, "context": context,
            "attention": {"ranks": layout.attn_ranks, "mode": mode, **attention, "kv_cache_bytes": kv,
                          "memory_per_rank_bytes": {d: weights + b for d, b in kv.items()}},
            "vision": vision, "ffn": ffn}

"""An HF Step-3 checkpoint directory, read lazily: headers for facts, one tensor at a time for data.

`HFCheckpoint(path)` parses config.json and the shard index (or the single `model.safetensors`)
and nothing else. `info()` and `validate()` read shard headers only, so they are instant even on
the 600 GB original; `get()` reads one tensor through safetensors' `safe_open`. Pickle files
(`*.bin`, `*.pt`, `*.pth`) are never opened: unpickling runs arbitrary code. Any failure on
corrupt input is a CheckpointError (or ConfigError) that names the file and the tensor.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from safetensors import SafetensorError, safe_open

from converters.config import Step3Config
from converters.errors import CheckpointError, Step3Error
from converters.hf_checks import expected_specs, is_vision_name, name_problems, tensor_problems
from converters.names import is_scale_name, scale_name
from converters.safetensors_io import ShardHeader, read_header

if TYPE_CHECKING:  # torch is imported by get() and get_weight() only: headers and validation need none
    import torch

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth")
MAX_OPEN_SHARDS = 4  # safe_open handles kept for get(); the rest are closed (bounded file handles)


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: str
    dtype: str  # safetensors dtype string: "BF16", "F32", "F8_E4M3", ...
    shape: tuple[int, ...]
    nbytes: int


def _load_index(path: Path) -> dict[str, str]:
    """`weight_map` of model.safetensors.index.json; a broken index cannot be opened at all."""
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e}); re-download the index file") from None
    wmap = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(wmap, dict):
        raise CheckpointError(f"{path}: no 'weight_map' object (tensor name -> shard file); "
                              "re-download the index file")
    bad = [k for k, v in wmap.items() if not isinstance(v, str)]
    if bad:
        raise CheckpointError(f"{path}: weight_map entries must name a shard file; bad entry for {bad[0]!r}")
    return dict(wmap)


class HFCheckpoint:
    """A Step-3 checkpoint in HF layout. Use as a context manager (or call close()) to release files."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: not a checkpoint directory (expected config.json and "
                                  f"{SINGLE_FILE} or {INDEX_FILE} with shards)")
        self._headers: dict[str, ShardHeader] = {}
        self._handles: OrderedDict[str, Any] = OrderedDict()
        self.weight_map = self._read_weight_map()
        self.config = Step3Config.from_pretrained(self.path)

    # ---- opening -------------------------------------------------------------------------------
    def _read_weight_map(self) -> dict[str, str]:
        index, single = self.path / INDEX_FILE, self.path / SINGLE_FILE
        if index.is_file():
            return _load_index(index)
        if single.is_file():
            return dict.fromkeys(self._header(SINGLE_FILE).entries, SINGLE_FILE)
        pickles = sorted(p.name for pat in PICKLE_PATTERNS for p in self.path.glob(pat))
        if pickles:
            raise CheckpointError(f"{self.path}: holds {', '.join(pickles[:3])} but no safetensors; pickle "
                                  "checkpoints are not loaded (unsafe); convert to safetensors first")
        raise CheckpointError(f"{self.path}: no {INDEX_FILE} and no {SINGLE_FILE}; not an HF safetensors "
                              "checkpoint")

    def _shard_path(self, file: str) -> Path:
        """The shard's path; refuses names that would leave the checkpoint directory."""
        if not file or Path(file).name != file or file in (".", ".."):
            raise CheckpointError(f"{self.path / INDEX_FILE}: shard name {file!r} is not a plain file name "
                                  "in the checkpoint directory")
        shard = self.path / file
        if not shard.is_file():
            n = sum(1 for f in self.weight_map.values() if f == file)
            raise CheckpointError(f"{shard}: missing, but the index maps {n} tensor(s) to it; "
                                  "re-download it")
        return shard

    def _header(self, file: str) -> ShardHeader:
        if file not in self._headers:
            self._headers[file] = read_header(self._shard_path(file))
        return self._headers[file]

    def __enter__(self) -> HFCheckpoint:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Release the open shard handles (headers stay cached: they are small)."""
        while self._handles:
            _, handle = self._handles.popitem()
            handle.__exit__(None, None, None)

    # ---- facts from headers --------------------------------------------------------------------
    def names(self) -> list[str]:
        return list(self.weight_map)

    def shard_files(self) -> list[Path]:
        return [self.path / f for f in dict.fromkeys(self.weight_map.values())]

    def info(self, name: str) -> TensorInfo:
        """Dtype, shape and size of one tensor, from its shard's header only."""
        file = self.weight_map.get(name)
        if file is None:
            raise CheckpointError(f"{self.path}: no tensor named {name!r} in this checkpoint")
        entry = self._header(file).entries.get(name)
        if entry is None:
            raise CheckpointError(f"{self.path / file}: the index lists {name} in this shard but its header "
                                  "does not contain it; re-download the shard or the index")
        return TensorInfo(name, file, entry.dtype, entry.shape, entry.nbytes)

    @property
    def is_fp8(self) -> bool:
        """True when the checkpoint stores block-FP8 weights (their `_scale_inv` tensors are present)."""
        return any(is_scale_name(n) for n in self.weight_map)

    @property
    def has_vision(self) -> bool:
        return any(is_vision_name(n) for n in self.weight_map)

    def total_bytes(self) -> int:
        """Tensor bytes over all shards, from the headers."""
        return sum(e.nbytes for f in dict.fromkeys(self.weight_map.values())
                   for e in self._header(f).entries.values())

    # ---- data ----------------------------------------------------------------------------------
    def _handle(self, file: str) -> Any:
        if file in self._handles:
            self._handles.move_to_end(file)
            return self._handles[file]
        path = self._header(file).path  # header checked first: safe_open sees only well-formed shards
        handle = safe_open(str(path), framework="pt")
        self._handles[file] = handle
        if len(self._handles) > MAX_OPEN_SHARDS:
            _, oldest = self._handles.popitem(last=False)
            oldest.__exit__(None, None, None)
        return handle

    def get(self, name: str) -> torch.Tensor:
        """One tensor exactly as stored (dtype and shape from the shard)."""
        info = self.info(name)
        try:
            return self._handle(info.file).get_tensor(name)
        except (SafetensorError, OSError, RuntimeError, ValueError, TypeError) as e:
            raise CheckpointError(f"{self.path / info.file}: cannot read tensor {name}: {e}") from None

    def get_weight(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """`name` in `dtype` (default float32), dequantized from block FP8 when stored with a `_scale_inv`."""
        import torch

        from quant.fp8 import FP8_DTYPE, dequantize_fp8

        dtype = dtype or torch.float32
        t = self.get(name)
        if t.dtype != FP8_DTYPE:
            return t.to(dtype)
        scale = scale_name(name)
        if scale not in self.weight_map:
            raise CheckpointError(f"{self.path}: {name} is stored as FP8 but {scale} is missing, so it "
                                  "cannot be dequantized")
        try:
            return dequantize_fp8(t, self.get(scale), dtype=dtype)
        except Step3Error as e:
            raise CheckpointError(f"{self.path / self.weight_map[scale]}: {scale}: {e}") from None

    # ---- validation ----------------------------------------------------------------------------
    def _infos(self, problems: list[str]) -> dict[str, TensorInfo]:
        """TensorInfo of every readable tensor; unreadable shards and index/header mismatches -> problems."""
        infos: dict[str, TensorInfo] = {}
        by_file: dict[str, list[str]] = {}
        for name, file in self.weight_map.items():
            by_file.setdefault(file, []).append(name)
        for file, names in by_file.items():
            try:
                header = self._header(file)
            except CheckpointError as e:
                problems.append(str(e))
                continue
            for name in names:
                entry = header.entries.get(name)
                if entry is None:
                    problems.append(f"{name}: listed in the index under {file}, but that shard's header "
                                    "does not contain it")
                else:
                    infos[name] = TensorInfo(name, file, entry.dtype, entry.shape, entry.nbytes)
            unindexed = sorted(set(header.entries) - set(names))
            problems += [f"{n}: stored in {file} but not listed in the index" for n in unindexed]
        return infos

    def validate(self) -> None:
        """Check every file and tensor against config.json; raise ONE CheckpointError listing all problems.

        Header-only. A checkpoint that cannot be opened at all (no or broken config.json, broken index
        JSON, pickle-only) already raised from the constructor.
        """
        problems: list[str] = []
        infos = self._infos(problems)
        specs, layer_problems = expected_specs(self.config, set(self.weight_map), self.has_vision)
        problems += layer_problems
        problems += name_problems(specs, self.weight_map)
        problems += tensor_problems(specs, infos, self.weight_map)
        if problems:
            raise CheckpointError(f"{self.path}: {len(problems)} problem(s) found against its config.json",
                                  problems)

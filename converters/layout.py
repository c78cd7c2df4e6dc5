"""The AFD layout's plan and manifest schema: which HF tensor (or slice) goes to which file.

Placement follows `names.py` (`part`, `split`): attention tensors and routers go whole to
`attention/`, vision tensors whole to `vision/`, and every FFN tensor is cut over F ranks into
`ffn/rank-K/`: routed experts ("ep") by contiguous expert ranges on dim 0, dense MLP and shared
expert by the intermediate dim ("tp_out": rows of gate/up, "tp_in": columns of down), so the F
partial FFN outputs sum to the full one. A block-FP8 weight's `weight_scale_inv` follows its
weight: same expert range, or the block range (start/128 .. ceil(stop/128)) of the TP slice.

Manifest tensor keys: the HF name for attention and vision tensors, `ffn/rank-K:<HF name>` for
FFN rank K's slice. Inside every file a tensor is stored under its HF name, so each rank's files
load like a (partial) HF checkpoint. `slice` is a list of `[dim, start, stop]`, empty when whole.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from math import prod

from converters.config import Step3Config
from converters.errors import CheckpointError, Step3Error
from converters.names import FP8_BLOCK, SCALE_SUFFIX, is_scale_name, scale_name, spec_table
from converters.safetensors_io import DTYPE_BYTES
from converters.slices import sliced_shape

FORMAT = "step3-afd"
VERSION = 1
MANIFEST = "manifest.json"
CONFIG = "config.json"
FP8 = "F8_E4M3"


@dataclass(frozen=True)
class Piece:
    """One AFD tensor: a whole HF tensor or a slice of one, stored in `file` under `source`."""

    key: str  # manifest key
    file: str  # relative path of its safetensors file
    source: str  # HF tensor name (also its name inside the file)
    dtype: str  # safetensors dtype string
    shape: tuple[int, ...]
    slice: tuple[tuple[int, int, int], ...]

    @property
    def nbytes(self) -> int:
        return prod(self.shape) * DTYPE_BYTES[self.dtype]

    def to_json(self) -> dict[str, object]:
        return {"file": self.file, "dtype": self.dtype, "shape": list(self.shape), "source": self.source,
                "slice": [list(s) for s in self.slice]}


@dataclass(frozen=True)
class SourceTensor:
    """What the plan needs of an HF tensor: its header facts."""

    name: str
    dtype: str
    shape: tuple[int, ...]


def ordered_tensors(cfg: Step3Config, vision: bool,
                    info: Mapping[str, tuple[str, tuple[int, ...]]]) -> list[SourceTensor]:
    """SourceTensors of the names in `info` (name -> (dtype, shape)) in naming-table order, each FP8
    scale right after its weight: the order every plan (convert, quantize) places tensors in."""
    out = []
    for name in spec_table(cfg, vision=vision):
        for n in (name, scale_name(name)):
            if n in info:
                out.append(SourceTensor(n, *info[n]))
    return out


def ffn_key(rank: int, name: str) -> str:
    return f"ffn/rank-{rank}:{name}"


def rank_ranges(cfg: Step3Config, ffn_ranks: int) -> list[dict[str, object]]:
    """Each FFN rank's share: its expert range and its slice of the dense and shared intermediate dims."""
    E, I, Is, F = cfg.moe_num_experts, cfg.intermediate_size, cfg.share_expert_dim, ffn_ranks  # noqa: E741
    return [{"rank": k, "experts": [k * E // F, (k + 1) * E // F],
             "dense_intermediate": [k * I // F, (k + 1) * I // F],
             "shared_intermediate": [k * Is // F, (k + 1) * Is // F]} for k in range(F)]


def check_ranks(cfg: Step3Config, ffn_ranks: int, attn_ranks: int) -> None:
    """F must divide the experts and both intermediate dims (every rank gets an equal share)."""
    if attn_ranks < 1 or ffn_ranks < 1:
        raise Step3Error(f"--attn-ranks ({attn_ranks}) and --ffn-ranks ({ffn_ranks}) must be at least 1")
    dims = {"moe_num_experts": cfg.moe_num_experts, "intermediate_size": cfg.intermediate_size,
            "share_expert_dim": cfg.share_expert_dim}
    bad = [f"{k}={v}" for k, v in dims.items() if v % ffn_ranks]
    if bad:
        ok = [f for f in range(1, 17) if all(v % f == 0 for v in dims.values())]
        raise Step3Error(f"--ffn-ranks {ffn_ranks} does not divide {', '.join(bad)} of config.json evenly; "
                         f"choose one of {ok}")


def _fp8_misaligned(t: SourceTensor, dim: int, length: int, F: int) -> str | None:  # noqa: N803
    """A TP cut of an FP8 weight must fall on a 128 boundary (a scale block must not straddle ranks)."""
    if t.dtype != FP8 or F == 1 or (length // F) % FP8_BLOCK == 0:
        return None
    return (f"{t.name}: FP8 weight of shape {list(t.shape)} cut into {F} slices of {length // F} along dim "
            f"{dim}, not a multiple of {FP8_BLOCK} (its scale blocks would straddle FFN ranks)")


def _ffn_slices(t: SourceTensor, spec_shape: tuple[int, ...], split: str, F: int) -> list:  # noqa: N803
    """Rank k's [dim, start, stop] of an FFN tensor (empty when whole); a scale follows its weight."""
    dim = 1 if split == "tp_in" else 0
    length = spec_shape[dim]
    out = []
    for k in range(F):
        start, stop = k * length // F, (k + 1) * length // F
        if is_scale_name(t.name) and split != "ep":
            start, stop = start // FP8_BLOCK, -(-stop // FP8_BLOCK)  # the blocks covering the weight rows
        whole = start == 0 and stop == t.shape[dim]
        out.append(() if whole else ((dim, start, stop),))
    return out


def plan_pieces(cfg: Step3Config, sources: list[SourceTensor], ffn_ranks: int,
                vision: bool) -> list[tuple[str, Piece]]:
    """(directory, piece) for every AFD tensor, in source order; FP8 cuts off 128 boundaries raise."""
    specs = spec_table(cfg, vision=vision)
    out: list[tuple[str, Piece]] = []
    problems = []
    for t in sources:
        spec = specs[t.name[: -len(SCALE_SUFFIX)] if is_scale_name(t.name) else t.name]
        if spec.part != "ffn":
            out.append((spec.part, Piece(t.name, "", t.name, t.dtype, t.shape, ())))
            continue
        assert spec.split is not None, spec.name
        dim = 1 if spec.split == "tp_in" else 0
        if spec.split != "ep" and (why := _fp8_misaligned(t, dim, spec.shape[dim], ffn_ranks)):
            problems.append(why)
        for k, slc in enumerate(_ffn_slices(t, spec.shape, spec.split, ffn_ranks)):
            shape = sliced_shape(t.shape, slc)
            out.append((f"ffn/rank-{k}", Piece(ffn_key(k, t.name), "", t.name, t.dtype, shape, slc)))
    if problems:
        raise CheckpointError(f"--ffn-ranks {ffn_ranks}: {len(problems)} FP8 tensor(s) cannot be split on "
                              f"{FP8_BLOCK} boundaries; choose a smaller --ffn-ranks", problems)
    return out


def shard_pieces(placed: list[tuple[str, Piece]], shard_size: int) -> list[Piece]:
    """Pack each directory's pieces, in order, into files of at most `shard_size` bytes (a larger tensor
    gets a file of its own): `<dir>/model-00001-of-0000N.safetensors` (no `<dir>/` for dir "")."""
    by_dir: dict[str, list[list[Piece]]] = {}
    filled: dict[str, int] = {}  # bytes in each directory's last file so far
    for d, p in placed:
        shards = by_dir.setdefault(d, [[]])
        if shards[-1] and filled[d] + p.nbytes > shard_size:
            shards.append([])
            filled[d] = 0
        shards[-1].append(p)
        filled[d] = filled.get(d, 0) + p.nbytes
    out = []
    for d, shards in by_dir.items():
        for i, shard in enumerate(shards):
            file = f"{d}/" * bool(d) + f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            out += [Piece(p.key, file, p.source, p.dtype, p.shape, p.slice) for p in shard]
    return out


def build_manifest(config: Mapping[str, object], cfg: Step3Config, attn_ranks: int, ffn_ranks: int,
                   quantization: Mapping[str, object] | None, pieces: list[Piece],
                   files: Mapping[str, Mapping[str, object]]) -> dict[str, object]:
    """The manifest.json body (DESIGN.md, "The AFD layout")."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "config": dict(config),
        "plan": {"attention": {"ranks": attn_ranks, "mode": "dp"},
                 "ffn": {"ranks": ffn_ranks, "routed_experts": "ep", "dense_mlp": "tp", "shared_expert": "tp",
                         "rank_ranges": rank_ranges(cfg, ffn_ranks)}},
        "quantization": dict(quantization) if quantization else None,
        "tensors": {p.key: p.to_json() for p in pieces},
        "files": {k: dict(v) for k, v in files.items()},
    }

"""What `step3 inspect` reports about a preset, a config.json or a checkpoint, from headers only.

`summarize(target)` opens the target through the first reader in READERS that claims it and turns
it into plain data (parameter counts, KV-cache bytes, the tensor table); the CLI only renders it.
A new on-disk format (the AFD layout, a directory with manifest.json) is one more reader: a
function `Path -> Source | None` placed before `_read_hf`, which claims any directory.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from math import prod
from pathlib import Path
from typing import Any

from converters.afd import AFDLayout, is_afd_layout
from converters.config import PRESETS, Step3Config
from converters.errors import CheckpointError, ConfigError, Step3Error
from converters.hf import HFCheckpoint
from converters.names import is_scale_name, name_matcher, tensor_specs
from quant.record import read_quantization


@dataclass(frozen=True)
class TensorRow:
    name: str
    dtype: str
    shape: tuple[int, ...]
    file: str | None  # None for a preset or a bare config.json: nothing is stored


@dataclass(frozen=True)
class Source:
    """One inspected thing: its config and its tensors, as stored (or as the naming table says)."""

    kind: str  # "preset", "config" or "hf" (readers added later name their own kind)
    path: str
    config: Step3Config
    tensors: list[TensorRow]
    files: int = 0
    stored_bytes: int | None = None  # tensor bytes on disk; None when nothing is stored
    fp8: bool = False
    vision: bool = False


@dataclass(frozen=True)
class Summary:
    source: Source
    params: dict[str, int]
    kv_bytes_per_token: dict[str, int]
    kv_bytes_per_sequence: dict[str, int]
    context: int
    tensors: list[TensorRow] = field(default_factory=list)  # those matching --tensors (empty without it)
    quantization: dict[str, Any] | None = None  # the FP8 record (quant/record.py), None when BF16

    def to_dict(self) -> dict[str, Any]:
        """The `--json` form."""
        src = self.source
        return {
            "source": {"kind": src.kind, "path": src.path},
            "config": src.config.to_hf_dict(),
            "params": self.params,
            "kv_bytes_per_token": self.kv_bytes_per_token,
            "kv_bytes_per_sequence": {"context": self.context, **self.kv_bytes_per_sequence},
            "storage": {"files": src.files, "bytes": src.stored_bytes, "fp8": src.fp8, "vision": src.vision},
            "quantization": self.quantization,
            "num_tensors": len(src.tensors),
            "tensors": [{**asdict(t), "shape": list(t.shape)} for t in self.tensors],
        }


def _table_rows(cfg: Step3Config) -> list[TensorRow]:
    return [TensorRow(s.name, "bf16", s.shape, None) for s in tensor_specs(cfg)]


def _read_hf(path: Path) -> Source | None:
    """Any directory is taken for an HF checkpoint; HFCheckpoint says precisely what is wrong with it."""
    if not path.is_dir():
        return None
    with HFCheckpoint(path) as ckpt:
        infos = [ckpt.info(n) for n in ckpt.names()]
        rows = [TensorRow(i.name, i.dtype, i.shape, i.file) for i in infos]
        return Source("hf", str(path), ckpt.config, rows, files=len(ckpt.shard_files()),
                      stored_bytes=sum(i.nbytes for i in infos), fp8=ckpt.is_fp8, vision=ckpt.has_vision)


def _read_config_file(path: Path) -> Source | None:
    if not (path.is_file() and path.suffix == ".json"):
        return None
    cfg = Step3Config.from_pretrained(path)
    return Source("config", str(path), cfg, _table_rows(cfg), vision=cfg.vision is not None)


def _read_afd(path: Path) -> Source | None:
    """An AFD layout (step3 convert output): one row per stored piece; an incomplete one raises, saying so."""
    if not (path.is_dir() and is_afd_layout(path)):
        return None
    layout = AFDLayout(path)
    pieces = list(layout.pieces.values())
    rows = [TensorRow(p.key, p.dtype, p.shape, p.file) for p in pieces]
    fp8 = any(is_scale_name(p.source) for p in pieces)
    return Source("afd", str(path), layout.config, rows, files=len(layout.files),
                  stored_bytes=sum(p.nbytes for p in pieces), fp8=fp8,
                  vision=any(layout.part_of(p) == "vision" for p in pieces))


READERS: list[Callable[[Path], Source | None]] = [_read_config_file, _read_afd, _read_hf]


def open_source(target: str | Path) -> Source:
    """A preset name, a config.json, or a checkpoint directory (whatever a reader in READERS claims)."""
    if str(target) in PRESETS:
        cfg = PRESETS[str(target)]
        return Source("preset", str(target), cfg, _table_rows(cfg), vision=cfg.vision is not None)
    path = Path(target)
    if not path.exists():
        raise ConfigError(f"{path}: no such file or directory, and not a preset ({', '.join(PRESETS)})")
    for reader in READERS:
        source = reader(path)
        if source is not None:
            return source
    raise CheckpointError(f"{path}: not a checkpoint directory, a config.json or a preset")


def count_params(source: Source) -> dict[str, int]:
    """Counts by part from the config, the active count, and (for stored checkpoints) what is on disk."""
    cfg = source.config
    counts = cfg.num_params()
    params = {"total": counts.pop("total"), "active": cfg.num_active_params(), **counts}
    if source.stored_bytes is not None:
        params["stored"] = sum(prod(t.shape) for t in source.tensors if not is_scale_name(t.name))
    return params


def summarize(target: str | Path, context: int = 4096, tensors: str | None = None) -> Summary:
    """Everything `step3 inspect` shows; header-only for checkpoints. `tensors`: a regex over names."""
    if context <= 0:
        raise Step3Error(f"--context must be a positive number of tokens, got {context}")
    keep = name_matcher(tensors, "--tensors")
    source = open_source(target)
    cfg = source.config
    per_token = {d: cfg.kv_bytes_per_token(d) for d in ("bf16", "fp8")}
    return Summary(
        source=source,
        params=count_params(source),
        kv_bytes_per_token=per_token,
        kv_bytes_per_sequence={d: b * context for d, b in per_token.items()},
        context=context,
        tensors=[t for t in source.tensors if keep(t.name)],
        quantization=read_quantization(target) if source.kind != "preset" else None,
    )


def config_facts(cfg: Step3Config) -> dict[str, str]:
    """The config in a few human lines (the CLI's config table)."""
    facts = {
        "hidden size": str(cfg.hidden_size),
        "layers": f"{cfg.num_hidden_layers} ({len(cfg.dense_layers)} dense, {len(cfg.moe_layers)} MoE)",
        "attention": f"MFA: {cfg.num_attention_heads} query heads x {cfg.head_dim}, 1 shared K/V head, "
                     f"query latent {cfg.share_q_dim}",
        "dense MLP": str(cfg.intermediate_size),
        "MoE": f"{cfg.moe_num_experts} experts, top-{cfg.moe_top_k}, width {cfg.moe_intermediate_size}, "
               f"shared expert {cfg.share_expert_dim}",
        "vocabulary": str(cfg.vocab_size),
        "max context": str(cfg.max_position_embedding),
        "rope theta": f"{cfg.rope_theta:g}",
    }
    if cfg.vision is not None:
        v = cfg.vision
        facts["vision"] = (f"ViT {v.num_hidden_layers} layers x {v.hidden_size}, patch {v.patch_size}, "
                           f"image {v.image_size}")
    return facts

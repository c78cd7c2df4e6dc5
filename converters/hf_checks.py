"""What `HFCheckpoint.validate()` checks, as pure functions over names, headers and the naming table.

Expected names and shapes come only from converters/names.py. Each function returns problems as
strings that start with the tensor name (and say the file and the fix where there is one), so one
CheckpointError can list every problem of a checkpoint at once.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol

from converters.config import Step3Config, VisionConfig
from converters.names import (
    SCALE_SUFFIX,
    TensorSpec,
    is_scale_name,
    layer_of,
    scale_name,
    scale_shape,
    spec_table,
    vision_tensor_specs,
)

if TYPE_CHECKING:
    from collections.abc import Collection

FP8 = "F8_E4M3"
PLAIN_DTYPES = ("BF16", "F16", "F32")  # what unquantized weights may be stored as


class _Info(Protocol):
    file: str
    dtype: str
    shape: tuple[int, ...]


# First name component of every vision tensor, taken from the naming table (names.py owns the names).
VISION_PREFIXES = frozenset(s.name.split(".", 1)[0]
                            for s in vision_tensor_specs(VisionConfig(num_hidden_layers=1), 1))
_VISION_LAYER_RE = re.compile(r"\.layers\.(\d+)\.")


def is_vision_name(name: str) -> bool:
    return name.split(".", 1)[0] in VISION_PREFIXES


def _layer_count(names: Collection[str], vision: bool) -> int:
    """1 + the highest layer id present (0 when none), for text or vision names."""
    ids = [-1]
    for n in names:
        if vision and is_vision_name(n):
            m = _VISION_LAYER_RE.search(n)
            ids.append(int(m.group(1)) if m else -1)
        elif not vision:
            ids.append(-1 if (i := layer_of(n)) is None else i)
    return max(ids) + 1


def _missing_layers(what: str, field: str, want: int, have: int) -> str:
    first = max(have, 1)
    return (f"{what} layers {first}..{want - 1}: missing entirely (config.json {field}={want}, the "
            f"checkpoint holds {have} layer(s)); wrong config.json for these weights, or missing shards")


def expected_specs(cfg: Step3Config, names: Collection[str],
                   has_vision: bool) -> tuple[dict[str, TensorSpec], list[str]]:
    """The naming table for this checkpoint, plus one problem per run of whole missing layers.

    A config that promises more layers than the files hold is reported once, and only the layers
    present are compared tensor by tensor; this also keeps a corrupt num_hidden_layers (say 10**9)
    from building a table of billions of names.
    """
    problems: list[str] = []
    have = _layer_count(names, vision=False)
    if have < cfg.num_hidden_layers:
        if max(have, 1) < cfg.num_hidden_layers:
            problems.append(_missing_layers("decoder", "num_hidden_layers", cfg.num_hidden_layers, have))
        n = max(have, 1)
        enum = cfg.moe_layers_enum
        if enum is not None:
            enum = ",".join(str(i) for i in cfg.moe_layers if i < n)
        cfg = cfg.replace(num_hidden_layers=n, moe_layers_enum=enum)
    vision = cfg.vision is not None and has_vision
    if cfg.vision is None and has_vision:
        count = sum(map(is_vision_name, names))
        problems.append(f"config.json has no vision_config, but the checkpoint holds {count} vision tensors "
                        "(listed below as unexpected)")
    if vision and cfg.vision is not None:
        have = _layer_count(names, vision=True)
        if have < cfg.vision.num_hidden_layers:
            if max(have, 1) < cfg.vision.num_hidden_layers:
                problems.append(_missing_layers("vision", "vision_config.num_hidden_layers",
                                                cfg.vision.num_hidden_layers, have))
            cfg = cfg.replace(vision=dataclasses.replace(cfg.vision, num_hidden_layers=max(have, 1)))
    return spec_table(cfg, vision=vision), problems


def name_problems(specs: Mapping[str, TensorSpec], weight_map: Mapping[str, str]) -> list[str]:
    """Tensors the config expects but the checkpoint lacks, and tensors it holds but should not."""
    problems = [f"{n}: missing (config.json expects shape {list(s.shape)})"
                for n, s in specs.items() if n not in weight_map]
    for n, file in weight_map.items():
        if n in specs:
            continue
        if is_scale_name(n):
            spec = specs.get(n[: -len(SCALE_SUFFIX)])
            if spec is not None and spec.quantize:
                continue  # a legitimate FP8 scale: tensor_problems checks it
            why = f"its weight ({spec.group}) is never quantized" if spec else "there is no such weight"
            problems.append(f"{n}: unexpected FP8 scale in {file} ({why})")
        else:
            problems.append(f"{n}: unexpected tensor in {file} (not part of Step-3 for this config.json)")
    return problems


def _scale_problems(spec: TensorSpec, infos: Mapping[str, _Info], weight_map: Mapping[str, str]) -> list[str]:
    """An FP8 weight needs a F32 scale with one value per 128x128 block."""
    sname = scale_name(spec.name)
    if sname not in weight_map:
        return [f"{spec.name}: stored as {FP8} without its {sname}, so it cannot be dequantized"]
    s = infos.get(sname)
    if s is None:
        return []  # unreadable: already reported with its shard
    problems = []
    if s.dtype != "F32":
        problems.append(f"{sname}: dtype {s.dtype} in {s.file}, expected F32")
    want = scale_shape(spec.shape)
    if s.shape != want:
        problems.append(f"{sname}: shape {list(s.shape)} in {s.file}, expected {list(want)} "
                        f"(one scale per 128x128 block of {list(spec.shape)})")
    return problems


def _tensor_problems(spec: TensorSpec, info: _Info, infos: Mapping[str, _Info],
                     weight_map: Mapping[str, str]) -> list[str]:
    problems = []
    if info.shape != spec.shape:
        problems.append(f"{spec.name}: shape {list(info.shape)} in {info.file}, expected {list(spec.shape)} "
                        "from config.json")
    if info.dtype == FP8 and not spec.quantize:
        problems.append(f"{spec.name}: stored as {FP8} in {info.file}, but {spec.group} tensors must never "
                        "be quantized; store it as BF16")
    elif info.dtype == FP8:
        problems += _scale_problems(spec, infos, weight_map)
    elif info.dtype not in PLAIN_DTYPES:
        allowed = ", ".join(PLAIN_DTYPES) + (f" or {FP8} with a F32 scale" if spec.quantize else "")
        problems.append(f"{spec.name}: dtype {info.dtype} in {info.file}, expected {allowed}")
    return problems


def tensor_problems(specs: Mapping[str, TensorSpec], infos: Mapping[str, _Info],
                    weight_map: Mapping[str, str]) -> list[str]:
    """Shape and dtype of every readable tensor against the table; scales against their weights."""
    problems = []
    for name, info in infos.items():
        spec = specs.get(name)
        if spec is not None:
            problems += _tensor_problems(spec, info, infos, weight_map)
            continue
        base = specs.get(name[: -len(SCALE_SUFFIX)]) if is_scale_name(name) else None
        weight = infos.get(base.name) if base is not None and base.quantize else None
        if weight is not None and weight.dtype != FP8:
            problems.append(f"{name}: a scale for {base.name}, which is stored as {weight.dtype}, not {FP8}")
    return problems

"""The quantization record: what `step3 quantize` writes into config.json / manifest.json, and reads back.

HF checkpoints carry it as the top-level `quantization_config` (the step3-fp8 / DeepSeek-V3 form that
vLLM and SGLang load: quant_method fp8, fmt e4m3, dynamic activations, weight_block_size [128, 128]),
with `ignored_layers` for linear layers left in BF16 by --skip. The step3 specifics sit under a
`step3` key the serving engines ignore: scheme, format, block size, backend, and the KV-cache dtype
the runtime should use. An AFD manifest's `quantization` field holds the same object.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from converters.config import KV_CACHE_BYTES, config_quantization
from converters.layout import CONFIG, MANIFEST
from converters.names import FP8_QUANT_CONFIG
from quant.fp8 import BLOCK

KV_CACHE_DTYPES = tuple(KV_CACHE_BYTES)


def quantization_record(*, backend: str | None, kv_cache: str, skip: str | None = None,
                        ignored: list[str] | None = None,
                        base: dict[str, Any] | None = None) -> dict[str, Any]:
    """`base` (an existing record, for pass-through) or the step3-fp8 fields, plus the step3 details."""
    record = {k: v for k, v in (base or FP8_QUANT_CONFIG).items() if k != "step3"}
    if ignored:
        record["ignored_layers"] = sorted(ignored)
    old = (base or {}).get("step3") or {}
    record["step3"] = {"scheme": "block-fp8", "format": "e4m3", "block_size": [BLOCK, BLOCK],
                       "backend": backend if backend is not None else old.get("backend"),
                       "kv_cache_dtype": kv_cache, "skip": skip if skip is not None else old.get("skip")}
    return record


def with_quantization(config: dict[str, Any], record: dict[str, Any] | None) -> dict[str, Any]:
    """A copy of an HF config dict carrying `record` at the top level (or none at all when None)."""
    out = {k: v for k, v in config.items() if k != "quantization_config"}
    if isinstance(out.get("text_config"), dict):
        out["text_config"] = {k: v for k, v in out["text_config"].items() if k != "quantization_config"}
    if record is not None:
        out["quantization_config"] = record
    return out


def kv_cache_dtype(record: dict[str, Any] | None) -> str:
    """The KV-cache dtype a quantization record asks the runtime for ('bf16' when there is none)."""
    step3 = (record or {}).get("step3") or {}
    dtype = step3.get("kv_cache_dtype", "bf16")
    return dtype if dtype in KV_CACHE_DTYPES else "bf16"


def read_quantization(path: str | Path) -> dict[str, Any] | None:
    """The record of a checkpoint directory (AFD manifest.json first, else config.json) or a config.json."""
    path = Path(path)
    for file in ((path / MANIFEST, path / CONFIG) if path.is_dir() else (path,)):
        if not file.is_file():
            continue
        try:
            data = json.loads(file.read_text())
        except (OSError, UnicodeDecodeError, ValueError):
            return None  # the readers of that file report what is wrong with it
        if not isinstance(data, dict):
            return None
        if file.name == MANIFEST:
            q = data.get("quantization")
            return dict(q) if isinstance(q, dict) else None
        return config_quantization(data)
    return None

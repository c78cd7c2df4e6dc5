"""Synthetic Step-3 checkpoints in the real HF format: random weights, real names, shapes and files.

Everything downstream (validate, convert, quantize, load, serve) needs checkpoints; the real one is
~640 GB. `synthesize` writes a complete checkpoint for any config: config.json, sharded safetensors
+ index with exactly the tensors of `converters.names.tensor_specs`, a byte-level tokenizer with
Step-3's special tokens and chat template, and generation_config.json.

Values are reproducible: each tensor has its own generator seeded from (seed, tensor name) through
SHA-256, so the shard count never changes a value, and the FP8 variant quantizes exactly the BF16
values the BF16 variant writes. Scales keep the reference model's logits informative (std a few
units, argmax varying by position): residual-branch outputs are shrunk by 1/sqrt(2 * layers).
Memory stays bounded by one tensor: shards are streamed tensor by tensor (safetensors_writer).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from pathlib import Path

import torch

from converters.config import TINY_VISION, Step3Config, VisionConfig
from converters.errors import CheckpointError, ConfigError
from converters.names import TensorSpec, scale_name, scale_shape, tensor_specs
from converters.safetensors_writer import StreamingSafetensorsWriter, nbytes, write_json
from converters.tokenizer_synth import build_tokenizer, generation_config, tokenizer_config
from quant.fp8 import FP8_DTYPE, quantize_fp8

INDEX_NAME = "model.safetensors.index.json"
FP8_QUANT_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                    "weight_block_size": [128, 128]}
LOGIT_STD = 4.0  # std of the logits over the vocabulary for a unit-RMS final hidden state
_RESIDUAL_OUTPUTS = ("o_proj.weight", "down_proj.weight", "out_proj.weight", "fc2.weight")
# A mid-size tower for configs too wide for TINY_VISION (step3-small): a few MB, real layout.
SMALL_VISION = VisionConfig(hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                            intermediate_size=1024, patch_size=14, image_size=224, output_hidden_size=512)
_OWNED_FILES = ("config.json", INDEX_NAME, "tokenizer.json", "tokenizer_config.json",
                "generation_config.json")

Entry = tuple[str, tuple[int, ...], torch.dtype]  # a stored tensor: name, shape, dtype


def synthetic_vision_config(cfg: Step3Config) -> VisionConfig:
    """The config's own tower, else one scaled to the text model (tiny for tiny models)."""
    if cfg.vision is not None:
        return cfg.vision
    return TINY_VISION if cfg.hidden_size <= 512 else SMALL_VISION


def tensor_seed(seed: int, name: str) -> int:
    """A stable per-tensor seed (SHA-256, not Python's salted hash())."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _std(spec: TensorSpec, cfg: Step3Config) -> float:
    """Init scale: N(0, 1/sqrt(fan_in)) for weights, shrunk on residual outputs; see module doc."""
    if spec.group == "embedding":
        return 1.0
    if spec.group == "lm_head":
        return LOGIT_STD / math.sqrt(spec.shape[-1])
    if spec.name.endswith(".bias") or spec.name.endswith(("class_embedding", "position_embedding.weight")):
        return 0.02
    fan_in = spec.shape[-1] if spec.group == "routed_experts" else math.prod(spec.shape[1:])
    std = 1.0 / math.sqrt(fan_in)
    if spec.name.endswith(_RESIDUAL_OUTPUTS):
        vision_tower = spec.part == "vision" and cfg.vision is not None
        layers = cfg.vision.num_hidden_layers if vision_tower else cfg.num_hidden_layers
        std /= math.sqrt(2 * layers)
    return std


def _is_norm(spec: TensorSpec) -> bool:
    return spec.group == "norm" or (spec.part == "vision" and "layer_norm" in spec.name
                                    and spec.name.endswith(".weight"))


def init_tensor(spec: TensorSpec, cfg: Step3Config, seed: int) -> torch.Tensor:
    """The BF16 value of one tensor; a function of (seed, name, shape) only."""
    g = torch.Generator().manual_seed(tensor_seed(seed, spec.name))
    w = torch.randn(spec.shape, generator=g, dtype=torch.float32)
    if _is_norm(spec):
        return (1.0 + 0.1 * w).to(torch.bfloat16)
    return (w * _std(spec, cfg)).to(torch.bfloat16)


def stored_tensors(spec: TensorSpec, cfg: Step3Config, seed: int,
                   fp8: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """What the checkpoint holds for one spec: the BF16 weight, or its FP8 + weight_scale_inv pair."""
    w = init_tensor(spec, cfg, seed)
    if fp8 and spec.quantize:
        q, scale_inv = quantize_fp8(w, name=spec.name)
        yield spec.name, q
        yield scale_name(spec.name), scale_inv
    else:
        yield spec.name, w


def _entries(spec: TensorSpec, fp8: bool) -> list[Entry]:
    if fp8 and spec.quantize:
        return [(spec.name, spec.shape, FP8_DTYPE),
                (scale_name(spec.name), scale_shape(spec.shape), torch.float32)]
    return [(spec.name, spec.shape, torch.bfloat16)]


def plan_shards(specs: list[TensorSpec], fp8: bool, shards: int) -> list[list[TensorSpec]]:
    """Cut the spec list, in order, into `shards` non-empty runs of about equal bytes."""
    if not 1 <= shards <= len(specs):
        raise ConfigError(f"shards must be between 1 and {len(specs)} (at least one tensor a shard), "
                          f"got {shards}")
    sizes = [sum(nbytes(s, d) for _, s, d in _entries(spec, fp8)) for spec in specs]
    total, plan, done, k = sum(sizes), [[] for _ in range(shards)], 0, 0
    for i, (spec, size) in enumerate(zip(specs, sizes, strict=True)):
        by_bytes = min(shards - 1, int((done + size / 2) * shards / total))  # where its middle byte falls
        # never skip a shard, never go back, and leave at least one tensor for every later shard
        k = max(k, min(by_bytes, k + 1), shards - (len(specs) - i))
        plan[k].append(spec)
        done += size
    assert all(plan), "every shard gets a tensor"
    return plan


def _prepare_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise CheckpointError(f"{out_dir}: exists and is not a directory; choose another output path")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not overwrite:
            raise CheckpointError(f"{out_dir}: directory is not empty; choose an empty one or overwrite "
                                  f"(CLI: --force)")
        for name in _OWNED_FILES:  # the completeness markers go first, so a crash never looks complete
            (out_dir / name).unlink(missing_ok=True)
        for stale in out_dir.glob("model-*-of-*.safetensors*"):
            stale.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)


def synthesize(out_dir: Path, cfg: Step3Config, *, fp8: bool = False, vision: bool = False, shards: int = 1,
               seed: int = 0, progress=None, overwrite: bool = False) -> Path:
    """Write a complete HF-format Step-3 checkpoint of random weights to `out_dir`; return `out_dir`.

    The written config.json may differ from `cfg` in the token ids (bos/eos/image_token_id follow the
    synthetic tokenizer) and in the vision tower (attached iff `vision`); read it back with
    Step3Config.from_pretrained. `progress(done_bytes, total_bytes, tensor_name)` follows the tensor data.
    """
    out_dir = Path(out_dir)
    _prepare_dir(out_dir, overwrite)
    cfg = cfg.replace(vision=synthetic_vision_config(cfg) if vision else None)
    tok = build_tokenizer(cfg)
    cfg = cfg.replace(bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, image_token_id=tok.image_token_id)
    plan = plan_shards(tensor_specs(cfg, vision), fp8, shards)
    weight_map = _write_shards(out_dir, cfg, plan, fp8, seed, progress)
    total = sum(nbytes(s, d) for group in plan for spec in group for _, s, d in _entries(spec, fp8))
    write_json(out_dir / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map})
    tok.tokenizer.save(str(out_dir / "tokenizer.json"))
    write_json(out_dir / "tokenizer_config.json", tokenizer_config(cfg, tok))
    write_json(out_dir / "generation_config.json", generation_config(tok))
    hf = cfg.to_hf_dict()
    if fp8:
        hf["quantization_config"] = dict(FP8_QUANT_CONFIG)
    write_json(out_dir / "config.json", hf)  # last: its presence marks a complete checkpoint
    return out_dir


def _write_shards(out_dir: Path, cfg: Step3Config, plan: list[list[TensorSpec]], fp8: bool, seed: int,
                  progress) -> dict[str, str]:
    """Stream every shard to disk, one tensor in memory at a time; return the weight_map."""
    layouts = [[e for spec in group for e in _entries(spec, fp8)] for group in plan]
    total = sum(nbytes(s, d) for layout in layouts for _, s, d in layout)
    weight_map: dict[str, str] = {}
    done = 0
    for k, (group, layout) in enumerate(zip(plan, layouts, strict=True)):
        file = f"model-{k + 1:05d}-of-{len(plan):05d}.safetensors"
        with StreamingSafetensorsWriter(out_dir / file, layout) as writer:
            for spec in group:
                for name, tensor in stored_tensors(spec, cfg, seed, fp8):
                    writer.write(name, tensor)
                    weight_map[name] = file
                    done += tensor.numel() * tensor.element_size()
                    if progress is not None:
                        progress(done, total, name)
    return weight_map

"""Synthetic Step-3 checkpoints in the real HF format: random weights, real names, shapes and files.

Everything downstream (validate, convert, quantize, load, serve) needs checkpoints; the real one is
~640 GB. `synthesize` writes a complete checkpoint for any config: config.json, sharded safetensors
+ index with exactly the tensors of `converters.names.tensor_specs`, a byte-level tokenizer with
Step-3's special tokens and chat template, and generation_config.json.

Values are reproducible: each tensor has its own generator seeded from (seed, tensor name) through
SHA-256, so the shard count never changes a value, and the FP8 variant quantizes exactly the BF16
values the BF16 variant writes. Scales keep the reference model's logits informative (std a few
units, argmax varying by position): residual-branch outputs are shrunk by 1/sqrt(2 * layers).
Memory stays bounded by one tensor: shards are streamed tensor by tensor (converters.writer).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import torch

from converters.config import TINY_VISION, Step3Config, VisionConfig
from converters.errors import ConfigError
from converters.hf import INDEX_FILE
from converters.layout import CONFIG
from converters.names import FP8_QUANT_CONFIG, TensorSpec, scale_name, scale_shape, tensor_specs
from converters.tokenizer_synth import SynthTokenizer, build_tokenizer, generation_config, tokenizer_config
from converters.writer import OutputPlan, ProgressFn, SafetensorsFile, TensorOut, json_bytes, write_output
from quant.fp8 import FP8_DTYPE, quantize_fp8

LOGIT_STD = 4.0  # std of the logits over the vocabulary for a unit-RMS final hidden state
_RESIDUAL_OUTPUTS = ("o_proj.weight", "down_proj.weight", "out_proj.weight", "fc2.weight")
# A mid-size tower for configs too wide for TINY_VISION (step3-small): a few MB, real layout.
SMALL_VISION = VisionConfig(hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                            intermediate_size=1024, patch_size=14, image_size=224, output_hidden_size=512)

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
        return w.mul_(0.1).add_(1.0).to(torch.bfloat16)
    return w.mul_(_std(spec, cfg)).to(torch.bfloat16)  # in place: one fp32 copy of the largest tensor


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
    sizes = [sum(math.prod(s) * d.itemsize for _, s, d in _entries(spec, fp8)) for spec in specs]
    total, plan, done, k = sum(sizes), [[] for _ in range(shards)], 0, 0
    for i, (spec, size) in enumerate(zip(specs, sizes, strict=True)):
        by_bytes = min(shards - 1, int((done + size / 2) * shards / total))  # where its middle byte falls
        # never skip a shard, never go back, and leave at least one tensor for every later shard
        k = max(k, min(by_bytes, k + 1), shards - (len(specs) - i))
        plan[k].append(spec)
        done += size
    assert all(plan), "every shard gets a tensor"
    return plan


class _Producer:
    """Produces stored tensors on demand with a one-slot cache: an FP8 weight is quantized once and
    its weight_scale_inv handed out by the next call (the writer asks for tensors in file order)."""

    def __init__(self, cfg: Step3Config, seed: int, fp8: bool):
        self.cfg, self.seed, self.fp8 = cfg, seed, fp8
        self._slot: dict[str, torch.Tensor] = {}

    def __call__(self, spec: TensorSpec, name: str) -> torch.Tensor:
        if name not in self._slot:
            self._slot = dict(stored_tensors(spec, self.cfg, self.seed, self.fp8))
        return self._slot.pop(name)


def _output_plan(cfg: Step3Config, tok: SynthTokenizer, fp8: bool, shards: int, seed: int) -> OutputPlan:
    """Shards of tensors produced on demand, then index, tokenizer files and config.json (last)."""
    plan = plan_shards(tensor_specs(cfg), fp8, shards)
    produce = _Producer(cfg, seed, fp8)
    files = tuple(
        SafetensorsFile(f"model-{k + 1:05d}-of-{len(plan):05d}.safetensors", tuple(
            TensorOut(name, dtype, shape, partial(produce, spec, name))
            for spec in group for name, shape, dtype in _entries(spec, fp8)), {"format": "pt"})
        for k, group in enumerate(plan))
    weight_map = {t.name: f.path for f in files for t in f.tensors}
    index = {"metadata": {"total_size": sum(t.nbytes for f in files for t in f.tensors)},
             "weight_map": weight_map}
    hf = cfg.to_hf_dict()
    if fp8:
        hf["quantization_config"] = dict(FP8_QUANT_CONFIG)
    finals = ((INDEX_FILE, json_bytes(index)), ("tokenizer.json", tok.tokenizer.to_str(pretty=True).encode()),
              ("tokenizer_config.json", json_bytes(tokenizer_config(cfg, tok))),
              ("generation_config.json", json_bytes(generation_config(tok))),
              (CONFIG, json_bytes(hf)))  # last: its presence marks a complete checkpoint
    fingerprint = f"synth seed={seed} fp8={fp8} shards={shards} config={json.dumps(hf, sort_keys=True)}"
    return OutputPlan(files, lambda records: finals, fingerprint, tuple(name for name, _ in finals))


def synthesize(out_dir: Path, cfg: Step3Config, *, fp8: bool = False, vision: bool = False, shards: int = 1,
               seed: int = 0, progress: ProgressFn | None = None, overwrite: bool = False,
               resume: bool = False) -> Path:
    """Write a complete HF-format Step-3 checkpoint of random weights to `out_dir`; return `out_dir`.

    The written config.json may differ from `cfg` in the token ids (bos/eos/image_token_id follow the
    synthetic tokenizer) and in the vision tower (attached iff `vision`); read it back with
    Step3Config.from_pretrained. A non-empty `out_dir` is refused unless `overwrite` (deletes only what
    a step3 run wrote there) or `resume` (keeps finished shards). `progress(done, total, file)` counts
    file bytes (converters.writer.write_output).
    """
    cfg = cfg.replace(vision=synthetic_vision_config(cfg) if vision else None)
    tok = build_tokenizer(cfg)
    cfg = cfg.replace(bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, image_token_id=tok.image_token_id)
    plan = _output_plan(cfg, tok, fp8, shards, seed)
    write_output(out_dir, plan, resume=resume, force=overwrite, progress=progress)
    return Path(out_dir)
